//! ConvNeXt (Liu et al. 2022) in timm's key layout (`timm.models.convnext`), so a timm `model.safetensors`
//! (the hub's `timm/convnext_tiny.in12k_ft_in1k`, ...) loads strictly:
//!
//! * `stem.0` (4x4 stride-4 convolution with bias), `stem.1` (LayerNorm over channels);
//! * `stages.S.downsample.0` (LayerNorm over channels) and `stages.S.downsample.1` (2x2 stride-2
//!   convolution), for stages 1..3 only;
//! * `stages.S.blocks.B.conv_dw` (7x7 depthwise with bias), `.norm` (LayerNorm), `.mlp.fc1`, `.mlp.fc2`
//!   (channels -> 4x -> channels, exact GELU between), `.gamma` (layer scale, initialised at 1e-6);
//! * `head.norm` (LayerNorm of the pooled features) and the classifier `head.fc`.
//!
//! The small models (atto, femto, pico, nano) are timm's `conv_mlp=True` variants, whose MLP is two 1x1
//! convolutions (weights `[out, in, 1, 1]`); tiny and small use `nn.Linear` (`[out, in]`). Both compute the
//! same thing, here as matrix products over channels-last rows, with the weights read in the file's shape.
//! LayerNorm eps is 1e-6 everywhere, as in timm.
//!
//! There is no BatchNorm, so training and inference differ only by stochastic depth
//! ([`ConvNextConfig::drop_path`]: timm's `drop_path_rate`, per-sample, rising linearly from 0 at the first
//! block to the rate at the last) and the dropout before the classifier.
//!
//! Layer groups, in forward order: `stem`, `stage1` .. `stage4` (each with its downsampling), `head_norm`
//! (global average pool and `head.norm`: this last group already returns `[N, C]` vectors, so freezing the
//! whole backbone also freezes the norm the classifier reads, and the feature cache stays exact).

use super::layers::{conv2d, drop_path, inference_epilogue_applies, Conv2d, Conv2dConfig};
use super::{Backbone, Mode};
use crate::kernels::conv::ConvPadding;
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::init::Init;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// LayerNorm eps of every ConvNeXt norm in timm.
pub const CONVNEXT_LN_EPS: f64 = 1e-6;

/// The shape of a ConvNeXt network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvNextConfig {
    pub arch: String,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Channels per stage.
    pub dims: Vec<usize>,
    /// The MLP as 1x1 convolutions (timm's `conv_mlp`; the key shapes differ, the function does not).
    pub conv_mlp: bool,
    /// Stochastic-depth rate of the last block in training (timm's `drop_path_rate`, default 0).
    #[serde(default)]
    pub drop_path: f32,
}

impl ConvNextConfig {
    fn new(arch: &str, depths: [usize; 4], dims: [usize; 4], conv_mlp: bool) -> Self {
        Self {
            arch: arch.to_string(),
            depths: depths.to_vec(),
            dims: dims.to_vec(),
            conv_mlp,
            drop_path: 0.0,
        }
    }

    /// timm's `convnext_atto` .. `convnext_small`.
    pub fn from_arch(arch: &str) -> Result<Self> {
        Ok(match arch {
            "convnext_atto" => Self::new(arch, [2, 2, 6, 2], [40, 80, 160, 320], true),
            "convnext_femto" => Self::new(arch, [2, 2, 6, 2], [48, 96, 192, 384], true),
            "convnext_pico" => Self::new(arch, [2, 2, 6, 2], [64, 128, 256, 512], true),
            "convnext_nano" => Self::new(arch, [2, 2, 8, 2], [80, 160, 320, 640], true),
            "convnext_tiny" => Self::new(arch, [3, 3, 9, 3], [96, 192, 384, 768], false),
            "convnext_small" => Self::new(arch, [3, 3, 27, 3], [96, 192, 384, 768], false),
            other => {
                return Err(Error::config(
                    "convnext arch",
                    format!("`{other}` is not one of: convnext_atto, convnext_femto, convnext_pico, convnext_nano, convnext_tiny, convnext_small"),
                ))
            }
        })
    }

    fn check(&self) -> Result<()> {
        if self.depths.len() != self.dims.len() || self.depths.is_empty() {
            return Err(Error::config(
                &self.arch,
                format!(
                    "{} stage depths but {} stage widths",
                    self.depths.len(),
                    self.dims.len()
                ),
            ));
        }
        if self.depths.contains(&0) || self.dims.contains(&0) {
            return Err(Error::config(
                &self.arch,
                "every stage needs blocks and channels",
            ));
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

/// A LayerNorm over the last dimension, keys `weight` and `bias`, eps [`CONVNEXT_LN_EPS`] (also the
/// Vision Transformer's, see [`super::vit`]).
#[derive(Debug, Clone)]
pub(super) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

pub(super) fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(dim, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(dim, "bias", Init::Const(0.))?,
    })
}

impl LayerNorm {
    /// Normalises each row of the last dimension of `x` (biased variance, as PyTorch).
    pub(super) fn forward_last(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_dim(x, x.rank() - 1, mode)
    }

    /// timm's `LayerNorm2d`: the norm over the channels of an `[N, C, H, W]` tensor, computed in its
    /// layout (no permute).
    fn forward_channels(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_dim(x, 1, mode)
    }

    fn forward_dim(&self, x: &Tensor, dim: usize, mode: Mode) -> Result<Tensor> {
        Ok(crate::kernels::layer_norm(
            x,
            &mode.weight(&self.weight),
            &mode.weight(&self.bias),
            CONVNEXT_LN_EPS,
            dim,
        )?)
    }
}

/// A linear map over the last dimension whose weight is `[out, in]` or, for 1x1 convolutions,
/// `[out, in, 1, 1]` in the file.
#[derive(Debug, Clone)]
pub(super) struct Dense {
    weight: Tensor,
    bias: Tensor,
    out: usize,
    inp: usize,
}

pub(super) fn dense(inp: usize, out: usize, conv: bool, vb: VarBuilder) -> Result<Dense> {
    // timm: trunc_normal_(std=.02) for every convolution and linear weight, zero biases.
    let init = Init::Randn {
        mean: 0.,
        stdev: 0.02,
    };
    let weight = if conv {
        vb.get_with_hints((out, inp, 1, 1), "weight", init)?
    } else {
        vb.get_with_hints((out, inp), "weight", init)?
    };
    Ok(Dense {
        weight,
        bias: vb.get_with_hints(out, "bias", Init::Const(0.))?,
        out,
        inp,
    })
}

impl Dense {
    /// `x` `[..., in]` to `[..., out]`.
    pub(super) fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let w = mode.weight(&self.weight).reshape((self.out, self.inp))?;
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / self.inp;
        let x = x.reshape((rows, self.inp))?;
        let y = match crate::kernels::linear_product_autocast(&x, &w)? {
            Some(y) => y,
            None => x.matmul(&w.t()?)?,
        };
        let y = crate::kernels::add_bias(&y, &mode.weight(&self.bias), 1)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("a dimension") = self.out;
        Ok(y.reshape(out_dims)?)
    }

    /// The same map over the channels of `x` `[N, in, H, W]` (a 1x1 convolution, so the tensor stays
    /// NCHW), its output scaled per channel by `scale` when given (ConvNeXt's layer scale, folded into the
    /// weight and bias: `scale * (W x + b) = (scale W) x + scale b`, one pass fewer over the output).
    /// With `gelu`, GELU follows (in inference, on the kernel's last pass over each output plane).
    fn forward_channels(
        &self,
        x: &Tensor,
        scale: Option<&Tensor>,
        gelu: bool,
        mode: Mode,
    ) -> Result<Tensor> {
        let mut w = mode
            .weight(&self.weight)
            .reshape((self.out, self.inp, 1, 1))?;
        let mut b = mode.weight(&self.bias);
        if let Some(g) = scale {
            w = w.broadcast_mul(&g.reshape((self.out, 1, 1, 1))?)?;
            b = (b * g)?;
        }
        let pad = ConvPadding::Symmetric(0);
        if inference_epilogue_applies(x, mode) {
            let mut e = crate::kernels::Epilogue::shift(&b)?;
            e.smooth = gelu.then_some(crate::kernels::Smooth::Gelu);
            if let Some(y) = crate::kernels::conv::conv2d_shift_clamp(x, &w, pad, 1, 1, e)? {
                return Ok(y);
            }
        }
        let y = crate::kernels::add_bias(&crate::kernels::conv::conv2d(x, &w, pad, 1, 1)?, &b, 1)?;
        Ok(if gelu { crate::kernels::gelu(&y)? } else { y })
    }
}

/// One ConvNeXt block: `x + drop_path(gamma * fc2(gelu(fc1(norm(dwconv7(x))))))`.
#[derive(Debug, Clone)]
struct Block {
    conv_dw: Conv2d,
    norm: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    gamma: Tensor,
    drop_path: f32,
}

impl Block {
    fn new(dim: usize, conv_mlp: bool, drop_path: f32, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 3,
            stride: 1,
            groups: dim,
            bias: true,
        };
        Ok(Self {
            conv_dw: conv2d(dim, dim, 7, cfg, vb.pp("conv_dw"))?,
            norm: layer_norm(dim, vb.pp("norm"))?,
            fc1: dense(dim, 4 * dim, conv_mlp, vb.pp("mlp").pp("fc1"))?,
            fc2: dense(4 * dim, dim, conv_mlp, vb.pp("mlp").pp("fc2"))?,
            gamma: vb.get_with_hints(dim, "gamma", Init::Const(1e-6))?,
            drop_path,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        // All in NCHW: the norm over channels in place, the MLP as 1x1 convolutions, the layer scale
        // folded into fc2 (timm permutes to channels-last and back around the norm and the MLP).
        let h = self.conv_dw.forward(x, mode)?;
        let h = self.norm.forward_channels(&h, mode)?;
        let h = self.fc1.forward_channels(&h, None, true, mode)?;
        let gamma = mode.weight(&self.gamma);
        let mut h = self.fc2.forward_channels(&h, Some(&gamma), false, mode)?;
        if mode.is_train() && self.drop_path > 0. {
            h = drop_path(&h, self.drop_path)?;
        }
        Ok((h + x)?)
    }
}

/// One stage: an optional downsampling (LayerNorm over channels, 2x2 stride-2 convolution), then blocks.
#[derive(Debug, Clone)]
struct Stage {
    downsample: Option<(LayerNorm, Conv2d)>,
    blocks: Vec<Block>,
}

impl Stage {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = match &self.downsample {
            Some((norm, conv)) => conv.forward(&norm.forward_channels(x, mode)?, mode)?,
            None => x.clone(),
        };
        for b in &self.blocks {
            h = b.forward(&h, mode)?;
        }
        Ok(h)
    }
}

/// A ConvNeXt backbone (stem, stages, the head's norm); the classifier `head.fc` is built separately.
#[derive(Debug, Clone)]
pub struct ConvNext {
    cfg: ConvNextConfig,
    stem_conv: Conv2d,
    stem_norm: LayerNorm,
    stages: Vec<Stage>,
    head_norm: LayerNorm,
}

impl ConvNext {
    /// Builds the backbone from `vb` (the root of timm's key layout).
    pub fn new(cfg: ConvNextConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let stem_cfg = Conv2dConfig {
            padding: 0,
            stride: 4,
            groups: 1,
            bias: true,
        };
        let stem_conv = conv2d(3, cfg.dims[0], 4, stem_cfg, vb.pp("stem").pp("0"))?;
        let stem_norm = layer_norm(cfg.dims[0], vb.pp("stem").pp("1"))?;
        let total: usize = cfg.depths.iter().sum();
        let mut index = 0usize;
        let mut stages = Vec::new();
        for (s, (&depth, &dim)) in cfg.depths.iter().zip(&cfg.dims).enumerate() {
            let svb = vb.pp("stages").pp(s);
            let downsample = if s > 0 {
                let down_cfg = Conv2dConfig {
                    padding: 0,
                    stride: 2,
                    groups: 1,
                    bias: true,
                };
                let prev = cfg.dims[s - 1];
                Some((
                    layer_norm(prev, svb.pp("downsample").pp("0"))?,
                    conv2d(prev, dim, 2, down_cfg, svb.pp("downsample").pp("1"))?,
                ))
            } else {
                None
            };
            let mut blocks = Vec::new();
            for b in 0..depth {
                // timm: torch.linspace(0, drop_path_rate, sum(depths)).
                let rate = if total > 1 {
                    cfg.drop_path * index as f32 / (total - 1) as f32
                } else {
                    0.
                };
                blocks.push(Block::new(dim, cfg.conv_mlp, rate, svb.pp("blocks").pp(b))?);
                index += 1;
            }
            stages.push(Stage { downsample, blocks });
        }
        let last = *cfg.dims.last().expect("checked: stages exist");
        let head_norm = layer_norm(last, vb.pp("head").pp("norm"))?;
        Ok(Self {
            cfg,
            stem_conv,
            stem_norm,
            stages,
            head_norm,
        })
    }

    pub fn config(&self) -> &ConvNextConfig {
        &self.cfg
    }
}

impl Backbone for ConvNext {
    fn arch(&self) -> &str {
        &self.cfg.arch
    }

    fn group_names(&self) -> Vec<String> {
        let mut names = vec!["stem".to_string()];
        names.extend((1..=self.stages.len()).map(|i| format!("stage{i}")));
        names.push("head_norm".into());
        names
    }

    fn group_of(&self, key: &str) -> Option<usize> {
        let mut parts = key.split('.');
        match parts.next()? {
            "stem" => Some(0),
            "stages" => {
                let s: usize = parts.next()?.parse().ok()?;
                (s < self.stages.len()).then_some(s + 1)
            }
            "head" => (parts.next()? == "norm").then_some(self.stages.len() + 1),
            _ => None,
        }
    }

    fn feature_dim(&self) -> usize {
        *self.cfg.dims.last().expect("checked: stages exist")
    }

    fn classifier_prefix(&self) -> &str {
        "head.fc"
    }

    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let stages = self.stages.len();
        if i == 0 {
            let h = self.stem_conv.forward(x, mode)?;
            self.stem_norm.forward_channels(&h, mode)
        } else if i <= stages {
            self.stages[i - 1].forward(x, mode)
        } else if i == stages + 1 {
            let pooled = super::layers::global_avg_pool(x)?;
            self.head_norm.forward_last(&pooled, mode)
        } else {
            Err(Error::config(
                "convnext group",
                format!("index {i} out of range 0..{}", stages + 2),
            ))
        }
    }

    /// The last group (`head_norm`) already pools: its output is the feature vector.
    fn pool(&self, h: &Tensor) -> Result<Tensor> {
        if h.rank() == 2 {
            Ok(h.clone())
        } else {
            super::layers::global_avg_pool(h)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn fresh(arch: &str) -> (VarMap, ConvNext) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = ConvNext::new(ConvNextConfig::from_arch(arch).unwrap(), vb).unwrap();
        (varmap, net)
    }

    #[test]
    fn atto_has_timms_keys_and_shapes() {
        let (varmap, net) = fresh("convnext_atto");
        let data = varmap.data().lock().unwrap();
        let shape = |k: &str| data[k].as_tensor().dims().to_vec();
        assert_eq!(shape("stem.0.weight"), vec![40, 3, 4, 4]);
        assert_eq!(shape("stages.0.blocks.0.conv_dw.weight"), vec![40, 1, 7, 7]);
        assert_eq!(
            shape("stages.0.blocks.0.mlp.fc1.weight"),
            vec![160, 40, 1, 1]
        );
        assert_eq!(shape("stages.1.downsample.1.weight"), vec![80, 40, 2, 2]);
        assert!(!data.contains_key("stages.0.downsample.0.weight"));
        assert_eq!(shape("head.norm.weight"), vec![320]);
        // timm's convnext_atto has 3,695,520 parameters with its 1000-way head.
        let backbone: usize = data.values().map(|v| v.elem_count()).sum();
        assert_eq!(backbone + 320 * 1000 + 1000, 3_695_520);
        assert_eq!(net.group_of("stages.2.blocks.5.gamma"), Some(3));
        assert_eq!(net.group_of("head.norm.bias"), Some(5));
        assert_eq!(net.group_of("head.fc.weight"), None);
        assert_eq!(net.group_names().len(), 6);
    }

    #[test]
    fn tiny_uses_linear_mlp_weights() {
        let (varmap, _) = fresh("convnext_tiny");
        let data = varmap.data().lock().unwrap();
        assert_eq!(
            data["stages.3.blocks.2.mlp.fc2.weight"].as_tensor().dims(),
            &[768, 3072]
        );
    }

    #[test]
    fn features_are_vectors_and_drop_path_only_acts_in_training() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut cfg = ConvNextConfig::new("convnext_test", [1, 1, 1, 1], [8, 16, 24, 32], false);
        cfg.drop_path = 0.5;
        let net = ConvNext::new(cfg, vb).unwrap();
        // A large layer scale makes the residual branch visible.
        for (k, v) in varmap.data().lock().unwrap().iter() {
            if k.ends_with("gamma") {
                v.set(&Tensor::ones(v.dims(), DType::F32, &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let x = Tensor::randn(0f32, 1., (4, 3, 64, 64), &Device::Cpu).unwrap();
        let a = net.forward_features(&x, Mode::Eval, 0).unwrap();
        let b = net.forward_features(&x, Mode::Eval, 6).unwrap();
        assert_eq!(a.dims(), &[4, 32]);
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.);
        let t = net.forward_features(&x, Mode::Train, 0).unwrap();
        let diff = (&a - &t).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 0.);
    }
}
