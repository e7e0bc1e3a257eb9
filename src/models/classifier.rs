//! A backbone with a new head: the model that `graft finetune` trains, `graft export` writes and
//! `graft predict --model` / `graft eval` run.
//!
//! Key layout: the backbone's own keys (timm/torchvision or the EfficientNet package's) plus the head under
//! `head.` (`head.fc.weight`, or `head.fc1.*`/`head.fc2.*` with a hidden layer), so the pretrained classifier
//! (`fc` / `_fc`) is never confused with the new one.

use crate::data::Preprocess;
use crate::formats::weights::{self, LoadReport, WeightFile};
use crate::models::head::{Head, HeadConfig};
use crate::models::{build_backbone_with_drop_path, Backbone, Mode};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

/// Key prefix of the new head.
pub const HEAD_PREFIX: &str = "head";

/// What is needed to rebuild a classifier besides its weights; saved in checkpoints and exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierSpec {
    /// Architecture to build (`resnet18`, `efficientnet_lite0`, ...).
    pub arch: String,
    /// The base (model card) it came from, for reports.
    pub base: String,
    pub head: HeadConfig,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Evaluation preprocessing (the card's, at the training image size).
    pub preprocess: Preprocess,
    /// The weights were exported with every BatchNorm folded into the convolution before it (scaled
    /// filters plus a bias, no BatchNorm tensors); see [`crate::export::fold_batch_norm`].
    #[serde(default)]
    pub bn_folded: bool,
    /// Stochastic depth in training (`--drop-path`; 0: off, and not written).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_path: f32,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

/// A backbone plus a new head, with all their variables in one `VarMap`.
pub struct Classifier {
    pub spec: ClassifierSpec,
    pub varmap: VarMap,
    pub backbone: Box<dyn Backbone>,
    pub head: Head,
    /// Frozen groups keep their BatchNorm scales and shifts trainable (fastai's `train_bn`).
    pub train_bn: bool,
}

impl Classifier {
    /// Builds the architecture with freshly initialised weights (conv: Kaiming, BatchNorm: identity, head:
    /// the spec's init).
    pub fn new(spec: ClassifierSpec, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let backbone = build_backbone_with_drop_path(&spec.arch, spec.drop_path, vb.clone())?;
        let head = Head::new(
            &spec.head,
            backbone.feature_dim(),
            spec.classes.len(),
            vb.pp(HEAD_PREFIX),
        )?;
        Ok(Self {
            spec,
            varmap,
            backbone,
            head,
            train_bn: false,
        })
    }

    /// Loads pretrained backbone weights from `file`; the file's old classifier is skipped and the head keeps
    /// its initial values.
    pub fn load_backbone(&self, file: &WeightFile) -> Result<LoadReport> {
        weights::load_into(
            &self.varmap,
            file,
            Some(HEAD_PREFIX),
            Some(self.backbone.classifier_prefix()),
        )
    }

    /// Loads a whole classifier (backbone and head), e.g. from an export.
    pub fn load_all(&self, file: &WeightFile) -> Result<LoadReport> {
        weights::load_into(&self.varmap, file, None, None)
    }

    /// Number of backbone groups (the head is not one).
    pub fn num_groups(&self) -> usize {
        self.backbone.group_names().len()
    }

    /// Pooled features with the first `frozen_groups` groups frozen (with trainable BatchNorm affine
    /// parameters when `train_bn` is set and `mode` trains).
    pub fn features(&self, x: &Tensor, mode: Mode, frozen_groups: usize) -> Result<Tensor> {
        if !(self.train_bn && mode.is_train()) || frozen_groups == 0 {
            return self.backbone.forward_features(x, mode, frozen_groups);
        }
        let mut h = x.clone();
        for i in 0..self.num_groups() {
            let m = if i < frozen_groups {
                Mode::FrozenTrainBn
            } else {
                mode
            };
            h = self.backbone.forward_group(i, &h, m)?;
        }
        self.backbone.pool(&h)
    }

    /// Logits `[N, classes]`.
    pub fn forward(&self, x: &Tensor, mode: Mode, frozen_groups: usize) -> Result<Tensor> {
        let f = self.features(x, mode, frozen_groups)?;
        self.head.forward(&f, mode.is_train())
    }

    /// What a frozen prefix of `level` groups turns `x` into, with no gradient graph: the output of group
    /// `level - 1` (the images for 0), or the pooled features when every group is frozen (they are all the
    /// head needs, and far smaller than the last group's maps). [`Classifier::forward_from`] continues from it.
    pub fn frozen_prefix(&self, x: &Tensor, level: usize) -> Result<Tensor> {
        let n = self.num_groups();
        if level >= n {
            return Ok(self.backbone.forward_features(x, Mode::Frozen, n)?.detach());
        }
        let mut h = x.clone();
        for i in 0..level {
            h = self.backbone.forward_group(i, &h, Mode::Frozen)?;
        }
        Ok(h.detach())
    }

    /// Logits from what [`Classifier::frozen_prefix`] returned for the same `level`: the remaining groups
    /// run in `mode`, then the head. Equal to `forward(x, mode, level)` when `train_bn` is off.
    pub fn forward_from(&self, h: &Tensor, level: usize, mode: Mode) -> Result<Tensor> {
        let n = self.num_groups();
        let f = if level >= n {
            h.clone()
        } else {
            let mut h = h.clone();
            for i in level..n {
                h = self.backbone.forward_group(i, &h, mode)?;
            }
            self.backbone.pool(&h)?
        };
        self.head.forward(&f, mode.is_train())
    }

    /// Logits for inference: every group frozen, no dropout, no gradient graph.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.features(x, Mode::Frozen, self.num_groups())?;
        Ok(self.head.forward(&f, false)?.detach())
    }

    /// The layer of a key for layer-wise learning-rate decay: the backbone's
    /// [`Backbone::decay_layer`], the head last (`backbone.decay_layers()`).
    pub fn decay_layer_of(&self, key: &str) -> Option<usize> {
        if key == HEAD_PREFIX || key.starts_with("head.") {
            Some(self.backbone.decay_layers())
        } else {
            self.backbone.decay_layer(key)
        }
    }

    /// Index of the layer group owning a key: backbone groups first, then the head as the last group.
    pub fn group_of(&self, key: &str) -> Option<usize> {
        if key == HEAD_PREFIX || key.starts_with("head.") {
            Some(self.num_groups())
        } else {
            self.backbone.group_of(key)
        }
    }
}
