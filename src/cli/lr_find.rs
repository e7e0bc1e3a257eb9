//! `graft lr-find`: fastai's learning-rate finder on the run finetune's flags describe.

use anyhow::bail;
use clap::Args;
use std::path::PathBuf;

use crate::cli::finetune::{config_from_args, FinetuneArgs};
use crate::train::finetune::find_lr;
use crate::train::lr_find::{LrFindConfig, Suggestion};

#[derive(Debug, Args)]
pub struct LrFindArgs {
    #[command(flatten)]
    pub finetune: FinetuneArgs,
    /// First rate of the mock training.
    #[arg(long, default_value_t = LrFindConfig::default().start_lr)]
    pub start_lr: f64,
    /// Last rate (reached at step --num-it).
    #[arg(long, default_value_t = LrFindConfig::default().end_lr)]
    pub end_lr: f64,
    /// Steps of the mock training (at least 6).
    #[arg(long, default_value_t = LrFindConfig::default().num_it)]
    pub num_it: usize,
    /// Keep going when the smoothed loss passes 4x its best.
    #[arg(long)]
    pub no_stop_div: bool,
    /// The rule whose suggestion is printed last (as `--lr VALUE`).
    #[arg(long, value_enum, default_value = "valley")]
    pub suggest: Suggestion,
    /// Where the curve (loss against rate, log axis, suggestions marked) is drawn.
    #[arg(long, default_value = "lr_find.png")]
    pub plot: PathBuf,
}

pub fn run(args: LrFindArgs) -> anyhow::Result<()> {
    if args.finetune.train.resume.is_some() {
        bail!("lr-find starts from the base's weights: --resume does not apply");
    }
    let cfg = config_from_args(&args.finetune)?;
    let finder = LrFindConfig {
        start_lr: args.start_lr,
        end_lr: args.end_lr,
        num_it: args.num_it,
        stop_div: !args.no_stop_div,
    };
    let (finding, phase) = find_lr(&cfg, &finder, &args.plot, args.finetune.train.quiet)?;
    println!(
        "learning-rate finder, {phase} phase: {} steps from {:.1e}",
        finding.lrs.len(),
        finder.start_lr
    );
    for (rule, lr, _) in &finding.suggestions {
        println!("  {:<8} {lr:.3e}", rule.name());
    }
    println!("plot: {}", args.plot.display());
    println!(
        "suggested: --lr {:.3e} ({})",
        finding.suggested(args.suggest)?,
        args.suggest.name()
    );
    Ok(())
}
