//! `graft pretrain`: flags in, a validated [`PretrainConfig`] out, then the greedy layer-wise loop.

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

use crate::models::encoder::EncoderConfig;
use crate::optim::OptimizerConfig;
use crate::pretrain::config::{Method, Noise, PretrainConfig, Sparsity};
use crate::pretrain::pretrain;
use crate::train::checkpoint::RunDir;
use crate::train::config::ScheduleKind;
use crate::train::runner::RunOptions;

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Encoder: dense:IN,UNITS,...[:selu|relu|sigmoid|tanh] (e.g. dense:784,300,150) or
    /// conv:FILTERS,...[:ACT][:rgb] (e.g. conv:32,64,128: stride-2 convolutions, grey unless :rgb).
    #[arg(long)]
    pub arch: Option<String>,
    /// autoencoder|rbm (RBM: Bernoulli-Bernoulli, CD-k; dense sigmoid stacks).
    #[arg(long, default_value = "autoencoder")]
    pub method: String,
    /// A folder of images, with or without class subfolders (labels are ignored).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use at most N images (a seeded random subset).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Fraction held out to measure the reconstruction loss.
    #[arg(long, default_value_t = 0.1)]
    pub val_split: f64,
    /// Square input size (default: what a dense arch implies, else 28).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Epochs of each greedy stage.
    #[arg(long, default_value_t = 5)]
    pub stage_epochs: usize,
    /// Epochs of end-to-end fine-tuning of the whole stack afterwards (0: none).
    #[arg(long, default_value_t = 0)]
    pub finetune_epochs: usize,
    /// Learning rate (default: 1e-3 for autoencoders, 0.05 for RBMs).
    #[arg(long)]
    pub lr: Option<f64>,
    /// sgd|momentum|nesterov|adagrad|rmsprop|adam|adamw|nadam (default: adam; momentum for RBMs).
    #[arg(long)]
    pub optimizer: Option<String>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// constant|step|exponential|cosine|onecycle|plateau (one schedule per phase).
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Tie decoder weights to the encoder's (transposed). RBMs are always tied.
    #[arg(long)]
    pub tied: bool,
    /// Denoising: gaussian:STD or dropout:RATE on each stage's input while it trains.
    #[arg(long)]
    pub noise: Option<String>,
    /// Sparsity penalty on the codes: kl:TARGET:WEIGHT (sigmoid codes) or l1:WEIGHT.
    #[arg(long)]
    pub sparsity: Option<String>,
    /// Gibbs steps of contrastive divergence (RBMs).
    #[arg(long, default_value_t = 1)]
    pub cd_k: usize,
    /// Stop a phase after this many epochs without validation improvement.
    #[arg(long)]
    pub patience: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub min_delta: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The run folder (default: a fresh runs/YYYYmmdd-HHMMSS).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue an interrupted run at the next epoch of its current stage.
    #[arg(long, conflicts_with_all = ["arch", "data"])]
    pub resume: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
    /// Stop after N epochs of this invocation, as an interruption would (resume continues).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

fn parse_f64(s: &str, flag: &str) -> anyhow::Result<f64> {
    s.parse()
        .with_context(|| format!("{flag}: `{s}` is not a number"))
}

fn parse_noise(s: &str) -> anyhow::Result<Noise> {
    match s.split_once(':') {
        Some(("gaussian", v)) => Ok(Noise::Gaussian {
            std: parse_f64(v, "--noise")?,
        }),
        Some(("dropout", v)) => Ok(Noise::Dropout {
            rate: parse_f64(v, "--noise")?,
        }),
        _ => bail!("--noise: `{s}` is not gaussian:STD or dropout:RATE"),
    }
}

fn parse_sparsity(s: &str) -> anyhow::Result<Sparsity> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        ["kl", t, w] => Ok(Sparsity::Kl {
            target: parse_f64(t, "--sparsity")?,
            weight: parse_f64(w, "--sparsity")?,
        }),
        ["l1", w] => Ok(Sparsity::L1 {
            weight: parse_f64(w, "--sparsity")?,
        }),
        _ => bail!("--sparsity: `{s}` is not kl:TARGET:WEIGHT or l1:WEIGHT"),
    }
}

/// Turns the flags into a validated config.
pub fn config_from_args(args: &PretrainArgs) -> anyhow::Result<PretrainConfig> {
    let Some(arch) = args.arch.clone() else {
        bail!("--arch is required (e.g. --arch dense:784,300,150), or --resume RUN_DIR");
    };
    let Some(data) = args.data.clone() else {
        bail!("--data DIR is required: a folder of images (class subfolders optional)");
    };
    let enc = EncoderConfig::parse(&arch)?;
    let method = match args.method.as_str() {
        "autoencoder" | "ae" => Method::Autoencoder,
        "rbm" => Method::Rbm,
        other => bail!("--method: `{other}` is not autoencoder|rbm"),
    };
    let (channels, size) = match (enc.implied_input(), args.image_size) {
        (_, Some(s)) if enc.is_dense() => {
            let n = enc.widths()[0];
            let c = if n == s * s { 1 } else { 3 };
            (c, s)
        }
        (Some(input), None) => input,
        (_, Some(s)) => (enc.widths()[0], s),
        (None, None) if enc.is_dense() => bail!(
            "--arch {arch}: {} input values are no square grey or RGB image; give --image-size",
            enc.widths()[0]
        ),
        (None, None) => (enc.widths()[0], 28),
    };
    let rbm = method == Method::Rbm;
    let kind = args
        .optimizer
        .clone()
        .unwrap_or_else(|| if rbm { "momentum" } else { "adam" }.into());
    let mut optimizer = OptimizerConfig::from_kind(&kind)?;
    if let Some(wd) = args.weight_decay {
        let mut v = serde_json::to_value(&optimizer)?;
        v["weight_decay"] = wd.into();
        optimizer = serde_json::from_value(v)?;
    }
    let schedule: ScheduleKind =
        serde_json::from_value(serde_json::json!(args.schedule)).map_err(|_| {
            anyhow::anyhow!(
                "--schedule: `{}` is not constant|step|exponential|cosine|onecycle|plateau",
                args.schedule
            )
        })?;
    let cfg = PretrainConfig {
        arch: enc.arch(),
        method,
        data,
        max_images: args.max_images,
        val_split: args.val_split,
        image_size: size,
        channels,
        batch_size: args.batch_size,
        stage_epochs: args.stage_epochs,
        finetune_epochs: args.finetune_epochs,
        lr: args.lr.unwrap_or(if rbm { 0.05 } else { 1e-3 }),
        optimizer,
        schedule,
        clip_grad_norm: args.clip_grad_norm,
        tied: args.tied || rbm,
        noise: args.noise.as_deref().map(parse_noise).transpose()?,
        sparsity: args.sparsity.as_deref().map(parse_sparsity).transpose()?,
        cd_k: args.cd_k,
        patience: args.patience,
        min_delta: args.min_delta,
        seed: args.seed,
        device: args.device.clone(),
    };
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let opts = RunOptions {
        quiet: args.quiet,
        stop_after: args.stop_after,
        ..RunOptions::default()
    };
    let outcome = if let Some(dir) = &args.resume {
        let run_dir = RunDir::open_to_resume(dir)?;
        let cfg: PretrainConfig = run_dir
            .read_config()
            .with_context(|| format!("reading the config of run {}", dir.display()))?;
        pretrain(&cfg, &run_dir, true, &opts)?
    } else {
        let cfg = config_from_args(&args)?;
        let run_dir = RunDir::create(args.run_dir.as_deref())?;
        eprintln!("run folder: {}", run_dir.path().display());
        pretrain(&cfg, &run_dir, false, &opts)?
    };
    match &outcome.encoder {
        None => println!(
            "interrupted after epoch {}; continue with --resume {}",
            outcome.epochs_run,
            outcome.run_dir.display()
        ),
        Some(encoder) => println!(
            "val reconstruction MSE {:.5}, encoder {}; fine-tune with --base ae:{}",
            outcome.val_loss,
            encoder.display(),
            outcome.run_dir.display()
        ),
    }
    Ok(())
}
