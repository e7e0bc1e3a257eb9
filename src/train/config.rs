//! The config of a fine-tuning run: data with documented defaults, saved as the run's `config.json` and in
//! every checkpoint, validated once ([`validate`]) before anything is written.

use crate::data::Preprocess;
use crate::models::base::Base;
use crate::models::classifier::ClassifierSpec;
use crate::models::head::HeadConfig;
use crate::optim::{OptimizerConfig, ScheduleConfig};
use crate::train::early_stop::Monitor;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which learning-rate schedule each phase follows; built into a [`ScheduleConfig`] at the phase's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    /// ×0.1 every third of the phase.
    Step,
    /// ×0.95 per epoch.
    Exponential,
    /// Cosine to 0 with a warmup of 5% of the phase.
    Cosine,
    /// fastai's `fit_one_cycle`.
    Onecycle,
    /// ×0.1 after 2 epochs without validation-loss improvement (`ReduceLROnPlateau`).
    Plateau,
}

impl ScheduleKind {
    /// The schedule for a phase of `steps` optimizer steps, `steps_per_epoch` of them per epoch.
    pub fn build(self, lr: f64, steps: usize, steps_per_epoch: usize) -> ScheduleConfig {
        match self {
            ScheduleKind::Constant => ScheduleConfig::Constant { lr },
            ScheduleKind::Step => ScheduleConfig::Step {
                lr,
                step_size: (steps / 3).max(1),
                gamma: 0.1,
            },
            ScheduleKind::Exponential => ScheduleConfig::Exponential {
                lr,
                gamma: 0.95f64.powf(1.0 / steps_per_epoch.max(1) as f64),
            },
            ScheduleKind::Cosine => ScheduleConfig::Cosine {
                lr,
                warmup_steps: steps / 20,
                min_lr: 0.0,
            },
            ScheduleKind::Onecycle => ScheduleConfig::fit_one_cycle(lr),
            ScheduleKind::Plateau => ScheduleConfig::Plateau {
                lr,
                plateau: crate::optim::schedule::PlateauConfig {
                    patience: 1,
                    ..Default::default()
                },
            },
        }
    }
}

/// Everything that defines a fine-tuning run; saved as the run's config and in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// Base: a model card name (`resnet18`, ...), an encoder arch (`dense:784,300,150`) or `ae:RUN_DIR`
    /// (see [`crate::models::base::resolve`]).
    pub base: String,
    /// Local weights instead of the card's; ignored when `pretrained` is false.
    pub weights: Option<PathBuf>,
    /// Start from pretrained weights (false: the same architecture from random initialisation).
    pub pretrained: bool,
    pub data: PathBuf,
    pub val_split: f64,
    /// Square input size; `None` takes the card's.
    pub image_size: Option<usize>,
    /// Evaluation crop fraction; `None` takes the card's.
    pub crop_pct: Option<f64>,
    pub batch_size: usize,
    /// Epochs with the whole backbone frozen (head only), first.
    pub freeze_epochs: usize,
    /// Epochs after that, with the groups the freezing plan leaves trainable.
    pub epochs: usize,
    /// Learning rate of the head (and of the last group); earlier groups get geometrically less.
    pub lr: f64,
    /// Ratio of the head's learning rate to the stem's in the unfrozen phase (1: one rate for all).
    pub lr_mult: f64,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleKind,
    pub clip_grad_norm: Option<f64>,
    pub head: HeadConfig,
    pub label_smoothing: f64,
    /// Weight the loss by inverse class frequency.
    pub class_weights: bool,
    /// Draw each batch class-balanced (with replacement).
    pub balanced: bool,
    /// Random resized crops and flips for training (off: the evaluation transform).
    pub augment: bool,
    pub seed: u64,
    /// Early stopping patience in epochs (`None`: never stop early, but still keep the best weights).
    pub patience: Option<usize>,
    pub min_delta: f64,
    pub monitor: Monitor,
    /// Groups frozen for the whole unfrozen phase: a prefix of the backbone's groups, by count.
    pub frozen_prefix: usize,
    /// Gradual unfreezing: (1-based epoch, number of frozen groups from that epoch on).
    pub unfreeze_at: Vec<(usize, usize)>,
    /// BatchNorm scales and shifts of frozen groups still train (their running statistics do not move).
    #[serde(default)]
    pub train_bn: bool,
    pub device: String,
    /// Memory budget in MiB for the cached outputs of a frozen prefix (0: never cache).
    #[serde(default = "cache_mb_default")]
    pub cache_mb: usize,
    /// Steps whose loss is not finite that are skipped (no update) before the run stops with
    /// [`Error::Diverged`], over the whole run.
    #[serde(default = "max_bad_steps_default")]
    pub max_bad_steps: usize,
}

fn cache_mb_default() -> usize {
    2048
}

fn max_bad_steps_default() -> usize {
    3
}

/// Validates a config's values before anything is read or written (what depends on the base, the image size
/// and memory, is checked by [`preprocess_for`] and [`check_memory`] once the base is resolved).
pub fn validate(cfg: &FinetuneConfig) -> Result<()> {
    if cfg.freeze_epochs + cfg.epochs == 0 {
        return Err(Error::config(
            "--epochs/--freeze-epochs",
            "nothing to train: both are 0",
        ));
    }
    if cfg.batch_size == 0 {
        return Err(Error::config("--batch-size", "must be at least 1"));
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        return Err(Error::config(
            "--lr",
            format!("must be positive, got {}", cfg.lr),
        ));
    }
    if cfg.lr_mult.is_nan() || cfg.lr_mult < 1.0 {
        return Err(Error::config(
            "--lr-mult",
            format!("must be at least 1, got {}", cfg.lr_mult),
        ));
    }
    if !(0.0..1.0).contains(&cfg.label_smoothing) {
        return Err(Error::config(
            "--label-smoothing",
            format!("must be in [0, 1), got {}", cfg.label_smoothing),
        ));
    }
    if !(0.0..1.0).contains(&cfg.val_split) {
        return Err(Error::config(
            "--val-split",
            format!("must be in [0, 1), got {}", cfg.val_split),
        ));
    }
    crate::optim::clip::validate_max_norm(cfg.clip_grad_norm)?;
    if !(cfg.min_delta >= 0.0 && cfg.min_delta.is_finite()) {
        return Err(Error::config(
            "--min-delta",
            format!("must be zero or positive, got {}", cfg.min_delta),
        ));
    }
    if cfg.patience == Some(0) {
        return Err(Error::config(
            "--patience",
            "must be at least 1 epoch (leave the flag out to never stop early)",
        ));
    }
    if let Some(&(epoch, _)) = cfg.unfreeze_at.iter().find(|(e, _)| *e == 0) {
        return Err(Error::config(
            "--unfreeze-at",
            format!("epochs are 1-based, got {epoch}"),
        ));
    }
    cfg.optimizer.validate()?;
    cfg.head.validate()?;
    Ok(())
}

/// Refuses a training step that would not fit in the memory available, before anything is allocated.
pub fn check_memory(cfg: &FinetuneConfig, p: &Preprocess) -> Result<()> {
    crate::sysmem::check_fits(
        &format!(
            "--image-size {} --batch-size {}",
            p.input_size, cfg.batch_size
        ),
        crate::sysmem::training_step_bytes(cfg.batch_size, p.channels, p.input_size),
    )
}

/// The evaluation preprocessing of `base` at the config's image size and crop, checked against it.
pub fn preprocess_for(cfg: &FinetuneConfig, base: &Base) -> Result<Preprocess> {
    let mut p = base.preprocess.clone();
    if let Some(s) = cfg.image_size {
        if s < 16 {
            return Err(Error::config(
                "--image-size",
                format!("{s} is too small (at least 16)"),
            ));
        }
        if s > crate::sysmem::MAX_IMAGE_SIZE {
            return Err(Error::config(
                "--image-size",
                format!(
                    "{s} is too large (at most {})",
                    crate::sysmem::MAX_IMAGE_SIZE
                ),
            ));
        }
        p.input_size = s;
    }
    if let Some(c) = cfg.crop_pct {
        p.crop_pct = c;
    }
    p.validate()?;
    base.check_preprocess(&p)?;
    Ok(p)
}

/// The classifier a config describes, for `classes`.
pub fn classifier_spec(
    cfg: &FinetuneConfig,
    base: &Base,
    classes: Vec<String>,
) -> Result<ClassifierSpec> {
    Ok(ClassifierSpec {
        arch: base.arch.clone(),
        base: base.name.clone(),
        head: cfg.head,
        classes,
        preprocess: preprocess_for(cfg, base)?,
        bn_folded: false,
    })
}
