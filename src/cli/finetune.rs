//! `graft finetune`: flags in, a validated [`FinetuneConfig`] out, then the one training loop.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

use crate::cli::shared::{set, shared_fields, LrFlag, TrainArgs};
use crate::models::base;
use crate::models::head::{Activation, Init};
use crate::train::checkpoint::RunDir;
use crate::train::config::{AutoAugmentKind, FinetuneConfig};
use crate::train::early_stop::Monitor;
use crate::train::finetune::{finetune, finetune_new};
use crate::train::runner::RunOptions;

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// Base model (models/*.json): resnet18/34/50, efficientnet_lite0/1/2, convnext_atto..small, vit_small_patch16_224 (`graft models`); an encoder from random
    /// initialisation, dense:784,300,150 or conv:32,64,128; or a pretraining run's encoder, ae:RUN_DIR.
    /// Required unless --config gives it.
    #[arg(long, conflicts_with = "resume")]
    pub base: Option<String>,
    /// Local pretrained weights instead of the hub/cache lookup.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Start from random initialisation instead of pretrained weights (same architecture).
    #[arg(long)]
    pub random_init: bool,
    /// Image folder: DIR/<class>/*.jpg, or DIR/train, DIR/val (or valid), DIR/test. Required unless --config
    /// gives it.
    #[arg(long, conflicts_with = "resume")]
    pub data: Option<PathBuf>,
    /// Square input size (default: the model card's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Evaluation crop fraction: resize the short side to size/crop_pct, centre-crop (default: the card's;
    /// 1.0 feeds images that already have the input size unchanged).
    #[arg(long)]
    pub crop_pct: Option<f64>,
    /// Epochs with the whole backbone frozen (only the head trains), first.
    #[arg(long)]
    pub freeze_epochs: Option<usize>,
    /// Epochs after the frozen ones, with the backbone unfrozen (`--freeze-epochs K --epochs 0`: linear probe).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Ratio of the head's learning rate to the stem's once unfrozen (1: one rate for every group).
    #[arg(long)]
    pub lr_mult: Option<f64>,
    /// Layer-wise learning-rate decay instead of --lr-mult (timm's `--layer-decay`, e.g. 0.75 for ViT): the
    /// head at the full rate, each layer below (a ViT's block, another backbone's group) this times the one
    /// above.
    #[arg(long)]
    pub layer_decay: Option<f64>,
    /// Stochastic depth (timm's `--drop-path`, e.g. 0.1): the last block's residual branch is dropped
    /// for a sample with this probability in training, earlier blocks' linearly less (ConvNeXt,
    /// EfficientNet-B, MobileNetV3, ViT/DeiT). Default 0.
    #[arg(long, value_name = "RATE")]
    pub drop_path: Option<f32>,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Hidden layer width of the head (default: a single linear layer).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Dropout before each linear layer of the head (default: the model card's, e.g. 0.2 for
    /// EfficientNet-Lite as in its original training, 0 for ResNet).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// The head's init (default: torch, nn.Linear's own, for a linear head; He for a ReLU hidden layer, Xavier for
    /// other hidden layers).
    #[arg(long, value_enum, ignore_case = true)]
    pub init: Option<Init>,
    /// Activation of the hidden layer.
    #[arg(long, value_enum)]
    pub activation: Option<Activation>,
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Mixup with this Beta alpha (timm's 0.8): each batch blended with its mirror, labels alike (0: off).
    #[arg(long)]
    pub mixup: Option<f64>,
    /// CutMix with this Beta alpha (timm's 1.0): a box pasted from the mirror image, labels weighed by its
    /// area (0: off). With --mixup too, each batch is one or the other.
    #[arg(long)]
    pub cutmix: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999; warmed up as
    /// min(decay, (1+n)/(10+n))): validation, the best checkpoint and the export use the average.
    #[arg(long)]
    pub ema: Option<f64>,
    /// Gradient accumulation: average the gradients of N batches into each optimizer step.
    #[arg(long)]
    pub accumulate: Option<usize>,
    /// `auto`: weight the loss by inverse class frequency; `none`.
    #[arg(long, value_enum)]
    pub class_weights: Option<ClassWeights>,
    /// Class-balanced sampling of training batches (with replacement).
    #[arg(long)]
    pub balanced: bool,
    /// Random resized crops and horizontal flips while training.
    #[arg(long)]
    pub augment: bool,
    /// An automatic augmentation policy after the crop and flip, as torchvision has it on PIL images:
    /// `trivial` (TrivialAugmentWide) or `rand` (RandAugment, 2 ops at magnitude 9); implies --augment.
    #[arg(long, value_enum)]
    pub auto_augment: Option<AutoAugmentKind>,
    /// Probability of erasing a random box of each normalised training image with noise (timm's
    /// RandomErasing, mode pixel); above 0 implies --augment.
    #[arg(long, value_name = "P")]
    pub random_erasing: Option<f64>,
    /// The validation number --patience watches and the best epoch is chosen by.
    #[arg(long, value_enum)]
    pub monitor: Option<Monitor>,
    /// Groups kept frozen throughout, a prefix of the backbone's groups, e.g. `stem,layer1`.
    #[arg(long, value_delimiter = ',')]
    pub freeze: Vec<String>,
    /// Train from this group on (the groups before it stay frozen).
    #[arg(long)]
    pub train_from: Option<String>,
    /// Gradual unfreezing after the frozen epochs: `3:layer4,6:layer3` unfreezes layer4 (and what follows)
    /// from epoch 3 and layer3 from epoch 6 (1-based epochs).
    #[arg(long, value_delimiter = ',')]
    pub unfreeze_at: Vec<String>,
    /// Keep BatchNorm scales and shifts trainable inside frozen groups (fastai's train_bn); their running
    /// statistics stay as loaded.
    #[arg(long)]
    pub train_bn: bool,
    /// Memory budget (MiB) for computing a frozen prefix once: while the first groups are frozen and
    /// no augmentation is on (--augment, --auto-augment, --random-erasing), their outputs are cached and later epochs run only the rest (0: never cache).
    #[arg(long)]
    pub cache_mb: Option<usize>,
    /// Keep those computed outputs in DIR and reuse them in later runs on the same images, base and size
    /// (`graft search` gives its trials one per study). Results are the same with or without it.
    #[arg(long, value_name = "DIR")]
    pub feature_store: Option<PathBuf>,
    /// Steps whose loss is not finite (inf, NaN) that are skipped, without an update, before the run stops with
    /// an error; the last good checkpoint is kept.
    #[arg(long)]
    pub max_bad_steps: Option<usize>,
}

/// `--class-weights`: the flag's names for [`FinetuneConfig::class_weights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClassWeights {
    Auto,
    None,
}

/// What `--help` shows as the defaults: [`FinetuneConfig::default`], under the flags' names.
pub fn help_defaults() -> serde_json::Value {
    let d = FinetuneConfig::default();
    let mut v = serde_json::to_value(&d).expect("a config serialises");
    v["optimizer"] = d.optimizer.kind().into();
    v["activation"] = serde_json::to_value(d.head.activation).expect("an enum serialises");
    v["class_weights"] = if d.class_weights { "auto" } else { "none" }.into();
    v
}

fn group_index(names: &[String], name: &str, flag: &str) -> anyhow::Result<usize> {
    names
        .iter()
        .position(|n| n == name)
        .with_context(|| format!("{flag}: no group `{name}`; groups are {}", names.join(", ")))
}

/// The config `graft finetune` runs: the `--config` file (or [`FinetuneConfig::default`]) with the flags given
/// on the command line over it. Group names are turned into counts against the base's groups. What depends on
/// the base is filled in only where neither the file nor a flag says it: the head's dropout (the model card's)
/// and init ([`Init::default_for`]: torch for a linear head, He for a ReLU hidden layer, Xavier otherwise). Not validated here: the run validates it, once.
pub fn config_from_args(args: &FinetuneArgs) -> anyhow::Result<FinetuneConfig> {
    let (mut cfg, file) = args.train.start::<FinetuneConfig>()?;
    set(&mut cfg.base, args.base.clone());
    set(&mut cfg.data, args.data.clone());
    if cfg.base.is_empty() {
        bail!("--base NAME is required (e.g. --base resnet18), unless --config FILE gives it, or --resume RUN_DIR");
    }
    if cfg.data.as_os_str().is_empty() {
        bail!("--data DIR is required (a folder with one subfolder of images per class), unless --config FILE gives it");
    }
    if args.weights.is_some() {
        cfg.weights = args.weights.clone();
    }
    cfg.pretrained &= !args.random_init;
    if args.image_size.is_some() {
        cfg.image_size = args.image_size;
    }
    if args.crop_pct.is_some() {
        cfg.crop_pct = args.crop_pct;
    }
    set(&mut cfg.freeze_epochs, args.freeze_epochs);
    set(&mut cfg.epochs, args.epochs);
    set(&mut cfg.lr_mult, args.lr_mult);
    if args.layer_decay.is_some() {
        cfg.layer_decay = args.layer_decay;
    }
    set(&mut cfg.drop_path, args.drop_path);
    set(&mut cfg.label_smoothing, args.label_smoothing);
    set(&mut cfg.mixup, args.mixup);
    set(&mut cfg.cutmix, args.cutmix);
    set(&mut cfg.accumulate, args.accumulate);
    if args.ema.is_some() {
        cfg.ema = args.ema;
    }
    set(
        &mut cfg.class_weights,
        args.class_weights.map(|c| c == ClassWeights::Auto),
    );
    cfg.balanced |= args.balanced;
    cfg.augment |= args.augment;
    set(&mut cfg.auto_augment, args.auto_augment);
    set(&mut cfg.random_erasing, args.random_erasing);
    cfg.train_bn |= args.train_bn;
    set(&mut cfg.monitor, args.monitor);
    set(&mut cfg.cache_mb, args.cache_mb);
    set(&mut cfg.max_bad_steps, args.max_bad_steps);
    args.train.apply(shared_fields!(cfg))?;
    if args.train.lr == Some(LrFlag::Auto) {
        cfg.lr_find = Some(crate::train::lr_find::Suggestion::Valley);
        cfg.lr_found = None;
    } else if args.train.lr.is_some() {
        cfg.lr_find = None;
    }

    let resolved = base::resolve(&cfg.base)?;
    let groups = resolved.group_names()?;
    if !args.freeze.is_empty() || args.train_from.is_some() {
        cfg.frozen_prefix = 0;
    }
    for (i, name) in args.freeze.iter().enumerate() {
        let idx = group_index(&groups, name, "--freeze")?;
        if idx != i && !args.freeze.iter().any(|n| groups.get(i) == Some(n)) {
            bail!(
                "--freeze: frozen groups must be a prefix of {} (earlier groups cannot train while later ones are frozen)",
                groups.join(",")
            );
        }
        cfg.frozen_prefix = cfg.frozen_prefix.max(idx + 1);
    }
    if let Some(g) = &args.train_from {
        cfg.frozen_prefix = cfg
            .frozen_prefix
            .max(group_index(&groups, g, "--train-from")?);
    }
    if !args.unfreeze_at.is_empty() {
        cfg.unfreeze_at.clear();
    }
    for item in &args.unfreeze_at {
        let (epoch, group) = item
            .split_once(':')
            .with_context(|| format!("--unfreeze-at: `{item}` is not EPOCH:GROUP"))?;
        let epoch: usize = epoch
            .parse()
            .with_context(|| format!("--unfreeze-at: `{epoch}` is not an epoch number"))?;
        cfg.unfreeze_at
            .push((epoch, group_index(&groups, group, "--unfreeze-at")?));
    }

    let head = &mut cfg.head;
    if args.hidden.is_some() {
        head.hidden = args.hidden;
    }
    set(&mut head.activation, args.activation);
    match args.dropout {
        Some(d) => head.dropout = d,
        None if file.pointer("/head/dropout").is_none() => head.dropout = resolved.head_dropout,
        None => {}
    }
    match args.init {
        Some(i) => head.init = i,
        None if file.pointer("/head/init").is_none() => {
            head.init = Init::default_for(head.hidden, head.activation)
        }
        None => {}
    }
    Ok(cfg)
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let opts = RunOptions {
        quiet: args.train.quiet,
        stop_after: args.train.stop_after,
        on_epoch: None,
        feature_store: args.feature_store.clone(),
    };
    let outcome = if let Some(dir) = &args.train.resume {
        let ignored: Vec<String> = crate::cli::flags_given("finetune")
            .into_iter()
            .filter(|f| !["--resume", "--quiet", "--stop-after"].contains(&f.as_str()))
            .collect();
        if !ignored.is_empty() {
            eprintln!(
                "warning: --resume continues the run with its own settings ({}); ignoring {}",
                dir.join("config.json").display(),
                ignored.join(" ")
            );
        }
        let run_dir = RunDir::open_to_resume(dir)?;
        if !run_dir.config_path().exists() {
            bail!(
                "{} stopped before it wrote its config.json, so there is nothing to continue: run the same `graft finetune` command again with `--run-dir {}` (the folder is reused)",
                dir.display(),
                dir.display()
            );
        }
        let cfg: FinetuneConfig = run_dir
            .read_config()
            .with_context(|| format!("reading the config of run {}", dir.display()))?;
        finetune(&cfg, &run_dir, true, &opts)?
    } else {
        let cfg = config_from_args(&args)?;
        finetune_new(&cfg, args.train.run_dir.as_deref(), &opts)?
    };
    println!("{}", final_line(&outcome));
    Ok(())
}

/// The last line of a run, for people: the best epoch and the accuracy of the weights the run ended with.
fn final_line(o: &crate::train::finetune::Outcome) -> String {
    let folder = o.run_dir.display();
    if !o.val_acc.is_finite() {
        return format!(
            "no validation images (the run kept its last epoch's weights), run folder {folder}"
        );
    }
    match o.best_epoch {
        Some(e) => format!(
            "best epoch {e}, val accuracy {:.2}%, run folder {folder}",
            o.val_acc * 100.0
        ),
        None => format!(
            "val accuracy {:.2}% (last epoch), run folder {folder}",
            o.val_acc * 100.0
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::models::head::HeadConfig;
    use crate::optim::OptimizerConfig;
    use clap::Parser;

    fn parse(flags: &[&str]) -> anyhow::Result<FinetuneConfig> {
        let mut argv = vec!["graft", "finetune"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv)?.command {
            Command::Finetune(a) => config_from_args(&a),
            _ => unreachable!("parsed a finetune command"),
        }
    }

    #[test]
    fn only_base_and_data_give_the_default_config() {
        // A dense encoder has no card, so nothing about its head depends on the base.
        let cfg = parse(&["--base", "dense:256,16", "--data", "d"]).unwrap();
        let expected = FinetuneConfig {
            base: "dense:256,16".into(),
            data: "d".into(),
            ..FinetuneConfig::default()
        };
        assert_eq!(cfg, expected);
    }

    #[test]
    fn the_cards_head_dropout_fills_in_unless_a_flag_or_the_file_sets_it() {
        let dir = tempfile::tempdir().unwrap();
        let lite = ["--base", "efficientnet_lite0", "--data", "d"];
        assert_eq!(parse(&lite).unwrap().head.dropout, 0.2);
        let file = dir.path().join("c.json");
        std::fs::write(&file, r#"{"head": {"dropout": 0.0}}"#).unwrap();
        let with_file = [&lite[..], &["--config", file.to_str().unwrap()]].concat();
        assert_eq!(parse(&with_file).unwrap().head.dropout, 0.0);
        let flag = [&with_file[..], &["--dropout", "0.4"]].concat();
        assert_eq!(parse(&flag).unwrap().head.dropout, 0.4);
    }

    #[test]
    fn a_config_file_is_the_start_and_flags_given_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.json");
        let start = FinetuneConfig {
            base: "dense:256,16".into(),
            data: "d".into(),
            lr: 0.05,
            epochs: 2,
            optimizer: OptimizerConfig::from_kind("sgd").unwrap(),
            head: HeadConfig::with_hidden(8, 0.1, Activation::Tanh),
            ..FinetuneConfig::default()
        };
        std::fs::write(&file, serde_json::to_string(&start).unwrap()).unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(parse(&["--config", path]).unwrap(), start);
        let cfg = parse(&["--config", path, "--epochs", "7", "--momentum", "0.5"]);
        assert!(
            cfg.unwrap_err().to_string().contains("--momentum"),
            "sgd has no momentum"
        );
        let cfg = parse(&["--config", path, "--epochs", "7", "--optimizer", "adam"]).unwrap();
        assert_eq!((cfg.epochs, cfg.lr), (7, 0.05));
        assert_eq!(cfg.optimizer, OptimizerConfig::from_kind("adam").unwrap());
        assert_eq!(cfg.head, start.head);
    }

    #[test]
    fn base_and_data_are_required_unless_the_file_gives_them() {
        let err = parse(&["--data", "d"]).unwrap_err().to_string();
        assert!(err.contains("--base") && err.contains("--config"), "{err}");
        let err = parse(&["--base", "resnet18"]).unwrap_err().to_string();
        assert!(err.contains("--data"), "{err}");
    }

    #[test]
    fn enumerated_flags_take_todays_spellings_and_list_the_valid_ones() {
        let cfg = parse(&[
            "--base",
            "dense:256,16",
            "--data",
            "d",
            "--init",
            "Kaiming",
            "--monitor",
            "val_acc",
            "--class-weights",
            "auto",
            "--schedule",
            "plateau",
            "--optimizer",
            "nadam",
        ])
        .unwrap();
        assert_eq!(cfg.head.init, Init::He);
        assert_eq!(cfg.monitor, Monitor::ValAcc);
        assert!(cfg.class_weights);
        let err = parse(&["--optimizer", "lion"]).unwrap_err().to_string();
        assert!(
            err.contains("lion") && err.contains("adamw") && err.contains("nadam"),
            "{err}"
        );
        let err = parse(&["--activation", "linear"]).unwrap_err().to_string();
        assert!(err.contains("relu, tanh, sigmoid"), "{err}");
    }

    #[test]
    fn augmentation_flags_set_the_policy_and_erasing_and_imply_augment() {
        let base = ["--base", "dense:256,16", "--data", "d"];
        let cfg = parse(
            &[
                &base[..],
                &["--auto-augment", "trivial", "--random-erasing", "0.25"],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(cfg.auto_augment, AutoAugmentKind::Trivial);
        assert_eq!(cfg.random_erasing, 0.25);
        assert!(
            !cfg.augment,
            "the config keeps what was asked; augmentation() implies the crop"
        );
        let aug = cfg.augmentation().unwrap();
        assert_eq!(
            (aug.auto, aug.erasing),
            (Some(crate::data::AutoAugment::TrivialWide), 0.25)
        );
        let err = parse(&[&base[..], &["--auto-augment", "auto"]].concat())
            .unwrap_err()
            .to_string();
        assert!(err.contains("none, trivial, rand"), "{err}");
        let cfg = parse(&[&base[..], &["--random-erasing", "1.5"]].concat()).unwrap();
        let err = crate::train::config::validate(&cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--random-erasing"), "{err}");
    }
}
