//! Backbones, heads, model cards and weight loading.
//!
//! A backbone is a plain struct built from a scoped `candle_nn::VarBuilder`, so its struct nesting is the
//! timm/torchvision safetensors key layout and pretrained weights load for free. A backbone is an ordered list
//! of named *layer groups* (ResNet: stem, layer1..layer4; EfficientNet and MobileNetV3: stem, their stages, top; ViT: embed, blocks1..4, norm; ...); the
//! classifier (`fc` / `_fc`) is a separate [`Linear`](layers::Linear) head so a new one can replace it.

pub mod base;
pub mod card;
pub mod classifier;
pub mod convnext;
pub mod efficientnet;
pub mod effnet;
pub mod encoder;
pub mod head;
pub mod hub;
pub mod layers;
pub mod pretrained;
pub mod resnet;
pub mod vit;

use crate::Result;
use candle_core::Tensor;

/// How a layer group runs.
///
/// * `Train`: BatchNorm uses batch statistics and updates its running statistics; dropout is active;
///   autograd records the ops.
/// * `Eval`: BatchNorm uses running statistics; autograd still records ops on trainable weights.
/// * `Frozen`: like `Eval`, but weights are used detached, so no gradient graph is built at all and the
///   running statistics are never touched. Frozen groups cost a plain inference forward.
/// * `FrozenTrainBn`: frozen, except that BatchNorm scales and shifts still train (fastai's `train_bn`):
///   convolution weights are detached, BatchNorm runs on its running statistics and leaves them alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
    Frozen,
    FrozenTrainBn,
}

impl Mode {
    /// True when BatchNorm should use (and update) batch statistics.
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
    /// Returns `t` detached when frozen, so ops on it are not recorded.
    pub fn weight(self, t: &Tensor) -> Tensor {
        if matches!(self, Mode::Frozen | Mode::FrozenTrainBn) {
            t.detach()
        } else {
            t.clone()
        }
    }
    /// A BatchNorm scale or shift: detached only in `Frozen` (it trains in `FrozenTrainBn`).
    pub fn bn_param(self, t: &Tensor) -> Tensor {
        if self == Mode::Frozen {
            t.detach()
        } else {
            t.clone()
        }
    }
}

/// An ImageNet-style feature extractor made of ordered layer groups.
pub trait Backbone: Send + Sync {
    /// Architecture name, e.g. `resnet18`, `efficientnet_lite0`.
    fn arch(&self) -> &str;
    /// Names of the layer groups in forward order (the classifier head is not one of them).
    fn group_names(&self) -> Vec<String>;
    /// Index of the group that owns the parameter or buffer with this full key (e.g. `layer3.1.bn1.weight`),
    /// or `None` if the key is not part of the backbone (e.g. the classifier).
    fn group_of(&self, key: &str) -> Option<usize>;
    /// Channels of the pooled feature vector.
    fn feature_dim(&self) -> usize;
    /// Key prefix of the pretrained classifier in the weights file (`fc` for ResNet, `_fc` for EfficientNet).
    fn classifier_prefix(&self) -> &str;
    /// Runs group `i` alone on the output of group `i - 1` (or the image batch for `i == 0`).
    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor>;

    /// The layer of parameter `key` for layer-wise learning-rate decay (`--layer-decay`, timm's
    /// `param_groups_layer_decay`), from 0 (nearest the input) to [`Backbone::decay_layers`]` - 1`; the
    /// classifier head is layer `decay_layers()`. `None` for keys outside the backbone. By default each
    /// layer group is one layer; a transformer counts its blocks.
    fn decay_layer(&self, key: &str) -> Option<usize> {
        self.group_of(key)
    }

    /// The number of backbone layers [`Backbone::decay_layer`] counts.
    fn decay_layers(&self) -> usize {
        self.group_names().len()
    }

    /// The convolution whose output the BatchNorm at `bn` (a key prefix such as `layer1.0.bn1`) normalises,
    /// as `(its key prefix, the BatchNorm's eps)`, for folding BatchNorm into convolutions on export; `None`
    /// when `bn` is not a BatchNorm of this backbone that directly follows a convolution.
    fn conv_of_bn(&self, _bn: &str) -> Option<(String, f64)> {
        None
    }

    /// The feature vector `[N, feature_dim]` of the last group's output: global average pooling for
    /// convolutional backbones (override for backbones whose last group already gives vectors).
    fn pool(&self, h: &Tensor) -> Result<Tensor> {
        layers::global_avg_pool(h)
    }

    /// Pooled features `[N, feature_dim]`: groups with index `< frozen_groups` run in `Mode::Frozen`,
    /// the rest in `mode`.
    fn forward_features(&self, x: &Tensor, mode: Mode, frozen_groups: usize) -> Result<Tensor> {
        let mut h = x.clone();
        for i in 0..self.group_names().len() {
            let m = if i < frozen_groups {
                Mode::Frozen
            } else {
                mode
            };
            h = self.forward_group(i, &h, m)?;
        }
        self.pool(&h)
    }
}

/// Trainable parameters (BatchNorm statistics not counted) of architecture `arch` with a `num_classes`-way
/// linear classifier, counted by building it once with random weights on the CPU.
pub fn parameter_count(arch: &str, num_classes: usize) -> Result<usize> {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(
        &varmap,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    let backbone = build_backbone(arch, vb.clone())?;
    candle_nn::linear(
        backbone.feature_dim(),
        num_classes,
        vb.pp(backbone.classifier_prefix()),
    )?;
    let data = varmap.data().lock().expect("varmap lock");
    Ok(data
        .iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(_, v)| v.elem_count())
        .sum())
}

/// Builds the backbone of architecture `arch` (as named in model cards, or an encoder arch string such as
/// `dense:784,300,150`, see [`encoder::EncoderConfig::parse`]) from a scoped builder.
pub fn build_backbone(arch: &str, vb: candle_nn::VarBuilder) -> Result<Box<dyn Backbone>> {
    build_backbone_with_drop_path(arch, 0.0, vb)
}

/// [`build_backbone`] with stochastic depth `drop_path` (timm's `drop_path_rate`: the last block's rate,
/// rising linearly from 0 at the first) where the architecture has it (ConvNeXt, EfficientNet-B,
/// MobileNetV3, ViT/DeiT); a positive rate for any other is an error naming it.
pub fn build_backbone_with_drop_path(
    arch: &str,
    drop_path: f32,
    vb: candle_nn::VarBuilder,
) -> Result<Box<dyn Backbone>> {
    let stochastic = arch.starts_with("convnext_")
        || vit::VitConfig::is_arch(arch)
        || effnet::EffNetConfig::is_arch(arch);
    if drop_path != 0.0 && !stochastic {
        return Err(crate::Error::config(
            "--drop-path",
            format!("`{arch}` has no stochastic depth (ConvNeXt, EfficientNet-B, MobileNetV3 and ViT/DeiT have)"),
        ));
    }
    if encoder::EncoderConfig::is_encoder_arch(arch) {
        encoder::EncoderConfig::parse(arch)?.build(vb)
    } else if arch.starts_with("resnet") {
        let cfg = resnet::ResNetConfig::from_arch(arch)?;
        Ok(Box::new(resnet::ResNet::new(cfg, vb)?))
    } else if arch.starts_with("convnext_") {
        let mut cfg = convnext::ConvNextConfig::from_arch(arch)?;
        cfg.drop_path = drop_path;
        Ok(Box::new(convnext::ConvNext::new(cfg, vb)?))
    } else if vit::VitConfig::is_arch(arch) {
        let mut cfg = vit::VitConfig::from_arch(arch)?;
        cfg.drop_path = drop_path;
        Ok(Box::new(vit::Vit::new(cfg, vb)?))
    } else if effnet::EffNetConfig::is_arch(arch) {
        let mut cfg = effnet::EffNetConfig::from_arch(arch)?;
        cfg.drop_path = drop_path;
        Ok(Box::new(effnet::EffNet::new(cfg, vb)?))
    } else if arch.starts_with("efficientnet_lite") {
        let cfg = efficientnet::EfficientNetLiteConfig::from_arch(arch)?;
        Ok(Box::new(efficientnet::EfficientNetLite::new(cfg, vb)?))
    } else {
        Err(crate::Error::config(
            "architecture",
            format!("`{arch}` is not one graft can build (resnet18/34/50, efficientnet_lite0..4, efficientnet_b0..3, mobilenetv3_large_100, mobilenetv3_small_100, convnext_atto/femto/pico/nano/tiny/small, vit_small_patch16_224, deit_small_patch16_224, dense:..., conv:...)"),
        ))
    }
}
