//! A pretrained base model with its original classifier, as its model card describes it: what
//! `graft predict --base` and `graft inspect` run.

use crate::data::Preprocess;
use crate::formats::weights::{self, LoadReport};
use crate::models::card::ModelCard;
use crate::models::hub::{self, Origin};
use crate::models::{build_backbone, Backbone, Mode};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use std::path::Path;

/// A backbone plus its pretrained classifier, loaded from the card's weights or a local file.
pub struct Pretrained {
    pub card: ModelCard,
    pub varmap: VarMap,
    pub backbone: Box<dyn Backbone>,
    pub classifier: candle_nn::Linear,
    pub classes: Vec<String>,
    pub report: LoadReport,
    pub origin: Origin,
}

impl Pretrained {
    /// Builds the card's architecture and loads `weights` (or the card's weights through the hub/cache).
    pub fn load(card: &ModelCard, weights: Option<&Path>, device: &Device) -> Result<Self> {
        let resolved = hub::resolve_or_local(card, weights)?;
        let file = weights::read_weights(&resolved.path, device)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let backbone = build_backbone(&card.arch, vb.clone())?;
        let classifier = candle_nn::linear(
            backbone.feature_dim(),
            card.num_classes,
            vb.pp(backbone.classifier_prefix()),
        )?;
        let report = weights::load_into(&varmap, &file, None, None)?;
        Ok(Self {
            card: card.clone(),
            classes: card.class_names()?,
            varmap,
            backbone,
            classifier,
            report,
            origin: resolved.origin,
        })
    }

    /// The card's evaluation preprocessing.
    pub fn preprocess(&self) -> &Preprocess {
        &self.card.preprocess
    }

    /// Eval-mode logits for a preprocessed batch `[N,3,H,W]`.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        let n = self.backbone.group_names().len();
        let features = self.backbone.forward_features(images, Mode::Frozen, n)?;
        Ok(self.classifier.forward(&features)?)
    }
}
