//! `graft convert IN OUT.safetensors`: PyTorch checkpoint to safetensors.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// A PyTorch checkpoint (.pth/.pt/.bin; torch >= 1.6 zip format or the legacy format).
    pub input: PathBuf,
    /// The safetensors file to write (atomically).
    pub output: PathBuf,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let report = crate::formats::pth::convert_to_safetensors(&args.input, &args.output)
        .with_context(|| format!("converting {}", args.input.display()))?;
    println!(
        "wrote {} ({} tensors, {} values, {}-format PyTorch checkpoint){}",
        args.output.display(),
        report.tensors,
        report.elements,
        report.format,
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; skipped non-tensor entries: {}",
                report.skipped.join(", ")
            )
        }
    );
    Ok(())
}
