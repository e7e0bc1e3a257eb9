//! Command-line definitions (clap) and their translation into validated library calls. One file per
//! command; `anyhow` is used here and in `main.rs` only.

mod convert;
mod eval;
mod export;
pub mod finetune;
mod inspect;
mod lr_find;
mod models;
mod predict;
mod pretrain;
mod search;
pub mod shared;

use clap::{Args, Parser, Subcommand};

/// graft: fine-tune pretrained image classifiers on your own folders of images.
#[derive(Debug, Parser)]
#[command(name = "graft", version, about, long_about = None)]
#[command(
    mut_subcommand("finetune", |c| shared::show_defaults(c, &finetune::help_defaults())),
    mut_subcommand("pretrain", |c| shared::show_defaults(c, &pretrain::help_defaults()))
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Classify images with a pretrained base model (ImageNet classes) or an exported model.
    Predict(predict::PredictArgs),
    /// List the base models graft knows (`--base NAME`): size, input, where the weights come from, and
    /// whether they are on this machine.
    Models(models::ModelsArgs),
    /// Show a base model's layer groups, parameter counts and what was loaded.
    Inspect(inspect::InspectArgs),
    /// Fine-tune a pretrained base on a folder of labelled images.
    Finetune(Box<finetune::FinetuneArgs>),
    /// fastai's learning-rate finder: a short mock training over exponentially growing rates, then the
    /// suggested rate (valley, slide, minimum, steep) and a plot; the weights are left as they were.
    LrFind(Box<lr_find::LrFindArgs>),
    /// Write a run's best weights and their metadata as one deployment safetensors file.
    Export(export::ExportArgs),
    /// Accuracy, confusion matrix and per-class scores of an exported model on an image folder.
    Eval(eval::EvalArgs),
    /// Unsupervised greedy layer-wise pretraining (stacked autoencoders, RBMs) on unlabelled images.
    Pretrain(Box<pretrain::PretrainArgs>),
    /// Hyperparameter search over fine-tuning runs (grid, random, Bayesian), or `search show STUDY`.
    Search(Box<search::SearchArgs>),
    /// Convert a PyTorch checkpoint (.pth/.pt/.bin, zip or legacy format) to safetensors.
    Convert(convert::ConvertArgs),
}

/// Flags shared by every command that builds a model from a base.
#[derive(Debug, Args, Clone)]
pub struct BaseArgs {
    /// Base model name, as in models/*.json (resnet18/34/50, efficientnet_lite0/1/2, convnext_atto..small, vit_small_patch16_224; `graft models` lists them).
    #[arg(long)]
    pub base: Option<String>,
    /// Local weights file (.safetensors, or a PyTorch .pth/.pt/.bin) instead of the hub/cache lookup.
    #[arg(long)]
    pub weights: Option<std::path::PathBuf>,
    /// Device to run on: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The long flags given on this process's command line to subcommand `sub` (not those left at their defaults),
/// e.g. to tell a user which flags `--resume` ignores. Empty when the process was not started as `graft`
/// (library tests).
pub fn flags_given(sub: &str) -> Vec<String> {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let Ok(matches) = Cli::command().try_get_matches_from(std::env::args_os()) else {
        return Vec::new();
    };
    let Some(m) = matches.subcommand_matches(sub) else {
        return Vec::new();
    };
    m.ids()
        // Argument groups (clap names them after their struct, `FinetuneArgs`) are not flags.
        .filter(|id| !id.as_str().starts_with(|c: char| c.is_ascii_uppercase()))
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| format!("--{}", id.as_str().replace('_', "-")))
        .collect()
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Predict(a) => predict::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Models(a) => models::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Finetune(a) => finetune::run(*a),
        Command::Export(a) => export::run(a),
        Command::LrFind(a) => lr_find::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Pretrain(a) => pretrain::run(*a),
        Command::Search(a) => search::run(*a),
    }
}
