//! `graft finetune`: flags in, a validated [`FinetuneConfig`] out, then the one training loop.

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

use crate::models::base;
use crate::models::head::{Activation, HeadConfig, Init};
use crate::optim::OptimizerConfig;
use crate::train::checkpoint::RunDir;
use crate::train::config::{FinetuneConfig, ScheduleKind};
use crate::train::early_stop::Monitor;
use crate::train::finetune::{finetune, finetune_new};
use crate::train::runner::RunOptions;

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// Base model (models/*.json): resnet18, resnet34, resnet50, efficientnet_lite0; an encoder from random
    /// initialisation, dense:784,300,150 or conv:32,64,128; or a pretraining run's encoder, ae:RUN_DIR.
    #[arg(long)]
    pub base: Option<String>,
    /// Local pretrained weights instead of the hub/cache lookup.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Start from random initialisation instead of pretrained weights (same architecture).
    #[arg(long)]
    pub random_init: bool,
    /// Image folder: DIR/<class>/*.jpg, or DIR/train, DIR/val (or valid), DIR/test.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Fraction of the training images held out for validation when there is no val/ folder.
    #[arg(long, default_value_t = 0.2)]
    pub val_split: f64,
    /// Square input size (default: the model card's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Evaluation crop fraction: resize the short side to size/crop_pct, centre-crop (default: the card's;
    /// 1.0 feeds images that already have the input size unchanged).
    #[arg(long)]
    pub crop_pct: Option<f64>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Epochs with the whole backbone frozen (only the head trains), first.
    #[arg(long, default_value_t = 1)]
    pub freeze_epochs: usize,
    /// Epochs after the frozen ones, with the backbone unfrozen (`--freeze-epochs K --epochs 0`: linear probe).
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Peak learning rate of the head; earlier groups get geometrically less, down to lr/lr-mult at the
    /// stem. With the one-cycle schedule and both phases, the unfrozen phase peaks at lr/2 (fastai's
    /// fine_tune, whose base_lr 2e-3 is the default).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Ratio of the head's learning rate to the stem's once unfrozen (1: one rate for every group).
    #[arg(long, default_value_t = 100.0)]
    pub lr_mult: f64,
    /// sgd|momentum|nesterov|adagrad|rmsprop|adam|adamw|nadam
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Weight decay (decoupled for adamw, L2 for the others); not applied to biases and BatchNorm.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Momentum for momentum/nesterov/rmsprop (beta1 for the Adam family).
    #[arg(long)]
    pub momentum: Option<f64>,
    /// constant|step|exponential|cosine|onecycle|plateau
    #[arg(long, default_value = "onecycle")]
    pub schedule: String,
    /// Clip gradients to this global L2 norm.
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Hidden layer width of the head (default: a single linear layer).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Dropout before each linear layer of the head (default: the model card's, e.g. 0.2 for
    /// EfficientNet-Lite as in its original training, 0 for ResNet).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// he|xavier|torch (default: He for a ReLU hidden layer, Xavier otherwise; torch: nn.Linear's own).
    #[arg(long)]
    pub init: Option<String>,
    /// Activation of the hidden layer: relu|tanh|sigmoid.
    #[arg(long, default_value = "relu")]
    pub activation: String,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// `auto`: weight the loss by inverse class frequency; `none`.
    #[arg(long, default_value = "none")]
    pub class_weights: String,
    /// Class-balanced sampling of training batches (with replacement).
    #[arg(long)]
    pub balanced: bool,
    /// Random resized crops and horizontal flips while training.
    #[arg(long)]
    pub augment: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this many epochs without improvement of --monitor, restoring the best weights.
    #[arg(long)]
    pub patience: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub min_delta: f64,
    /// val_loss|val_acc
    #[arg(long, default_value = "val_loss")]
    pub monitor: String,
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
    /// --augment is off, their outputs are cached and later epochs run only the rest (0: never cache).
    #[arg(long, default_value_t = 2048)]
    pub cache_mb: usize,
    /// Steps whose loss is not finite (inf, NaN) that are skipped, without an update, before the run stops with
    /// an error; the last good checkpoint is kept.
    #[arg(long, default_value_t = 3)]
    pub max_bad_steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The run folder (default: a fresh runs/YYYYmmdd-HHMMSS).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue an interrupted run from its last checkpoint (other flags are taken from the run).
    #[arg(long, conflicts_with_all = ["base", "data"])]
    pub resume: Option<PathBuf>,
    /// Epoch lines only, no progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Stop after N epochs of this invocation, as an interruption would (resume continues).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

fn group_index(names: &[String], name: &str, flag: &str) -> anyhow::Result<usize> {
    names
        .iter()
        .position(|n| n == name)
        .with_context(|| format!("{flag}: no group `{name}`; groups are {}", names.join(", ")))
}

/// Optimizer kind plus the hyperparameters given as flags, PyTorch's defaults for the rest.
fn optimizer_config(args: &FinetuneArgs) -> anyhow::Result<OptimizerConfig> {
    let base = OptimizerConfig::from_kind(&args.optimizer)?;
    let mut v = serde_json::to_value(&base)?;
    let obj = v.as_object_mut().expect("an optimizer config is an object");
    if let Some(wd) = args.weight_decay {
        obj.insert("weight_decay".into(), wd.into());
    }
    if let Some(m) = args.momentum {
        if obj.contains_key("momentum") {
            obj.insert("momentum".into(), m.into());
        } else if let Some(betas) = obj.get_mut("betas") {
            betas[0] = m.into();
        } else {
            bail!("--momentum: optimizer `{}` has no momentum", args.optimizer);
        }
    }
    let cfg: OptimizerConfig = serde_json::from_value(v)?;
    cfg.validate().with_context(|| {
        format!(
            "--optimizer {} with --momentum/--weight-decay as given",
            args.optimizer
        )
    })?;
    Ok(cfg)
}

/// Turns the flags into a validated config; group names are checked against the base's architecture.
pub fn config_from_args(args: &FinetuneArgs) -> anyhow::Result<FinetuneConfig> {
    let Some(base) = args.base.clone() else {
        bail!("--base NAME is required (e.g. --base resnet18), or --resume RUN_DIR");
    };
    let Some(data) = args.data.clone() else {
        bail!("--data DIR is required: a folder with one subfolder of images per class");
    };
    let resolved = base::resolve(&base)?;
    let groups = resolved.group_names()?;
    let mut frozen_prefix = 0;
    for (i, name) in args.freeze.iter().enumerate() {
        let idx = group_index(&groups, name, "--freeze")?;
        if idx != i && !args.freeze.iter().any(|n| groups.get(i) == Some(n)) {
            bail!(
                "--freeze: frozen groups must be a prefix of {} (earlier groups cannot train while later ones are frozen)",
                groups.join(",")
            );
        }
        frozen_prefix = frozen_prefix.max(idx + 1);
    }
    if let Some(g) = &args.train_from {
        frozen_prefix = frozen_prefix.max(group_index(&groups, g, "--train-from")?);
    }
    let mut unfreeze_at = Vec::new();
    for item in &args.unfreeze_at {
        let (epoch, group) = item
            .split_once(':')
            .with_context(|| format!("--unfreeze-at: `{item}` is not EPOCH:GROUP"))?;
        let epoch: usize = epoch
            .parse()
            .with_context(|| format!("--unfreeze-at: `{epoch}` is not an epoch number"))?;
        unfreeze_at.push((epoch, group_index(&groups, group, "--unfreeze-at")?));
    }
    let activation = match args.activation.as_str() {
        "relu" => Activation::Relu,
        "tanh" => Activation::Tanh,
        "sigmoid" => Activation::Sigmoid,
        other => bail!("--activation: `{other}` is not relu|tanh|sigmoid"),
    };
    let dropout = args.dropout.unwrap_or(resolved.head_dropout);
    let mut head = match args.hidden {
        Some(h) => HeadConfig::with_hidden(h, dropout, activation),
        None => HeadConfig {
            dropout,
            ..HeadConfig::default()
        },
    };
    if let Some(init) = &args.init {
        head.init = init
            .parse::<Init>()
            .map_err(|e| anyhow::anyhow!("--init: {e}"))?;
    }
    let schedule: ScheduleKind =
        serde_json::from_value(serde_json::json!(args.schedule)).map_err(|_| {
            anyhow::anyhow!(
                "--schedule: `{}` is not constant|step|exponential|cosine|onecycle|plateau",
                args.schedule
            )
        })?;
    let monitor: Monitor = args
        .monitor
        .parse()
        .map_err(|e| anyhow::anyhow!("--monitor: {e}"))?;
    let class_weights = match args.class_weights.as_str() {
        "auto" => true,
        "none" => false,
        other => bail!("--class-weights: `{other}` is not auto|none"),
    };
    if let Some(c) = args.crop_pct {
        if !(c > 0.0 && c <= 1.0) {
            bail!("--crop-pct: must be in (0, 1], got {c}");
        }
    }
    Ok(FinetuneConfig {
        base,
        weights: args.weights.clone(),
        pretrained: !args.random_init,
        data,
        val_split: args.val_split,
        image_size: args.image_size,
        crop_pct: args.crop_pct,
        batch_size: args.batch_size,
        freeze_epochs: args.freeze_epochs,
        epochs: args.epochs,
        lr: args.lr,
        lr_mult: args.lr_mult,
        optimizer: optimizer_config(args)?,
        schedule,
        clip_grad_norm: args.clip_grad_norm,
        head,
        label_smoothing: args.label_smoothing,
        class_weights,
        balanced: args.balanced,
        augment: args.augment,
        seed: args.seed,
        patience: args.patience,
        min_delta: args.min_delta,
        monitor,
        frozen_prefix,
        unfreeze_at,
        train_bn: args.train_bn,
        cache_mb: args.cache_mb,
        max_bad_steps: args.max_bad_steps,
        device: args.device.clone(),
    })
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let opts = RunOptions {
        quiet: args.quiet,
        stop_after: args.stop_after,
        on_epoch: None,
    };
    let outcome = if let Some(dir) = &args.resume {
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
        finetune_new(&cfg, args.run_dir.as_deref(), &opts)?
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
