//! `graft pretrain`: flags in, a validated [`PretrainConfig`] out, then the greedy layer-wise loop.

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

use crate::cli::shared::{set, shared_fields, TrainArgs};
use crate::models::encoder::EncoderConfig;
use crate::optim::OptimizerConfig;
use crate::pretrain::config::{Method, Noise, PretrainConfig, Sparsity};
use crate::pretrain::{pretrain, pretrain_new};
use crate::train::checkpoint::RunDir;
use crate::train::runner::RunOptions;

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Encoder: dense:IN,UNITS,...[:selu|relu|sigmoid|tanh] (e.g. dense:784,300,150) or
    /// conv:FILTERS,...[:ACT][:rgb] (e.g. conv:32,64,128: stride-2 convolutions, grey unless :rgb).
    /// Required unless --config gives it.
    #[arg(long, conflicts_with = "resume")]
    pub arch: Option<String>,
    /// How the stages train (RBM: Bernoulli-Bernoulli, CD-k; dense sigmoid stacks).
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// A folder of images, with or without class subfolders (labels are ignored). Required unless --config
    /// gives it.
    #[arg(long, conflicts_with = "resume")]
    pub data: Option<PathBuf>,
    /// Use at most N images (a seeded random subset).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Square input size (default: what a dense arch implies, else 28).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Epochs of each greedy stage.
    #[arg(long)]
    pub stage_epochs: Option<usize>,
    /// Epochs of end-to-end fine-tuning of the whole stack afterwards (0: none).
    #[arg(long)]
    pub finetune_epochs: Option<usize>,
    #[command(flatten)]
    pub train: TrainArgs,
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
    #[arg(long)]
    pub cd_k: Option<usize>,
}

/// What `--help` shows as the defaults: [`PretrainConfig::default`], under the flags' names, less what
/// depends on the method or the arch (the flags' help says it).
pub fn help_defaults() -> serde_json::Value {
    let mut v = serde_json::to_value(PretrainConfig::default()).expect("a config serialises");
    let obj = v.as_object_mut().expect("a config is an object");
    for derived in ["lr", "optimizer", "image_size"] {
        obj.remove(derived);
    }
    v
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

/// The square size and channels of the images `enc` reads, `size` given or not.
fn input_shape(enc: &EncoderConfig, size: Option<usize>) -> anyhow::Result<(usize, usize)> {
    Ok(match (enc.implied_input(), size) {
        (_, Some(s)) if enc.is_dense() => {
            let n = enc.widths()[0];
            let c = if n == s * s { 1 } else { 3 };
            (c, s)
        }
        (Some(input), None) => input,
        (_, Some(s)) => (enc.widths()[0], s),
        (None, None) if enc.is_dense() => bail!(
            "--arch {}: {} input values are no square grey or RGB image; give --image-size",
            enc.arch(),
            enc.widths()[0]
        ),
        (None, None) => (enc.widths()[0], 28),
    })
}

/// The config `graft pretrain` runs: the `--config` file (or [`PretrainConfig::default`]) with the flags
/// given on the command line over it. What depends on the method or the arch is filled in only where neither
/// the file nor a flag says it: the rate and optimizer of an RBM, the input size and channels the arch
/// implies. RBMs are always tied. Not validated here: the caller validates it, once.
pub fn config_from_args(args: &PretrainArgs) -> anyhow::Result<PretrainConfig> {
    let (mut cfg, file) = args.train.start::<PretrainConfig>()?;
    if args.train.lr == Some(crate::cli::shared::LrFlag::Auto) {
        bail!("--lr auto is for finetune; pretrain takes a number (its default: 1e-3 for autoencoders, 0.05 for RBMs)");
    }
    set(&mut cfg.arch, args.arch.clone());
    set(&mut cfg.data, args.data.clone());
    if cfg.arch.is_empty() {
        bail!("--arch is required (e.g. --arch dense:784,300,150), unless --config FILE gives it, or --resume RUN_DIR");
    }
    if cfg.data.as_os_str().is_empty() {
        bail!("--data DIR is required (a folder of images, class subfolders optional), unless --config FILE gives it");
    }
    let enc = EncoderConfig::parse(&cfg.arch)?;
    cfg.arch = enc.arch();
    set(&mut cfg.method, args.method);
    if args.max_images.is_some() {
        cfg.max_images = args.max_images;
    }
    set(&mut cfg.stage_epochs, args.stage_epochs);
    set(&mut cfg.finetune_epochs, args.finetune_epochs);
    set(&mut cfg.cd_k, args.cd_k);
    if let Some(n) = &args.noise {
        cfg.noise = Some(parse_noise(n)?);
    }
    if let Some(s) = &args.sparsity {
        cfg.sparsity = Some(parse_sparsity(s)?);
    }
    let rbm = cfg.method == Method::Rbm;
    cfg.tied |= args.tied || rbm;
    let file_sets = |field: &str| file.get(field).is_some();
    if !file_sets("lr") {
        cfg.lr = cfg.method.default_lr();
    }
    if !file_sets("optimizer") {
        cfg.optimizer = OptimizerConfig::from_kind(cfg.method.default_optimizer())?;
    }
    let shape_given = args.arch.is_some() || args.image_size.is_some();
    if shape_given || !file_sets("image_size") || !file_sets("channels") {
        let size = args
            .image_size
            .or_else(|| file_sets("image_size").then_some(cfg.image_size));
        (cfg.channels, cfg.image_size) = input_shape(&enc, size)?;
    }
    args.train.apply(shared_fields!(cfg))?;
    Ok(cfg)
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let opts = RunOptions {
        quiet: args.train.quiet,
        stop_after: args.train.stop_after,
        ..RunOptions::default()
    };
    let outcome = if let Some(dir) = &args.train.resume {
        let run_dir = RunDir::open_to_resume(dir)?;
        let cfg: PretrainConfig = run_dir
            .read_config()
            .with_context(|| format!("reading the config of run {}", dir.display()))?;
        pretrain(&cfg, &run_dir, true, &opts)?
    } else {
        let cfg = config_from_args(&args)?;
        pretrain_new(&cfg, args.train.run_dir.as_deref(), &opts)?
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(flags: &[&str]) -> anyhow::Result<PretrainConfig> {
        let mut argv = vec!["graft", "pretrain"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv)?.command {
            Command::Pretrain(a) => config_from_args(&a),
            _ => unreachable!("parsed a pretrain command"),
        }
    }

    #[test]
    fn only_arch_and_data_give_the_default_config() {
        // 784 inputs imply 28x28 grey, the default's input.
        let cfg = parse(&["--arch", "dense:784,300,150", "--data", "d"]).unwrap();
        let expected = PretrainConfig {
            arch: "dense:784,300,150:selu".into(),
            data: "d".into(),
            ..PretrainConfig::default()
        };
        assert_eq!(cfg, expected);
    }

    #[test]
    fn an_rbm_takes_its_own_rate_and_optimizer_unless_told_otherwise() {
        let rbm = [
            "--arch",
            "dense:784,64:sigmoid",
            "--data",
            "d",
            "--method",
            "rbm",
        ];
        let cfg = parse(&rbm).unwrap();
        assert_eq!(
            (cfg.lr, cfg.optimizer.kind(), cfg.tied),
            (0.05, "momentum", true)
        );
        let cfg = parse(&[&rbm[..], &["--lr", "0.1", "--optimizer", "sgd"]].concat()).unwrap();
        assert_eq!((cfg.lr, cfg.optimizer.kind()), (0.1, "sgd"));
    }

    #[test]
    fn a_config_file_is_the_start_and_flags_given_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "arch = \"dense:256,16\"\ndata = \"d\"\nimage_size = 16\nchannels = 1\nlr = 0.01\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let cfg = parse(&["--config", path]).unwrap();
        assert_eq!(
            (cfg.arch.as_str(), cfg.image_size, cfg.lr),
            ("dense:256,16:selu", 16, 0.01)
        );
        let cfg = parse(&["--config", path, "--batch-size", "4", "--method", "ae"]).unwrap();
        assert_eq!((cfg.batch_size, cfg.lr), (4, 0.01));
        let err = parse(&["--data", "d"]).unwrap_err().to_string();
        assert!(err.contains("--arch") && err.contains("--config"), "{err}");
    }
}
