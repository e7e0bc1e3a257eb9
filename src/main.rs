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
            // Library errors already include their source in their message (`path: No space left on
            // device`); a cause is printed only when it says something the lines above did not.
            let mut said = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if !said.contains(&text) {
                    eprintln!("  caused by: {text}");
                    said.push_str(&text);
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}
