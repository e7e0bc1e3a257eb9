//! The `graft` command: parse flags, run, turn an error chain into a message and an exit code.

use clap::Parser;

/// Training allocates and frees activation-sized buffers for every op; the system allocator hands large
/// ones back to the kernel each time, so every step pays its page faults again. mimalloc keeps them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    graft::alloc::keep_freed_memory();
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
