//! `graft export RUN_DIR --out model.safetensors`.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A run folder written by `graft finetune`.
    pub run_dir: PathBuf,
    /// The deployment file to write (atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Fold every BatchNorm into the convolution before it (scaled filters plus biases, no BatchNorm
    /// tensors): the same predictions, a simpler graph for other runtimes.
    #[arg(long)]
    pub fold_bn: bool,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let run = crate::train::checkpoint::RunDir::open_existing(&args.run_dir)?;
    let report = crate::export::export_run(
        &run,
        &args.out,
        crate::export::ExportOptions {
            fold_bn: args.fold_bn,
        },
    )
    .with_context(|| format!("exporting run {}", args.run_dir.display()))?;
    println!(
        "wrote {} ({} tensors from {}; {} on {} classes, input {}x{})",
        report.path.display(),
        report.tensors,
        report.source.display(),
        report.spec.arch,
        report.spec.classes.len(),
        report.spec.preprocess.input_size,
        report.spec.preprocess.input_size
    );
    Ok(())
}
