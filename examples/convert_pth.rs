//! Converts a PyTorch checkpoint (zip or legacy format) into safetensors, without Python:
//! `cargo run --release --example convert_pth -- IN.pth OUT.safetensors`.
//! Used by scripts/fetch-efficientnet-lite0.sh until `graft convert` does the same.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: convert_pth IN.pth OUT.safetensors");
        return ExitCode::from(2);
    };
    match graft::models::pth::convert_to_safetensors(input, output) {
        Ok(report) => {
            println!(
                "{input} ({:?} format) -> {output}: {} tensors, {} elements, {} bytes",
                report.format, report.tensors, report.elements, report.bytes_written
            );
            if !report.skipped.is_empty() {
                println!("skipped non-tensor entries: {}", report.skipped.join(", "));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
