//! The `graft` command: parse flags, run, turn an error chain into a message and an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = graft::cli::Cli::parse();
    match graft::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
