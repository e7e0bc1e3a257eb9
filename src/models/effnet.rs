//! timm's EfficientNet family in timm's key layout (`timm.models.efficientnet`, `timm.models.mobilenetv3`,
//! built by `_efficientnet_builder`), so a timm `model.safetensors` (the hub's `timm/efficientnet_b0.ra_in1k`,
//! `timm/mobilenetv3_large_100.ra_in1k`, ...) loads strictly:
//!
//! * EfficientNet-B0..B3 (`efficientnet_b0` ..): SiLU, squeeze-excite with a sigmoid gate whose width is a
//!   quarter of the block's *input* channels, BatchNorm eps 1e-5, PyTorch's symmetric padding (timm's
//!   `efficientnet_*`, not the TensorFlow-ported `tf_efficientnet_*`);
//! * MobileNetV3-Large and -Small at width 1.0 (`mobilenetv3_large_100`, `mobilenetv3_small_100`):
//!   hard-swish (ReLU in the blocks timm marks `nre`), squeeze-excite with ReLU and a hard-sigmoid gate whose
//!   width is a quarter of the *expanded* channels rounded to a multiple of 8, and a head that pools first
//!   and then runs a 1x1 convolution with bias and hard-swish.
//!
//! Keys: `conv_stem`, `bn1`; `blocks.S.B` with, per block kind (timm's block strings, [`BlockSpec::parse`]):
//! `ds` (depthwise-separable: `conv_dw`, `bn1`, `se`, `conv_pw`, `bn2`), `ir` (inverted residual:
//! `conv_pw`, `bn1`, `conv_dw`, `bn2`, `se`, `conv_pwl`, `bn3`), `cn` (`conv`, `bn1`); squeeze-excite
//! `se.conv_reduce` and `se.conv_expand` (1x1 with bias); then `conv_head` (and for EfficientNet `bn2`) and the
//! classifier `classifier`.
//!
//! Stochastic depth ([`EffNetConfig::drop_path`], timm's `drop_path_rate`) drops the residual branch of
//! block `i` of `n` with probability `rate * i / n`, in training only.
//!
//! Layer groups, in forward order: `stem` (`conv_stem`, `bn1`), `stage1` .. `stageN` (`blocks.0` ..), `top`
//! (EfficientNet: `conv_head` and `bn2`, then the usual global pool; MobileNetV3: the global pool, `conv_head`
//! and hard-swish, so this group already returns `[N, C]` vectors and the feature cache stays exact).

use super::layers::{
    self, batch_norm, conv2d, drop_path, Activation, BatchNorm, Conv2d, Conv2dConfig,
};
use super::{Backbone, Mode};
use crate::{kernels, Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// BatchNorm eps of timm's (PyTorch-trained) EfficientNets and MobileNetV3s.
pub const EFFNET_BN_EPS: f64 = 1e-5;

/// The kind of a block, as timm's block strings name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `ds`: depthwise kxk, squeeze-excite, pointwise 1x1 (no activation after it).
    DepthwiseSeparable,
    /// `ir`: pointwise expansion, depthwise kxk, squeeze-excite, pointwise projection.
    InvertedResidual,
    /// `cn`: a plain convolution, BatchNorm and activation.
    ConvBnAct,
}

/// One entry of a timm `arch_def`, e.g. `ir_r2_k3_s2_e6_c24_se0.25`: `repeats` blocks of `kind` with a
/// `kernel` x `kernel` (depthwise) convolution, the first with `stride`, expanding by `expand`, giving
/// `out_channels` (before the width multiplier), squeeze-excite ratio `se` (0: none), and `relu` for `nre`
/// (ReLU instead of the network's activation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSpec {
    pub kind: BlockKind,
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: f64,
    pub out_channels: usize,
    pub se: f64,
    pub relu: bool,
}

impl BlockSpec {
    /// Parses timm's block string (`_decode_block_str`), the options graft builds: `r`, `k`, `s`, `e`, `c`,
    /// `se`, `nre`. Anything else is an error naming the option.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| Error::config(format!("block string `{s}`"), why);
        let mut parts = s.split('_');
        let kind = match parts.next().unwrap_or("") {
            "ds" => BlockKind::DepthwiseSeparable,
            "ir" => BlockKind::InvertedResidual,
            "cn" => BlockKind::ConvBnAct,
            other => {
                return Err(bad(format!(
                    "block kind `{other}` is not one of: ds, ir, cn"
                )))
            }
        };
        let mut spec = BlockSpec {
            kind,
            repeats: 1,
            kernel: 3,
            stride: 1,
            expand: 1.0,
            out_channels: 0,
            se: 0.0,
            relu: false,
        };
        for opt in parts {
            let num = |v: &str| -> Result<f64> {
                v.parse::<f64>()
                    .map_err(|_| bad(format!("option `{opt}` has no number")))
            };
            if opt == "nre" {
                spec.relu = true;
            } else if let Some(v) = opt.strip_prefix("se") {
                spec.se = num(v)?;
            } else if let Some(v) = opt.strip_prefix('r') {
                spec.repeats = num(v)? as usize;
            } else if let Some(v) = opt.strip_prefix('k') {
                spec.kernel = num(v)? as usize;
            } else if let Some(v) = opt.strip_prefix('s') {
                spec.stride = num(v)? as usize;
            } else if let Some(v) = opt.strip_prefix('e') {
                spec.expand = num(v)?;
            } else if let Some(v) = opt.strip_prefix('c') {
                spec.out_channels = num(v)? as usize;
            } else {
                return Err(bad(format!(
                    "option `{opt}` is not one of: r, k, s, e, c, se, nre"
                )));
            }
        }
        if spec.repeats == 0
            || spec.stride == 0
            || spec.kernel.is_multiple_of(2)
            || spec.out_channels == 0
            || spec.expand <= 0.
        {
            return Err(bad(
                "repeats, stride, channels and expansion must be positive and the kernel odd"
                    .into(),
            ));
        }
        Ok(spec)
    }
}

/// Which of timm's two classes the network is: they differ in squeeze-excite and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `EfficientNet`: SE width from the block input, `round`ed; SE activation the block's; sigmoid
    /// gate; head `conv_head` -> `bn2` -> activation before the pool.
    EfficientNet,
    /// `MobileNetV3`: SE width from the expanded channels, to a multiple of 8; ReLU in the SE;
    /// hard-sigmoid gate; head pool -> `conv_head` (with bias) -> activation.
    MobileNetV3,
}

/// The shape of a network of the family: stages of decoded blocks (repeats already depth-scaled, channels
/// already width-scaled) plus stem and head widths.
#[derive(Debug, Clone, PartialEq)]
pub struct EffNetConfig {
    pub arch: String,
    pub family: Family,
    /// The network's activation (SiLU for EfficientNet, hard-swish for MobileNetV3).
    pub act: Activation,
    pub stem_channels: usize,
    /// Each stage's block entries.
    pub stages: Vec<Vec<BlockSpec>>,
    /// Channels of the head convolution (the pooled feature vector).
    pub head_channels: usize,
    /// Stochastic-depth rate (timm's `drop_path_rate`, default 0; timm trained B0 with 0.2).
    pub drop_path: f32,
}

/// timm's `make_divisible` / TensorFlow's `round_filters`: to the nearest multiple of `divisor` (at least
/// `divisor`), one step up where rounding lost more than 10%.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut rounded = ((((v + d / 2.) as usize) / divisor) * divisor).max(divisor);
    if (rounded as f64) < 0.9 * v {
        rounded += divisor;
    }
    rounded
}

/// timm's `_scale_stage_depth` (`depth_trunc='ceil'`): the stage's total repeats times `depth`, rounded up,
/// shared out over its entries from the last one backwards.
fn scale_stage_depth(stage: &mut [BlockSpec], depth: f64) {
    let mut total: usize = stage.iter().map(|b| b.repeats).sum();
    let mut scaled = (total as f64 * depth).ceil() as usize;
    for b in stage.iter_mut().rev() {
        let r = b.repeats;
        let rs = ((r as f64 / total as f64 * scaled as f64).round_ties_even() as usize).max(1);
        total -= r;
        scaled = scaled.saturating_sub(rs);
        b.repeats = rs;
    }
}

const EFFICIENTNET_ARCH: [&[&str]; 7] = [
    &["ds_r1_k3_s1_e1_c16_se0.25"],
    &["ir_r2_k3_s2_e6_c24_se0.25"],
    &["ir_r2_k5_s2_e6_c40_se0.25"],
    &["ir_r3_k3_s2_e6_c80_se0.25"],
    &["ir_r3_k5_s1_e6_c112_se0.25"],
    &["ir_r4_k5_s2_e6_c192_se0.25"],
    &["ir_r1_k3_s1_e6_c320_se0.25"],
];

const MOBILENETV3_LARGE_ARCH: [&[&str]; 7] = [
    &["ds_r1_k3_s1_e1_c16_nre"],
    &["ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"],
    &["ir_r3_k5_s2_e3_c40_se0.25_nre"],
    &[
        "ir_r1_k3_s2_e6_c80",
        "ir_r1_k3_s1_e2.5_c80",
        "ir_r2_k3_s1_e2.3_c80",
    ],
    &["ir_r2_k3_s1_e6_c112_se0.25"],
    &["ir_r3_k5_s2_e6_c160_se0.25"],
    &["cn_r1_k1_s1_c960"],
];

const MOBILENETV3_SMALL_ARCH: [&[&str]; 6] = [
    &["ds_r1_k3_s2_e1_c16_se0.25_nre"],
    &["ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"],
    &["ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"],
    &["ir_r2_k5_s1_e3_c48_se0.25"],
    &["ir_r3_k5_s2_e6_c96_se0.25"],
    &["cn_r1_k1_s1_c576"],
];

/// Channel and depth multipliers of EfficientNet-B0..B3 (timm's `efficientnet_bN`).
const EFFICIENTNET_PARAMS: [(f64, f64); 4] = [(1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4)];

/// Decodes an `arch_def`, scaling depth per stage and width per block (timm's `round_channels`).
fn decode(arch: &[&[&str]], width: f64, depth: f64) -> Result<Vec<Vec<BlockSpec>>> {
    arch.iter()
        .map(|stage| {
            let mut blocks = stage
                .iter()
                .map(|s| BlockSpec::parse(s))
                .collect::<Result<Vec<_>>>()?;
            scale_stage_depth(&mut blocks, depth);
            for b in &mut blocks {
                b.out_channels = make_divisible(b.out_channels as f64 * width, 8);
            }
            Ok(blocks)
        })
        .collect()
}

impl EffNetConfig {
    /// timm's `_gen_efficientnet` with `channel_multiplier = width`, `depth_multiplier = depth`.
    pub fn efficientnet(arch: &str, width: f64, depth: f64) -> Result<Self> {
        Ok(Self {
            arch: arch.to_string(),
            family: Family::EfficientNet,
            act: Activation::Silu,
            stem_channels: make_divisible(32. * width, 8),
            stages: decode(&EFFICIENTNET_ARCH, width, depth)?,
            head_channels: make_divisible(1280. * width, 8),
            drop_path: 0.0,
        })
    }

    /// timm's `_gen_mobilenet_v3` (not the `minimal` variants) with `channel_multiplier = width`: the stem
    /// is not scaled below 0.75 (`fix_stem`), the head convolution never is.
    pub fn mobilenet_v3(arch: &str, large: bool, width: f64) -> Result<Self> {
        let (def, head): (&[&[&str]], usize) = if large {
            (&MOBILENETV3_LARGE_ARCH, 1280)
        } else {
            (&MOBILENETV3_SMALL_ARCH, 1024)
        };
        Ok(Self {
            arch: arch.to_string(),
            family: Family::MobileNetV3,
            act: Activation::HardSwish,
            stem_channels: if width < 0.75 {
                16
            } else {
                make_divisible(16. * width, 8)
            },
            stages: decode(def, width, 1.0)?,
            head_channels: head,
            drop_path: 0.0,
        })
    }

    /// The configuration named `arch`: `efficientnet_b0` .. `efficientnet_b3`, `mobilenetv3_large_100`,
    /// `mobilenetv3_small_100`.
    pub fn from_arch(arch: &str) -> Result<Self> {
        if let Some(n) = arch
            .strip_prefix("efficientnet_b")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < EFFICIENTNET_PARAMS.len())
        {
            let (w, d) = EFFICIENTNET_PARAMS[n];
            return Self::efficientnet(arch, w, d);
        }
        match arch {
            "mobilenetv3_large_100" => Self::mobilenet_v3(arch, true, 1.0),
            "mobilenetv3_small_100" => Self::mobilenet_v3(arch, false, 1.0),
            _ => Err(Error::config(
                "architecture",
                format!("`{arch}` is not one of: efficientnet_b0, efficientnet_b1, efficientnet_b2, efficientnet_b3, mobilenetv3_large_100, mobilenetv3_small_100"),
            )),
        }
    }

    /// Whether `arch` names a network of this module.
    pub fn is_arch(arch: &str) -> bool {
        arch.starts_with("efficientnet_b") || arch.starts_with("mobilenetv3_")
    }

    fn check(&self) -> Result<()> {
        if self.stages.is_empty() || self.stages.iter().any(|s| s.is_empty()) {
            return Err(Error::config(&self.arch, "has an empty stage"));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err(Error::config(
                format!("{} drop_path", self.arch),
                format!("{} is not in [0, 1)", self.drop_path),
            ));
        }
        Ok(())
    }
}

/// A bias-free convolution (PyTorch padding `k / 2`), its BatchNorm and an activation.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    act: Activation,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        act: Activation,
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
            bn: batch_norm(cout, EFFNET_BN_EPS, bn_vb)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        layers::conv_bn_act(x, &self.conv, &self.bn, mode, self.act)
    }
}

/// Squeeze-excite: `x * gate(expand(act(reduce(mean_hw(x)))))`, the two 1x1 convolutions (with bias) run as
/// matrix products on the pooled `[N, C]` vectors.
#[derive(Debug, Clone)]
struct SqueezeExcite {
    reduce: Conv2d,
    expand: Conv2d,
    act: Activation,
    hard_gate: bool,
}

impl SqueezeExcite {
    fn new(
        channels: usize,
        reduced: usize,
        family: Family,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            bias: true,
            ..Default::default()
        };
        Ok(Self {
            reduce: conv2d(channels, reduced, 1, cfg, vb.pp("conv_reduce"))?,
            expand: conv2d(reduced, channels, 1, cfg, vb.pp("conv_expand"))?,
            act: match family {
                Family::EfficientNet => act,
                Family::MobileNetV3 => Activation::Relu,
            },
            hard_gate: family == Family::MobileNetV3,
        })
    }

    /// `[N, in] -> [N, out]` through a 1x1 convolution's weights.
    fn dense(conv: &Conv2d, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let w = mode.weight(conv.weight());
        let (out, inp) = (w.dim(0)?, w.dim(1)?);
        let b = mode.weight(conv.bias().expect("built with a bias"));
        Ok(x.matmul(&w.reshape((out, inp))?.t()?)?.broadcast_add(&b)?)
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let pooled = layers::global_avg_pool(x)?;
        let h = self.act.apply(&Self::dense(&self.reduce, &pooled, mode)?)?;
        let g = Self::dense(&self.expand, &h, mode)?;
        let g = if self.hard_gate {
            kernels::hard_sigmoid(&g)?
        } else {
            candle_nn::ops::sigmoid(&g)?
        };
        Ok(x.broadcast_mul(&g.reshape((n, c, 1, 1))?)?)
    }
}

/// One block of any [`BlockKind`]; `expand` is the inverted residual's `conv_pw`, `first` is `conv_dw`
/// (`ds`, `ir`) or `conv` (`cn`), `project` is `conv_pw` (`ds`) or `conv_pwl` (`ir`).
#[derive(Debug, Clone)]
struct Block {
    kind: BlockKind,
    expand: Option<ConvBn>,
    first: ConvBn,
    se: Option<SqueezeExcite>,
    project: Option<ConvBn>,
    residual: bool,
    drop_path: f32,
}

impl Block {
    fn new(
        spec: &BlockSpec,
        cin: usize,
        stride: usize,
        cfg: &EffNetConfig,
        drop_path: f32,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cout = spec.out_channels;
        let act = if spec.relu { Activation::Relu } else { cfg.act };
        let k = spec.kernel;
        let residual = stride == 1 && cin == cout && spec.kind != BlockKind::ConvBnAct;
        // timm: the SE width is `round(mid * se / expand)` (EfficientNet, from the block input) or
        // `make_divisible(mid * se)` (MobileNetV3, from the expanded channels).
        let se = |mid: usize, expand: f64, vb: VarBuilder| -> Result<Option<SqueezeExcite>> {
            if spec.se <= 0. {
                return Ok(None);
            }
            let reduced = match cfg.family {
                Family::EfficientNet => {
                    (mid as f64 * (spec.se / expand)).round_ties_even() as usize
                }
                Family::MobileNetV3 => make_divisible(mid as f64 * spec.se, 8),
            };
            Ok(Some(SqueezeExcite::new(mid, reduced, cfg.family, act, vb)?))
        };
        let block = match spec.kind {
            BlockKind::DepthwiseSeparable => Block {
                kind: spec.kind,
                expand: None,
                first: ConvBn::new(
                    cin,
                    cin,
                    k,
                    stride,
                    cin,
                    act,
                    vb.pp("conv_dw"),
                    vb.pp("bn1"),
                )?,
                se: se(cin, 1.0, vb.pp("se"))?,
                project: Some(ConvBn::new(
                    cin,
                    cout,
                    1,
                    1,
                    1,
                    Activation::Identity,
                    vb.pp("conv_pw"),
                    vb.pp("bn2"),
                )?),
                residual,
                drop_path,
            },
            BlockKind::InvertedResidual => {
                let mid = make_divisible(cin as f64 * spec.expand, 8);
                Block {
                    kind: spec.kind,
                    expand: Some(ConvBn::new(
                        cin,
                        mid,
                        1,
                        1,
                        1,
                        act,
                        vb.pp("conv_pw"),
                        vb.pp("bn1"),
                    )?),
                    first: ConvBn::new(
                        mid,
                        mid,
                        k,
                        stride,
                        mid,
                        act,
                        vb.pp("conv_dw"),
                        vb.pp("bn2"),
                    )?,
                    se: se(mid, spec.expand, vb.pp("se"))?,
                    project: Some(ConvBn::new(
                        mid,
                        cout,
                        1,
                        1,
                        1,
                        Activation::Identity,
                        vb.pp("conv_pwl"),
                        vb.pp("bn3"),
                    )?),
                    residual,
                    drop_path,
                }
            }
            BlockKind::ConvBnAct => Block {
                kind: spec.kind,
                expand: None,
                first: ConvBn::new(cin, cout, k, stride, 1, act, vb.pp("conv"), vb.pp("bn1"))?,
                se: None,
                project: None,
                residual,
                drop_path,
            },
        };
        Ok(block)
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = match &self.expand {
            Some(e) => e.forward(x, mode)?,
            None => x.clone(),
        };
        h = self.first.forward(&h, mode)?;
        if let Some(se) = &self.se {
            h = se.forward(&h, mode)?;
        }
        if let Some(p) = &self.project {
            h = p.forward(&h, mode)?;
        }
        if !self.residual {
            return Ok(h);
        }
        if mode.is_train() && self.drop_path > 0. {
            h = drop_path(&h, self.drop_path)?;
        }
        Ok((h + x)?)
    }

    /// The convolution key (relative to the block) that the BatchNorm `bn` (`bn1`, `bn2`, `bn3`) follows.
    fn conv_of_bn(&self, bn: &str) -> Option<&'static str> {
        match (self.kind, bn) {
            (BlockKind::DepthwiseSeparable, "bn1") => Some("conv_dw"),
            (BlockKind::DepthwiseSeparable, "bn2") => Some("conv_pw"),
            (BlockKind::InvertedResidual, "bn1") => Some("conv_pw"),
            (BlockKind::InvertedResidual, "bn2") => Some("conv_dw"),
            (BlockKind::InvertedResidual, "bn3") => Some("conv_pwl"),
            (BlockKind::ConvBnAct, "bn1") => Some("conv"),
            _ => None,
        }
    }
}

/// The head: EfficientNet's `conv_head` + `bn2` + activation (then the pool), or MobileNetV3's pool +
/// `conv_head` with bias + activation.
#[derive(Debug, Clone)]
enum Head {
    ConvBn(ConvBn),
    PoolConv(Conv2d, Activation),
}

/// A network of timm's EfficientNet family, without its classifier; see the module doc.
#[derive(Debug, Clone)]
pub struct EffNet {
    cfg: EffNetConfig,
    stem: ConvBn,
    /// `stages[s][b]` is `blocks.s.b`.
    stages: Vec<Vec<Block>>,
    head: Head,
}

impl EffNet {
    /// Builds the backbone from `vb` (the root of timm's key layout), without a classifier.
    pub fn new(cfg: EffNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let stem = ConvBn::new(
            3,
            cfg.stem_channels,
            3,
            2,
            1,
            cfg.act,
            vb.pp("conv_stem"),
            vb.pp("bn1"),
        )?;
        let total: usize = cfg.stages.iter().flatten().map(|b| b.repeats).sum();
        let mut index = 0;
        let mut cin = cfg.stem_channels;
        let mut stages = Vec::with_capacity(cfg.stages.len());
        for (s, specs) in cfg.stages.iter().enumerate() {
            let mut blocks = Vec::new();
            for spec in specs {
                for r in 0..spec.repeats {
                    let stride = if r == 0 { spec.stride } else { 1 };
                    // timm: drop_path_rate * block_idx / total_blocks.
                    let rate = cfg.drop_path * index as f32 / total as f32;
                    let b = blocks.len();
                    blocks.push(Block::new(
                        spec,
                        cin,
                        stride,
                        &cfg,
                        rate,
                        vb.pp("blocks").pp(s).pp(b),
                    )?);
                    cin = spec.out_channels;
                    index += 1;
                }
            }
            stages.push(blocks);
        }
        let head = match cfg.family {
            Family::EfficientNet => Head::ConvBn(ConvBn::new(
                cin,
                cfg.head_channels,
                1,
                1,
                1,
                cfg.act,
                vb.pp("conv_head"),
                vb.pp("bn2"),
            )?),
            Family::MobileNetV3 => {
                let c = Conv2dConfig {
                    bias: true,
                    ..Default::default()
                };
                Head::PoolConv(
                    conv2d(cin, cfg.head_channels, 1, c, vb.pp("conv_head"))?,
                    cfg.act,
                )
            }
        };
        Ok(Self {
            cfg,
            stem,
            stages,
            head,
        })
    }

    pub fn config(&self) -> &EffNetConfig {
        &self.cfg
    }
}

impl Backbone for EffNet {
    fn arch(&self) -> &str {
        &self.cfg.arch
    }

    fn group_names(&self) -> Vec<String> {
        let mut names = vec!["stem".to_string()];
        names.extend((1..=self.stages.len()).map(|i| format!("stage{i}")));
        names.push("top".into());
        names
    }

    fn group_of(&self, key: &str) -> Option<usize> {
        let mut parts = key.split('.');
        match parts.next()? {
            "conv_stem" | "bn1" => Some(0),
            "conv_head" => Some(self.stages.len() + 1),
            "bn2" if matches!(self.head, Head::ConvBn(_)) => Some(self.stages.len() + 1),
            "blocks" => {
                let s: usize = parts.next()?.parse().ok()?;
                (s < self.stages.len()).then_some(s + 1)
            }
            _ => None,
        }
    }

    fn feature_dim(&self) -> usize {
        self.cfg.head_channels
    }

    fn classifier_prefix(&self) -> &str {
        "classifier"
    }

    fn conv_of_bn(&self, bn: &str) -> Option<(String, f64)> {
        let conv = match bn {
            "bn1" => "conv_stem".to_string(),
            "bn2" if matches!(self.head, Head::ConvBn(_)) => "conv_head".to_string(),
            _ => {
                let rest = bn.strip_prefix("blocks.")?;
                let mut parts = rest.split('.');
                let s: usize = parts.next()?.parse().ok()?;
                let b: usize = parts.next()?.parse().ok()?;
                let last = parts.next()?;
                if parts.next().is_some() {
                    return None;
                }
                let conv = self.stages.get(s)?.get(b)?.conv_of_bn(last)?;
                format!("blocks.{s}.{b}.{conv}")
            }
        };
        Some((conv, EFFNET_BN_EPS))
    }

    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let stages = self.stages.len();
        if i == 0 {
            self.stem.forward(x, mode)
        } else if i <= stages {
            self.stages[i - 1]
                .iter()
                .try_fold(x.clone(), |h, block| block.forward(&h, mode))
        } else if i == stages + 1 {
            match &self.head {
                Head::ConvBn(cb) => cb.forward(x, mode),
                Head::PoolConv(conv, act) => {
                    let pooled = layers::global_avg_pool(x)?;
                    let w = mode.weight(conv.weight());
                    let (out, inp) = (w.dim(0)?, w.dim(1)?);
                    let b = mode.weight(conv.bias().expect("built with a bias"));
                    let h = pooled
                        .matmul(&w.reshape((out, inp))?.t()?)?
                        .broadcast_add(&b)?;
                    act.apply(&h)
                }
            }
        } else {
            Err(Error::config(
                format!("{} group", self.cfg.arch),
                format!("index {i} out of range 0..{}", stages + 2),
            ))
        }
    }

    /// MobileNetV3's last group already pools: its output is the feature vector.
    fn pool(&self, h: &Tensor) -> Result<Tensor> {
        if h.rank() == 2 {
            Ok(h.clone())
        } else {
            layers::global_avg_pool(h)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(arch: &str) -> (VarMap, EffNet) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = EffNet::new(EffNetConfig::from_arch(arch).unwrap(), vb).unwrap();
        (varmap, net)
    }

    #[test]
    fn block_strings_parse_as_timm_decodes_them() {
        let b = BlockSpec::parse("ir_r3_k5_s2_e6_c40_se0.25_nre").unwrap();
        assert_eq!(b.kind, BlockKind::InvertedResidual);
        assert_eq!(
            (b.repeats, b.kernel, b.stride, b.out_channels),
            (3, 5, 2, 40)
        );
        assert_eq!((b.expand, b.se, b.relu), (6.0, 0.25, true));
        let err = BlockSpec::parse("ir_r1_k3_x2_c8").unwrap_err();
        assert!(err.to_string().contains("`x2`"), "{err}");
        assert!(BlockSpec::parse("er_r1_k3_c8").is_err());
    }

    #[test]
    fn depth_scaling_follows_timm() {
        // timm `_scale_stage_depth` rounds each stage's total up: b1 (depth 1.1) turns every
        // single-block stage into two; b3 (1.4): 2, 3, 3, 5, 5, 6, 2.
        let repeats = |arch: &str| -> Vec<usize> {
            EffNetConfig::from_arch(arch)
                .unwrap()
                .stages
                .iter()
                .map(|s| s.iter().map(|b| b.repeats).sum())
                .collect()
        };
        assert_eq!(repeats("efficientnet_b0"), [1, 2, 2, 3, 3, 4, 1]);
        assert_eq!(repeats("efficientnet_b1"), [2, 3, 3, 4, 4, 5, 2]);
        assert_eq!(repeats("efficientnet_b3"), [2, 3, 3, 5, 5, 6, 2]);
        let b2 = EffNetConfig::from_arch("efficientnet_b2").unwrap();
        assert_eq!(b2.head_channels, 1408);
        assert_eq!(make_divisible(80. * 2.3, 8), 184);
        assert!(EffNetConfig::from_arch("efficientnet_b9").is_err());
    }

    #[test]
    fn groups_own_every_backbone_key_and_batchnorms_find_their_convolutions() {
        for arch in ["efficientnet_b0", "mobilenetv3_large_100"] {
            let (varmap, net) = build(arch);
            let keys: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
            for key in &keys {
                assert!(net.group_of(key).is_some(), "{arch} {key}");
                if let Some(bn) = key.strip_suffix(".running_mean") {
                    let (conv, eps) = net.conv_of_bn(bn).unwrap_or_else(|| panic!("{bn}"));
                    assert_eq!(eps, EFFNET_BN_EPS);
                    assert!(keys.contains(&format!("{conv}.weight")), "{conv}");
                }
            }
            assert_eq!(net.group_names().len(), 9);
        }
    }

    #[test]
    fn mobilenet_features_are_vectors_and_gradients_reach_the_stem() {
        let (varmap, net) = build("mobilenetv3_large_100");
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        let f = net.forward_features(&x, Mode::Train, 0).unwrap();
        assert_eq!(f.dims(), &[2, 1280]);
        let grads = f.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert!(grads.get(data["conv_stem.weight"].as_tensor()).is_some());
        // Frozen prefix: no gradient there.
        drop(data);
        let f = net.forward_features(&x, Mode::Train, 2).unwrap();
        let grads = f.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert!(grads.get(data["conv_stem.weight"].as_tensor()).is_none());
        assert!(grads
            .get(data["blocks.1.0.conv_pw.weight"].as_tensor())
            .is_some());
    }
}
