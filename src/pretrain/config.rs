//! The config of a pretraining run: data with documented defaults, saved as the run's `config.json` and in
//! every checkpoint, validated once ([`PretrainConfig::validate`]) before anything is written.

use crate::data::Preprocess;
use crate::kernels::precision::Precision;
use crate::models::encoder::{EncoderActivation, EncoderConfig};
use crate::optim::OptimizerConfig;
use crate::train::config::ScheduleKind;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How the stages are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Each stage an autoencoder (reconstruction MSE).
    #[value(alias = "ae")]
    Autoencoder,
    /// Each stage a Bernoulli-Bernoulli RBM trained by contrastive divergence (dense, sigmoid, tied).
    Rbm,
}

/// Corruption of a stage's input while it trains (denoising autoencoders).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Noise {
    /// Add `N(0, std²)` to every value.
    Gaussian { std: f64 },
    /// Zero each value with probability `rate` and scale the others by `1 / (1 - rate)` (Keras's Dropout).
    Dropout { rate: f64 },
}

/// A penalty that keeps the codes of the stage being trained sparse.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Sparsity {
    /// `weight * Σ_j KL(target || mean activation of unit j)`; the codes must be in (0, 1) (sigmoid).
    Kl { target: f64, weight: f64 },
    /// `weight * mean |code|`.
    L1 { weight: f64 },
}

/// Everything that defines a pretraining run; saved as the run's config and in every checkpoint. A file
/// that leaves fields out gets [`PretrainConfig::default`]'s values for them; an unknown field is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Encoder arch string (canonical form, see [`EncoderConfig::parse`]).
    pub arch: String,
    pub method: Method,
    /// A folder of images, with or without class subfolders (labels are ignored).
    pub data: PathBuf,
    /// Use at most this many images (a seeded random subset), e.g. to keep convolutional runs short.
    pub max_images: Option<usize>,
    /// Fraction of the images held out to measure the reconstruction loss (and stop early).
    pub val_split: f64,
    /// Square input size; images of another size are resized (short side) and centre-cropped.
    pub image_size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    pub batch_size: usize,
    /// Epochs of each greedy stage.
    pub stage_epochs: usize,
    /// Epochs of end-to-end fine-tuning of the whole stack after the greedy stages (0: none).
    pub finetune_epochs: usize,
    pub lr: f64,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleKind,
    pub clip_grad_norm: Option<f64>,
    /// The decoder uses the encoder's transposed weights (always true for RBMs).
    pub tied: bool,
    pub noise: Option<Noise>,
    pub sparsity: Option<Sparsity>,
    /// Gibbs steps of contrastive divergence (RBMs).
    pub cd_k: usize,
    /// Early stopping patience per phase (`None`: every phase runs all its epochs). A phase with patience
    /// ends with the weights of its best epoch.
    pub patience: Option<usize>,
    pub min_delta: f64,
    pub seed: u64,
    pub device: String,
    /// What the dense products multiply in (see `FinetuneConfig::precision`).
    pub precision: Precision,
}

impl Default for PretrainConfig {
    /// The documented defaults (`graft pretrain --help` shows them): stacked autoencoders trained with Adam at
    /// 1e-3 and a constant rate, five epochs a stage, on 28x28 grey images. `arch` and `data` are empty (a run
    /// needs both). The CLI fills in what depends on the method and the arch when neither a flag nor a config
    /// file says it: an RBM's rate (0.05) and optimizer (momentum), and the input size a dense arch implies.
    fn default() -> Self {
        PretrainConfig {
            arch: String::new(),
            method: Method::Autoencoder,
            data: PathBuf::new(),
            max_images: None,
            val_split: 0.1,
            image_size: 28,
            channels: 1,
            batch_size: 128,
            stage_epochs: 5,
            finetune_epochs: 0,
            lr: Method::Autoencoder.default_lr(),
            optimizer: OptimizerConfig::from_kind(Method::Autoencoder.default_optimizer())
                .expect("a known kind"),
            schedule: ScheduleKind::Constant,
            clip_grad_norm: None,
            tied: false,
            noise: None,
            sparsity: None,
            cd_k: 1,
            patience: None,
            min_delta: 0.0,
            seed: 0,
            device: "cpu".into(),
            precision: Precision::F32,
        }
    }
}

impl Method {
    /// The learning rate of a run that sets none: 1e-3 for autoencoders, 0.05 for RBMs.
    pub fn default_lr(self) -> f64 {
        match self {
            Method::Autoencoder => 1e-3,
            Method::Rbm => 0.05,
        }
    }

    /// The optimizer kind of a run that sets none: adam for autoencoders, momentum for RBMs.
    pub fn default_optimizer(self) -> &'static str {
        match self {
            Method::Autoencoder => "adam",
            Method::Rbm => "momentum",
        }
    }
}

impl PretrainConfig {
    /// Checks the config before anything is written.
    pub fn validate(&self) -> Result<EncoderConfig> {
        let enc = EncoderConfig::parse(&self.arch)?;
        if !(1..=3).contains(&self.channels) || self.channels == 2 {
            return Err(Error::config(
                "--channels",
                format!("{} is not 1 or 3", self.channels),
            ));
        }
        enc.check_input(self.channels, self.image_size)?;
        if self.stage_epochs + self.finetune_epochs == 0 {
            return Err(Error::config(
                "--stage-epochs/--finetune-epochs",
                "nothing to train: both are 0",
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::config("--batch-size", "must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config(
                "--lr",
                format!("must be positive, got {}", self.lr),
            ));
        }
        if !(0.0..1.0).contains(&self.val_split) {
            return Err(Error::config(
                "--val-split",
                format!("{} is not in [0, 1)", self.val_split),
            ));
        }
        crate::optim::clip::validate_max_norm(self.clip_grad_norm)?;
        crate::train::config::validate_optimizer(&self.optimizer)?;
        match self.noise {
            Some(Noise::Gaussian { std }) if !(std >= 0.0 && std.is_finite()) => {
                return Err(Error::config(
                    "--noise",
                    format!("gaussian std {std} must be >= 0"),
                ))
            }
            Some(Noise::Dropout { rate }) if !(0.0..1.0).contains(&rate) => {
                return Err(Error::config(
                    "--noise",
                    format!("dropout rate {rate} is not in [0, 1)"),
                ))
            }
            _ => {}
        }
        match self.sparsity {
            Some(Sparsity::Kl { target, .. }) if !(target > 0.0 && target < 1.0) => {
                return Err(Error::config("--sparsity", format!("KL target {target} is not in (0, 1)")))
            }
            Some(Sparsity::Kl { .. }) if enc.activation != EncoderActivation::Sigmoid => {
                return Err(Error::config(
                    "--sparsity",
                    format!("a KL sparsity target needs codes in (0, 1): use a sigmoid arch (e.g. `{}:sigmoid`), or l1", self.arch.rsplit_once(':').map_or(self.arch.as_str(), |a| a.0)),
                ))
            }
            _ => {}
        }
        if self.method == Method::Rbm {
            if !enc.is_dense() || enc.activation != EncoderActivation::Sigmoid {
                return Err(Error::config(
                    "--method rbm",
                    format!("Bernoulli RBMs are dense sigmoid stages; `{}` is not (use e.g. dense:784,300,150:sigmoid)", self.arch),
                ));
            }
            if self.cd_k == 0 {
                return Err(Error::config("--cd-k", "must be at least 1"));
            }
        }
        Ok(enc)
    }

    /// Number of phases: the greedy stages, then fine-tuning if any.
    pub(crate) fn phases(&self, stages: usize) -> usize {
        stages + usize::from(self.finetune_epochs > 0)
    }

    pub(crate) fn phase_epochs(&self, phase: usize, stages: usize) -> usize {
        if phase < stages {
            self.stage_epochs
        } else {
            self.finetune_epochs
        }
    }

    /// The preprocessing of every image: pixels in [0, 1], `channels` channels.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess::unit(self.image_size, self.channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_non_default_configs_round_trip_through_json() {
        let d = PretrainConfig::default();
        let back = |c: &PretrainConfig| -> PretrainConfig {
            serde_json::from_str(&serde_json::to_string(c).unwrap()).unwrap()
        };
        assert_eq!(back(&d), d);
        let cfg = PretrainConfig {
            arch: "dense:784,300,150:sigmoid".into(),
            method: Method::Rbm,
            data: "data".into(),
            max_images: Some(100),
            lr: 0.05,
            optimizer: OptimizerConfig::from_kind("momentum").unwrap(),
            tied: true,
            noise: Some(Noise::Dropout { rate: 0.2 }),
            sparsity: Some(Sparsity::Kl {
                target: 0.05,
                weight: 0.1,
            }),
            cd_k: 3,
            patience: Some(2),
            ..d
        };
        assert_eq!(back(&cfg), cfg);
    }

    #[test]
    fn a_run_config_written_before_defaults_existed_still_loads() {
        // Written by `graft pretrain --arch dense:256,16 --image-size 16 --stage-epochs 1 --batch-size 2
        // --noise gaussian:0.1` at 1c8b46f (data path shortened).
        let text = include_str!("../../tests/fixtures/pretrain-config-before-defaults.json");
        let cfg: PretrainConfig = serde_json::from_str(text).unwrap();
        let expected = PretrainConfig {
            arch: "dense:256,16:selu".into(),
            data: "data".into(),
            image_size: 16,
            batch_size: 2,
            stage_epochs: 1,
            noise: Some(Noise::Gaussian { std: 0.1 }),
            ..PretrainConfig::default()
        };
        assert_eq!(cfg, expected);
    }

    #[test]
    fn an_unknown_field_is_refused_naming_it() {
        let err = serde_json::from_str::<PretrainConfig>(r#"{"arch": "dense:4,2", "stages": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("stages"), "{err}");
        let err =
            serde_json::from_str::<PretrainConfig>(r#"{"noise": {"kind": "gaussian", "sd": 1}}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("sd"), "{err}");
    }
}
