//! The config of a fine-tuning run: data with documented defaults, saved as the run's `config.json` and in
//! every checkpoint, validated once ([`validate`]) before anything is written.

use crate::data::{Augment, AutoAugment, Preprocess};
use crate::kernels::precision::Precision;
use crate::models::base::Base;
use crate::models::classifier::ClassifierSpec;
use crate::models::head::HeadConfig;
use crate::optim::{OptimizerConfig, ScheduleConfig};
use crate::train::early_stop::Monitor;
use crate::train::lr_find::Suggestion;
use crate::train::mixing::MixConfig;
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which learning-rate schedule each phase follows; built into a [`ScheduleConfig`] at the phase's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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

/// The rate the learning-rate finder chose for a run, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrFound {
    pub rule: Suggestion,
    pub lr: f64,
    /// The phase whose plan it was found for (`frozen`: the head only).
    pub phase: String,
}

/// `--auto-augment`: which automatic augmentation policy training images get (after the random resized crop
/// and flip, before normalisation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AutoAugmentKind {
    /// No policy.
    #[default]
    None,
    /// torchvision's `TrivialAugmentWide()`.
    Trivial,
    /// torchvision's `RandAugment()`: two ops at magnitude 9 of 31.
    Rand,
}

impl AutoAugmentKind {
    /// The policy, `None` for `none`.
    pub fn policy(self) -> Option<AutoAugment> {
        match self {
            AutoAugmentKind::None => None,
            AutoAugmentKind::Trivial => Some(AutoAugment::TrivialWide),
            AutoAugmentKind::Rand => Some(AutoAugment::rand()),
        }
    }
}

/// Everything that defines a fine-tuning run; saved as the run's config and in every checkpoint. A file
/// that leaves fields out gets [`FinetuneConfig::default`]'s values for them; an unknown field is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Find `lr` before training with the learning-rate finder and this rule (`--lr auto`: valley), for the
    /// first phase's plan. A run records the rate found in `lr`, this field as `None` and the finding in
    /// `lr_found`, so its config.json reruns the same run without searching again.
    pub lr_find: Option<Suggestion>,
    /// What the finder chose for this run (a record: it changes nothing by itself).
    pub lr_found: Option<LrFound>,
    /// Ratio of the head's learning rate to the stem's in the unfrozen phase (1: one rate for all).
    pub lr_mult: f64,
    /// Layer-wise learning-rate decay instead of `lr_mult` (timm's `layer_decay`): the head trains at `lr`,
    /// each layer below at `layer_decay` times the one above (a ViT's blocks one by one, other backbones
    /// group by group; see [`crate::models::Backbone::decay_layer`]). `None`: off.
    pub layer_decay: Option<f64>,
    /// Stochastic depth of the backbone in training (timm's `drop_path_rate`: the last block's rate,
    /// rising linearly from 0 at the first); masks seeded by (seed, epoch, batch). 0: off.
    pub drop_path: f32,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleKind,
    pub clip_grad_norm: Option<f64>,
    pub head: HeadConfig,
    pub label_smoothing: f64,
    /// Mixup's Beta alpha (0: off; timm's 0.8 when on): each batch blended with its mirror, the loss alike.
    pub mixup: f64,
    /// CutMix's Beta alpha (0: off; timm's 1.0 when on); with mixup on too, each batch is one or the other.
    pub cutmix: f64,
    /// Keep an exponential moving average of the weights with this decay (timm's `ModelEmaV2`, warmed up):
    /// validation, the best checkpoint and the export use the average.
    pub ema: Option<f64>,
    /// Batches per optimizer step (gradient accumulation): their gradients are averaged, so the step sees
    /// `batch_size * accumulate` images; BatchNorm still normalises each batch on its own.
    pub accumulate: usize,
    /// Weight the loss by inverse class frequency.
    pub class_weights: bool,
    /// Draw each batch class-balanced (with replacement).
    pub balanced: bool,
    /// Random resized crops and flips for training (off: the evaluation transform).
    pub augment: bool,
    /// An automatic augmentation policy for training images; any but `none` implies `augment`.
    pub auto_augment: AutoAugmentKind,
    /// Probability of random erasing of each normalised training image (0: off); above 0 implies `augment`.
    pub random_erasing: f64,
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
    pub train_bn: bool,
    pub device: String,
    /// What the dense convolutions multiply in (`bf16`: bf16 inputs, f32 sums; everything else stays f32;
    /// see [`crate::kernels::precision`]).
    pub precision: Precision,
    /// Memory budget in MiB for the cached outputs of a frozen prefix (0: never cache).
    pub cache_mb: usize,
    /// Steps whose loss is not finite that are skipped (no update) before the run stops with
    /// [`Error::Diverged`], over the whole run.
    pub max_bad_steps: usize,
}

impl Default for FinetuneConfig {
    /// The documented defaults (`graft finetune --help` shows them), chosen by measurement (README "Choosing
    /// the defaults"): every training image trains (no validation split, Keras's default; `--val-split 0.2`
    /// or a val/ folder gives validation, early stopping and a best epoch); fastai's `fine_tune` schedule,
    /// one frozen epoch then ten unfrozen at a peak rate of 2e-3 with AdamW and one-cycle; one rate for every
    /// group (`lr_mult` 1); PyTorch's init for the linear head. `base` and `data` are empty (a run needs
    /// both); the head is a plain linear layer without dropout. The CLI fills in what depends on the base
    /// when neither a flag nor a config file says it: the model card's head dropout.
    fn default() -> Self {
        FinetuneConfig {
            base: String::new(),
            weights: None,
            pretrained: true,
            data: PathBuf::new(),
            val_split: 0.0,
            image_size: None,
            crop_pct: None,
            batch_size: 32,
            freeze_epochs: 1,
            epochs: 10,
            lr: 2e-3,
            lr_find: None,
            lr_found: None,
            lr_mult: 1.0,
            layer_decay: None,
            drop_path: 0.0,
            optimizer: OptimizerConfig::from_kind("adamw").expect("adamw is a kind"),
            schedule: ScheduleKind::Onecycle,
            clip_grad_norm: None,
            head: HeadConfig::default(),
            label_smoothing: 0.0,
            mixup: 0.0,
            cutmix: 0.0,
            ema: None,
            accumulate: 1,
            class_weights: false,
            balanced: false,
            augment: false,
            auto_augment: AutoAugmentKind::None,
            random_erasing: 0.0,
            seed: 0,
            patience: None,
            min_delta: 0.0,
            monitor: Monitor::ValLoss,
            frozen_prefix: 0,
            unfreeze_at: Vec::new(),
            train_bn: false,
            device: "cpu".into(),
            precision: Precision::F32,
            cache_mb: 2048,
            max_bad_steps: 3,
        }
    }
}

impl FinetuneConfig {
    /// The batch mixing the config asks for.
    pub fn mixing(&self) -> MixConfig {
        MixConfig {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
        }
    }

    /// The training loader's augmentation: `None` (the evaluation transform) unless `augment` is on, an
    /// automatic policy is chosen or random erasing is above 0; any of them brings the random resized crop
    /// and flip, as in timm. While it is `Some`, inputs change every epoch, so no feature cache is used.
    pub fn augmentation(&self) -> Option<Augment> {
        let auto = self.auto_augment.policy();
        (self.augment || auto.is_some() || self.random_erasing > 0.0).then(|| Augment {
            auto,
            erasing: self.random_erasing,
            ..Augment::default()
        })
    }
}

/// Reads a config file: JSON (such as a run's `config.json`), or TOML when the name ends in `.toml`. Returns
/// the config and the file's own tree, which tells what the file set (the rest took the config's defaults).
/// An unknown field or a value of the wrong type is a [`Error::BadFile`] naming the file and the field.
pub fn read_config_file<T: DeserializeOwned>(path: &Path) -> Result<(T, serde_json::Value)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let tree: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| Error::bad_file(path, e.message().to_string()))?
    } else {
        serde_json::from_str(&text).map_err(|e| Error::bad_file(path, e.to_string()))?
    };
    let cfg = T::deserialize(&tree).map_err(|e| Error::bad_file(path, e.to_string()))?;
    Ok((cfg, tree))
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
    cfg.mixing().validate()?;
    if cfg.accumulate == 0 {
        return Err(Error::config("--accumulate", "must be at least 1"));
    }
    if let Some(d) = cfg.ema {
        if !(0.0..1.0).contains(&d) {
            return Err(Error::config(
                "--ema",
                format!("the decay must be in [0, 1), got {d}"),
            ));
        }
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
    if !(0.0..1.0).contains(&cfg.drop_path) {
        return Err(Error::config(
            "--drop-path",
            format!("must be in [0, 1), got {}", cfg.drop_path),
        ));
    }
    if let Some(d) = cfg.layer_decay {
        if !(d > 0.0 && d <= 1.0) {
            return Err(Error::config(
                "--layer-decay",
                format!("must be in (0, 1], got {d}"),
            ));
        }
        if cfg.lr_mult != 1.0 {
            return Err(Error::config(
                "--layer-decay",
                format!(
                    "replaces --lr-mult's rates; give one of them, not both (--lr-mult {})",
                    cfg.lr_mult
                ),
            ));
        }
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
    if !(0.0..=1.0).contains(&cfg.random_erasing) {
        return Err(Error::config(
            "--random-erasing",
            format!(
                "must be a probability in [0, 1], got {}",
                cfg.random_erasing
            ),
        ));
    }
    validate_optimizer(&cfg.optimizer)?;
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

/// Checks an optimizer's hyperparameters, naming the flags that set them.
pub fn validate_optimizer(optimizer: &OptimizerConfig) -> Result<()> {
    optimizer.validate().map_err(|e| {
        Error::config(
            format!(
                "--optimizer {} with --momentum/--weight-decay",
                optimizer.kind()
            ),
            e.to_string(),
        )
    })
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
        if !(c > 0.0 && c <= 1.0) {
            return Err(Error::config(
                "--crop-pct",
                format!("must be in (0, 1], got {c}"),
            ));
        }
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
        drop_path: cfg.drop_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::head::{Activation, Init};

    fn round_trip(cfg: &FinetuneConfig) -> FinetuneConfig {
        serde_json::from_str(&serde_json::to_string(cfg).unwrap()).unwrap()
    }

    #[test]
    fn default_and_non_default_configs_round_trip_through_json() {
        let d = FinetuneConfig::default();
        assert_eq!(round_trip(&d), d);
        let cfg = FinetuneConfig {
            base: "resnet18".into(),
            weights: Some("w.safetensors".into()),
            data: "data".into(),
            image_size: Some(64),
            crop_pct: Some(0.9),
            lr: 1e-2,
            optimizer: OptimizerConfig::from_kind("nesterov").unwrap(),
            schedule: ScheduleKind::Cosine,
            clip_grad_norm: Some(1.0),
            head: HeadConfig::with_hidden(32, 0.3, Activation::Tanh),
            class_weights: true,
            patience: Some(3),
            monitor: Monitor::ValAcc,
            frozen_prefix: 2,
            unfreeze_at: vec![(3, 1)],
            train_bn: true,
            cache_mb: 0,
            ..d
        };
        assert_eq!(round_trip(&cfg), cfg);
    }

    #[test]
    fn a_run_config_written_before_defaults_existed_still_loads() {
        // Written by `graft finetune --base dense:256,16 --image-size 16 --freeze-epochs 0 --epochs 1
        // --batch-size 2 --hidden 8` at 1c8b46f (data path shortened).
        let text = include_str!("../../tests/fixtures/finetune-config-before-defaults.json");
        let cfg: FinetuneConfig = serde_json::from_str(text).unwrap();
        let expected = FinetuneConfig {
            base: "dense:256,16".into(),
            data: "data".into(),
            image_size: Some(16),
            batch_size: 2,
            freeze_epochs: 0,
            epochs: 1,
            head: HeadConfig::with_hidden(8, 0.0, Activation::Relu),
            // The file has every field of its day; lr_mult's default was 100 then, val_split's 0.2.
            lr_mult: 100.0,
            val_split: 0.2,
            ..FinetuneConfig::default()
        };
        assert_eq!(cfg, expected);
        assert_eq!(cfg.head.init, Init::He);
        assert_eq!(
            cfg.augmentation(),
            None,
            "old runs stay without augmentation"
        );
    }

    #[test]
    fn any_augmentation_flag_brings_the_crop_and_flip_and_the_policy_it_names() {
        let d = FinetuneConfig::default();
        assert_eq!(d.augmentation(), None);
        let plain = FinetuneConfig {
            augment: true,
            ..d.clone()
        };
        assert_eq!(plain.augmentation(), Some(Augment::default()));
        let trivial = FinetuneConfig {
            auto_augment: AutoAugmentKind::Trivial,
            ..d.clone()
        };
        let aug = trivial.augmentation().unwrap();
        assert_eq!(aug.auto, Some(AutoAugment::TrivialWide));
        assert_eq!((aug.scale, aug.hflip), ([0.08, 1.0], 0.5));
        let erase = FinetuneConfig {
            auto_augment: AutoAugmentKind::Rand,
            random_erasing: 0.25,
            ..d.clone()
        };
        let aug = erase.augmentation().unwrap();
        assert_eq!((aug.auto, aug.erasing), (Some(AutoAugment::rand()), 0.25));
        assert_eq!(round_trip(&erase), erase);
        let json = serde_json::to_string(&erase).unwrap();
        assert!(json.contains(r#""auto_augment":"rand""#), "{json}");
    }

    #[test]
    fn layer_decay_is_a_fraction_and_replaces_lr_mult() {
        let ok = FinetuneConfig {
            base: "resnet18".into(),
            data: "data".into(),
            layer_decay: Some(0.75),
            ..FinetuneConfig::default()
        };
        validate(&ok).unwrap();
        for d in [0.0, 1.5, f64::NAN] {
            let bad = FinetuneConfig {
                layer_decay: Some(d),
                ..ok.clone()
            };
            let err = validate(&bad).unwrap_err().to_string();
            assert!(err.contains("--layer-decay"), "{err}");
        }
        let both = FinetuneConfig {
            lr_mult: 10.0,
            ..ok.clone()
        };
        let err = validate(&both).unwrap_err().to_string();
        assert!(err.contains("--lr-mult"), "{err}");
        assert_eq!(round_trip(&ok), ok);
    }

    #[test]
    fn random_erasing_outside_zero_to_one_names_the_flag() {
        for p in [-0.1, 1.5, f64::NAN] {
            let cfg = FinetuneConfig {
                random_erasing: p,
                ..FinetuneConfig::default()
            };
            let err = validate(&cfg).unwrap_err().to_string();
            assert!(err.contains("--random-erasing"), "{err}");
        }
    }

    #[test]
    fn a_partial_file_takes_the_defaults_for_the_rest_json_or_toml() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("c.json");
        std::fs::write(
            &json,
            r#"{"base": "resnet18", "lr": 0.01, "head": {"hidden": 4}}"#,
        )
        .unwrap();
        let toml = dir.path().join("c.toml");
        std::fs::write(
            &toml,
            "base = \"resnet18\"\nlr = 0.01\n[head]\nhidden = 4\n",
        )
        .unwrap();
        let expected = FinetuneConfig {
            base: "resnet18".into(),
            lr: 0.01,
            head: HeadConfig {
                hidden: Some(4),
                ..HeadConfig::default()
            },
            ..FinetuneConfig::default()
        };
        for path in [json, toml] {
            let (cfg, tree) = read_config_file::<FinetuneConfig>(&path).unwrap();
            assert_eq!(cfg, expected, "{}", path.display());
            assert!(tree.pointer("/head/hidden").is_some() && tree.get("epochs").is_none());
        }
    }

    #[test]
    fn an_unknown_field_is_refused_naming_the_field_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("top.json", r#"{"base": "resnet18", "learning_rate": 0.1}"#),
            ("head.json", r#"{"head": {"hiden": 4}}"#),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = read_config_file::<FinetuneConfig>(&path)
                .unwrap_err()
                .to_string();
            let field = if name == "top.json" {
                "learning_rate"
            } else {
                "hiden"
            };
            assert!(err.contains(field) && err.contains(name), "{err}");
        }
    }
}
