//! ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck, stride on the 3x3 conv: "ResNet v1.5"), with
//! torchvision's key names, which timm's `resnet18/34/50` share:
//! `conv1`, `bn1`, `layer{1..4}.{i}.conv1/bn1/conv2/bn2[/conv3/bn3][/downsample.0/downsample.1]`, `fc`.
//!
//! Layer groups, in forward order: `stem` (conv1, bn1, ReLU, 3x3/2 max-pool), `layer1` .. `layer4`. The
//! classifier `fc` is not a group: it is a separate [`Linear`] that [`ResNet::classifier`] builds, so a new
//! head of any width can take its place.

use super::layers::{batch_norm, conv2d, conv_bn, conv_bn_act, linear, Activation};
use super::layers::{BatchNorm, Conv2d, Conv2dConfig, Linear};
use super::{Backbone, Mode};
use crate::kernels::{add_relu, max_pool2d};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// BatchNorm epsilon of torchvision and timm ResNets.
pub const RESNET_BN_EPS: f64 = 1e-5;

/// The residual block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Block {
    /// Two 3x3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4 (ResNet-50 and deeper).
    Bottleneck,
}

impl Block {
    /// Ratio of a block's output channels to its stage width.
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// The shape of a ResNet: its name, block kind and number of blocks per stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub arch: String,
    pub block: Block,
    pub layers: [usize; 4],
}

/// Width of each stage before expansion.
const STAGE_WIDTHS: [usize; 4] = [64, 128, 256, 512];

/// Names of the layer groups, in forward order.
pub const GROUP_NAMES: [&str; 5] = ["stem", "layer1", "layer2", "layer3", "layer4"];

impl ResNetConfig {
    pub fn resnet18() -> Self {
        Self {
            arch: "resnet18".into(),
            block: Block::Basic,
            layers: [2, 2, 2, 2],
        }
    }

    pub fn resnet34() -> Self {
        Self {
            arch: "resnet34".into(),
            block: Block::Basic,
            layers: [3, 4, 6, 3],
        }
    }

    pub fn resnet50() -> Self {
        Self {
            arch: "resnet50".into(),
            block: Block::Bottleneck,
            layers: [3, 4, 6, 3],
        }
    }

    /// The configuration of a known architecture name (`resnet18`, `resnet34`, `resnet50`).
    pub fn from_arch(arch: &str) -> Result<Self> {
        match arch {
            "resnet18" => Ok(Self::resnet18()),
            "resnet34" => Ok(Self::resnet34()),
            "resnet50" => Ok(Self::resnet50()),
            other => Err(Error::config(
                "resnet arch",
                format!("`{other}` is not one of resnet18, resnet34, resnet50"),
            )),
        }
    }

    /// Channels of the pooled feature vector (512 for Basic, 2048 for Bottleneck).
    pub fn feature_dim(&self) -> usize {
        STAGE_WIDTHS[3] * self.block.expansion()
    }
}

/// `downsample.0` (1x1 conv with the block's stride) and `downsample.1` (BatchNorm) on the shortcut.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

impl Downsample {
    fn new(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(in_c, out_c, 1, cfg, vb.pp("0"))?,
            bn: batch_norm(out_c, RESNET_BN_EPS, vb.pp("1"))?,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        conv_bn(x, &self.conv, &self.bn, mode)
    }
}

/// One residual block: a chain of (conv, bn) pairs with ReLU between them, plus the shortcut.
/// `convs` holds `conv1/bn1, conv2/bn2` (Basic) or `conv1/bn1 .. conv3/bn3` (Bottleneck).
#[derive(Debug, Clone)]
struct ResBlock {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<Downsample>,
}

impl ResBlock {
    fn new(block: Block, in_c: usize, width: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out_c = width * block.expansion();
        // (in, out, kernel, stride, padding) of each conv in order.
        let shapes: Vec<(usize, usize, usize, usize, usize)> = match block {
            Block::Basic => vec![(in_c, width, 3, stride, 1), (width, width, 3, 1, 1)],
            Block::Bottleneck => vec![
                (in_c, width, 1, 1, 0),
                (width, width, 3, stride, 1),
                (width, out_c, 1, 1, 0),
            ],
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, k, s, p))| {
                let cfg = Conv2dConfig {
                    padding: p,
                    stride: s,
                    ..Default::default()
                };
                let conv = conv2d(ci, co, k, cfg, vb.pp(format!("conv{}", i + 1)))?;
                let bn = batch_norm(co, RESNET_BN_EPS, vb.pp(format!("bn{}", i + 1)))?;
                Ok((conv, bn))
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || in_c != out_c {
            Some(Downsample::new(in_c, out_c, stride, vb.pp("downsample"))?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            let act = if i != last {
                Activation::Relu
            } else {
                Activation::Identity
            };
            h = conv_bn_act(&h, conv, bn, mode, act)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, mode)?,
            None => x.clone(),
        };
        Ok(add_relu(&h, &shortcut)?)
    }
}

/// A ResNet backbone, optionally with its classifier `fc`.
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm,
    stages: Vec<Vec<ResBlock>>,
    fc: Option<Linear>,
}

impl ResNet {
    /// Builds the backbone (no classifier) from a builder scoped at the weights' root.
    pub fn new(cfg: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.layers.contains(&0) {
            return Err(Error::config(
                "resnet layers",
                format!("every stage needs at least one block, got {:?}", cfg.layers),
            ));
        }
        let stem_cfg = Conv2dConfig {
            padding: 3,
            stride: 2,
            ..Default::default()
        };
        let conv1 = conv2d(3, 64, 7, stem_cfg, vb.pp("conv1"))?;
        let bn1 = batch_norm(64, RESNET_BN_EPS, vb.pp("bn1"))?;
        let mut in_c = 64;
        let mut stages = Vec::with_capacity(4);
        for (s, (&blocks, &width)) in cfg.layers.iter().zip(STAGE_WIDTHS.iter()).enumerate() {
            let vb_stage = vb.pp(format!("layer{}", s + 1));
            let mut stage = Vec::with_capacity(blocks);
            for b in 0..blocks {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                stage.push(ResBlock::new(
                    cfg.block,
                    in_c,
                    width,
                    stride,
                    vb_stage.pp(b),
                )?);
                in_c = width * cfg.block.expansion();
            }
            stages.push(stage);
        }
        Ok(Self {
            cfg,
            conv1,
            bn1,
            stages,
            fc: None,
        })
    }

    /// Builds the backbone and a `num_classes`-way classifier `fc` (1000 for the pretrained ImageNet head).
    pub fn with_classifier(cfg: ResNetConfig, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let mut net = Self::new(cfg, vb.clone())?;
        net.fc = Some(net.classifier(num_classes, vb)?);
        Ok(net)
    }

    /// A fresh `num_classes`-way linear head over the pooled features, under `fc` of the root builder `vb`.
    pub fn classifier(&self, num_classes: usize, vb: VarBuilder) -> Result<Linear> {
        linear(
            self.feature_dim(),
            num_classes,
            vb.pp(self.classifier_prefix()),
        )
    }

    /// Replaces (or removes) the classifier that [`ResNet::forward_t`] applies.
    pub fn set_classifier(&mut self, fc: Option<Linear>) {
        self.fc = fc;
    }

    pub fn fc(&self) -> Option<&Linear> {
        self.fc.as_ref()
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Logits in `mode`, with groups `< frozen_groups` frozen; the classifier runs in `mode`.
    pub fn forward_logits(&self, x: &Tensor, mode: Mode, frozen_groups: usize) -> Result<Tensor> {
        let fc = self.fc.as_ref().ok_or_else(|| {
            Error::config(
                "resnet classifier",
                format!("{} was built without `fc`", self.cfg.arch),
            )
        })?;
        fc.forward(&self.forward_features(x, mode, frozen_groups)?, mode)
    }

    /// Logits of the whole network, in training mode (`Mode::Train`) or not (`Mode::Eval`).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mode = if train { Mode::Train } else { Mode::Eval };
        self.forward_logits(x, mode, 0)
    }
}

impl Backbone for ResNet {
    fn arch(&self) -> &str {
        &self.cfg.arch
    }

    fn group_names(&self) -> Vec<String> {
        GROUP_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn group_of(&self, key: &str) -> Option<usize> {
        let head = key.split('.').next()?;
        match head {
            "conv1" | "bn1" => Some(0),
            _ => GROUP_NAMES[1..]
                .iter()
                .position(|g| *g == head)
                .map(|i| i + 1),
        }
    }

    fn feature_dim(&self) -> usize {
        self.cfg.feature_dim()
    }

    fn classifier_prefix(&self) -> &str {
        "fc"
    }

    fn conv_of_bn(&self, bn: &str) -> Option<(String, f64)> {
        let (parent, last) = match bn.rsplit_once('.') {
            Some((p, l)) => (format!("{p}."), l),
            None => (String::new(), bn),
        };
        let conv = if parent.ends_with("downsample.") && last == "1" {
            "0".to_string()
        } else {
            let k = last.strip_prefix("bn")?;
            k.parse::<usize>().ok()?;
            format!("conv{k}")
        };
        Some((format!("{parent}{conv}"), RESNET_BN_EPS))
    }

    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match i {
            0 => {
                let h = conv_bn_act(x, &self.conv1, &self.bn1, mode, Activation::Relu)?;
                max_pool2d(&h, 3, 2, 1)
            }
            1..=4 => self.stages[i - 1]
                .iter()
                .try_fold(x.clone(), |h, block| block.forward(&h, mode)),
            _ => Err(Error::config(
                "resnet group",
                format!("index {i} out of range 0..{}", GROUP_NAMES.len()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn small_resnet18() -> (ResNet, VarMap) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = ResNet::with_classifier(ResNetConfig::resnet18(), 10, vb).unwrap();
        (net, varmap)
    }

    #[test]
    fn frozen_groups_get_no_gradient_and_keep_their_running_stats() {
        let (net, varmap) = small_resnet18();
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        let stem_mean_before = varmap.data().lock().unwrap()["bn1.running_mean"]
            .as_tensor()
            .copy()
            .unwrap();
        // stem, layer1, layer2 frozen; layer3, layer4 and the head train.
        let logits = net.forward_logits(&x, Mode::Train, 3).unwrap();
        let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        for (key, var) in vars.iter() {
            let group = net.group_of(key);
            let is_buffer = key.contains("running_");
            let has_grad = grads.get(var.as_tensor()).is_some();
            match group {
                Some(g) if g < 3 => assert!(!has_grad, "frozen `{key}` got a gradient"),
                _ if is_buffer => assert!(!has_grad, "buffer `{key}` got a gradient"),
                _ => assert!(has_grad, "trainable `{key}` got no gradient"),
            }
        }
        let stem_mean_after = vars["bn1.running_mean"].as_tensor();
        let moved = (stem_mean_after - &stem_mean_before)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(moved, 0.0, "frozen BatchNorm running mean changed");
        let layer4_var = vars["layer4.1.bn2.running_var"].as_tensor();
        let ones = layer4_var.ones_like().unwrap();
        let moved = (layer4_var - ones)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 0.0, "trained BatchNorm running var did not move");
    }

    #[test]
    fn frozen_and_eval_forwards_agree() {
        // Frozen only drops the gradient graph (and the output copy of Eval's differentiable conv op).
        let (net, _varmap) = small_resnet18();
        let x = Tensor::randn(0f32, 1., (2, 3, 40, 40), &Device::Cpu).unwrap();
        let eval = net.forward_logits(&x, Mode::Eval, 0).unwrap();
        let frozen = net.forward_logits(&x, Mode::Frozen, 5).unwrap();
        let scale = eval
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (eval - frozen)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-4 * scale.max(1.), "{diff} vs scale {scale}");
    }

    #[test]
    fn keys_map_to_their_groups() {
        let (net, varmap) = small_resnet18();
        assert_eq!(net.group_of("conv1.weight"), Some(0));
        assert_eq!(net.group_of("bn1.running_var"), Some(0));
        assert_eq!(net.group_of("layer1.0.conv1.weight"), Some(1));
        assert_eq!(net.group_of("layer4.1.downsample.1.bias"), Some(4));
        assert_eq!(net.group_of("fc.weight"), None);
        assert_eq!(net.group_of("layer10.0.conv1.weight"), None);
        for key in varmap.data().lock().unwrap().keys() {
            let expected_head = key.starts_with("fc.");
            assert_eq!(net.group_of(key).is_none(), expected_head, "{key}");
        }
    }

    #[test]
    fn each_depth_has_torchvision_keys_and_feature_size() {
        // (config, parameter + buffer count in torchvision's state_dict without num_batches_tracked, features)
        for (cfg, tensors, dim) in [
            (ResNetConfig::resnet18(), 102, 512),
            (ResNetConfig::resnet34(), 182, 512),
            (ResNetConfig::resnet50(), 267, 2048),
        ] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let net = ResNet::with_classifier(cfg.clone(), 1000, vb).unwrap();
            let vars = varmap.data().lock().unwrap();
            assert_eq!(vars.len(), tensors, "{}", cfg.arch);
            assert_eq!(net.feature_dim(), dim);
            assert_eq!(vars["fc.weight"].dims(), &[1000, dim]);
            assert!(vars.contains_key("layer2.0.downsample.0.weight"));
            if cfg.block == Block::Bottleneck {
                assert_eq!(vars["layer1.0.conv3.weight"].dims(), &[256, 64, 1, 1]);
                assert_eq!(vars["layer4.2.conv2.weight"].dims(), &[512, 512, 3, 3]);
            }
        }
    }

    #[test]
    fn a_bottleneck_network_runs_a_training_step() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = ResNet::with_classifier(ResNetConfig::resnet50(), 5, vb).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        let logits = net.forward_t(&x, true).unwrap();
        assert_eq!(logits.dims(), &[2, 5]);
        let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        for key in [
            "conv1.weight",
            "layer1.0.conv3.weight",
            "layer1.0.downsample.0.weight",
            "layer4.2.bn3.bias",
        ] {
            let g = grads
                .get(vars[key].as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {key}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{key}: gradient norm {norm}"
            );
        }
    }

    #[test]
    fn group_outputs_have_the_expected_shapes() {
        let (net, _varmap) = small_resnet18();
        let mut h = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let expected = [
            [1, 64, 16, 16],
            [1, 64, 16, 16],
            [1, 128, 8, 8],
            [1, 256, 4, 4],
            [1, 512, 2, 2],
        ];
        for (i, dims) in expected.iter().enumerate() {
            h = net.forward_group(i, &h, Mode::Eval).unwrap();
            assert_eq!(h.dims(), dims, "group {}", GROUP_NAMES[i]);
        }
        assert!(net.forward_group(5, &h, Mode::Eval).is_err());
    }

    #[test]
    fn unknown_arch_is_a_config_error() {
        assert!(matches!(
            ResNetConfig::from_arch("resnet19"),
            Err(Error::Config { .. })
        ));
    }
}
