//! Encoders of stacked autoencoders and RBM stacks, as [`Backbone`]s: what `graft pretrain` trains layer by
//! layer and `graft finetune --base ae:RUN_DIR` (or `--base dense:...` from random initialisation) starts from.
//!
//! An encoder is described by an arch string, parsed by [`EncoderConfig::parse`]:
//!
//! * `dense:784,300,150[:ACT]`: flattened images of 784 values (1x28x28 grey, or 3xSxS RGB), then stages of
//!   300 and 150 units. ACT is `selu` (default), `relu`, `sigmoid` or `tanh`.
//! * `conv:32,64,128[:ACT][:rgb]`: stages of 3x3, stride-2, padding-1 convolutions with 32, 64, 128
//!   filters over grey images (`rgb`: 3 input channels). ACT defaults to `relu`. Features are the global
//!   average pool of the last stage, so any image size works.
//!
//! Each stage is one layer group, `stage1..stageN`, with keys `stageK.weight` and `stageK.bias`; the dense
//! encoder flattens its input inside `stage1`. Fresh weights use the initialisation that suits the
//! activation: LeCun normal for SELU, He normal for ReLU, Xavier/Glorot uniform for sigmoid and tanh; biases
//! start at zero.

use crate::models::layers::{conv2d, Conv2d, Conv2dConfig};
use crate::models::{Backbone, Mode};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::init::Init;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The activation after every encoder stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderActivation {
    Selu,
    Relu,
    Sigmoid,
    Tanh,
}

/// SELU's constants (Klambauer et al. 2017), as PyTorch writes them.
const SELU_ALPHA: f64 = 1.673_263_242_354_377_3;
const SELU_SCALE: f64 = 1.050_700_987_355_480_5;

impl EncoderActivation {
    pub fn name(self) -> &'static str {
        match self {
            EncoderActivation::Selu => "selu",
            EncoderActivation::Relu => "relu",
            EncoderActivation::Sigmoid => "sigmoid",
            EncoderActivation::Tanh => "tanh",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "selu" => EncoderActivation::Selu,
            "relu" => EncoderActivation::Relu,
            "sigmoid" => EncoderActivation::Sigmoid,
            "tanh" => EncoderActivation::Tanh,
            _ => return None,
        })
    }

    /// Applies the activation (autograd-friendly).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            EncoderActivation::Selu => (x.elu(SELU_ALPHA)? * SELU_SCALE)?,
            EncoderActivation::Relu => x.relu()?,
            EncoderActivation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            EncoderActivation::Tanh => x.tanh()?,
        })
    }

    /// The initialisation made for this activation, for a weight with `fan_in` inputs and `fan_out` outputs
    /// per unit: LeCun normal `N(0, 1/fan_in)` (SELU), He normal `N(0, 2/fan_in)` (ReLU), Xavier/Glorot
    /// uniform `U(±sqrt(6/(fan_in+fan_out)))` (sigmoid, tanh).
    pub fn init(self, fan_in: usize, fan_out: usize) -> Init {
        match self {
            EncoderActivation::Selu => Init::Randn {
                mean: 0.0,
                stdev: (1.0 / fan_in as f64).sqrt(),
            },
            EncoderActivation::Relu => Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_in as f64).sqrt(),
            },
            EncoderActivation::Sigmoid | EncoderActivation::Tanh => {
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                }
            }
        }
    }

    /// The range of the codes, `(lo, hi)`, when bounded on both sides (sigmoid, tanh).
    pub fn bounds(self) -> Option<(f64, f64)> {
        match self {
            EncoderActivation::Sigmoid => Some((0.0, 1.0)),
            EncoderActivation::Tanh => Some((-1.0, 1.0)),
            _ => None,
        }
    }
}

/// Dense or convolutional stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// `dims[0]` input values, then one stage per further entry.
    Dense { dims: Vec<usize> },
    /// Stride-2 3x3 convolutions with these filter counts over `in_channels`-channel images. Features are
    /// the global average pool of the last map, or with `flat: Some(size)` the flattened last map of
    /// `size` x `size` inputs (which then must have that size).
    Conv {
        in_channels: usize,
        widths: Vec<usize>,
        #[serde(default)]
        flat: Option<usize>,
    },
}

/// A parsed encoder arch string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub kind: EncoderKind,
    pub activation: EncoderActivation,
}

/// Kernel, stride and padding of every convolutional stage.
pub const CONV_KERNEL: usize = 3;
pub const CONV_STRIDE: usize = 2;
pub const CONV_PADDING: usize = 1;

impl EncoderConfig {
    /// Whether `arch` is an encoder arch string (as opposed to a model card architecture).
    pub fn is_encoder_arch(arch: &str) -> bool {
        arch.starts_with("dense:") || arch.starts_with("conv:")
    }

    /// Parses `dense:784,300,150[:ACT]` or `conv:32,64,128[:ACT][:rgb]` (see the module doc). Errors name
    /// the string and what is wrong with it.
    pub fn parse(arch: &str) -> Result<Self> {
        let bad = |reason: String| Error::config(format!("architecture `{arch}`"), reason);
        let (kind, rest) = arch.split_once(':').ok_or_else(|| {
            bad("expected dense:IN,UNITS,... or conv:FILTERS,... (e.g. dense:784,300,150)".into())
        })?;
        let mut parts = rest.split(':');
        let list = parts.next().unwrap_or("");
        let numbers = list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&v| v > 0)
                    .ok_or_else(|| bad(format!("`{n}` is not a positive layer width")))
            })
            .collect::<Result<Vec<usize>>>()?;
        let mut activation = None;
        let mut rgb = false;
        let mut flat = None;
        for opt in parts {
            if let Some(a) = EncoderActivation::parse(opt) {
                if activation.replace(a).is_some() {
                    return Err(bad("more than one activation".into()));
                }
            } else if opt == "rgb" && kind == "conv" {
                rgb = true;
            } else if let (Some(size), "conv") = (opt.strip_prefix("flat"), kind) {
                flat = Some(
                    size.parse::<usize>()
                        .ok()
                        .filter(|&s| s > 0)
                        .ok_or_else(|| {
                            bad(format!(
                                "`{opt}`: flattened features need the input size, e.g. flat28"
                            ))
                        })?,
                );
            } else {
                return Err(bad(format!(
                    "unknown option `{opt}` (activations: selu, relu, sigmoid, tanh{})",
                    if kind == "conv" {
                        "; rgb; flatSIZE"
                    } else {
                        ""
                    }
                )));
            }
        }
        let kind = match kind {
            "dense" => {
                if numbers.len() < 2 {
                    return Err(bad(
                        "a dense encoder needs the input size and at least one stage, e.g. dense:784,300"
                            .into(),
                    ));
                }
                EncoderKind::Dense { dims: numbers }
            }
            "conv" => EncoderKind::Conv {
                in_channels: if rgb { 3 } else { 1 },
                widths: numbers,
                flat,
            },
            other => {
                return Err(bad(format!(
                    "`{other}` is not an encoder kind (dense or conv)"
                )))
            }
        };
        let default = match kind {
            EncoderKind::Dense { .. } => EncoderActivation::Selu,
            EncoderKind::Conv { .. } => EncoderActivation::Relu,
        };
        Ok(EncoderConfig {
            kind,
            activation: activation.unwrap_or(default),
        })
    }

    /// The canonical arch string, activation spelled out: `parse(cfg.arch()) == cfg`.
    pub fn arch(&self) -> String {
        let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        match &self.kind {
            EncoderKind::Dense { dims } => {
                format!("dense:{}:{}", join(dims), self.activation.name())
            }
            EncoderKind::Conv {
                in_channels,
                widths,
                flat,
            } => format!(
                "conv:{}:{}{}{}",
                join(widths),
                self.activation.name(),
                if *in_channels == 3 { ":rgb" } else { "" },
                flat.map_or(String::new(), |s| format!(":flat{s}"))
            ),
        }
    }

    /// Number of stages (layer groups).
    pub fn stages(&self) -> usize {
        match &self.kind {
            EncoderKind::Dense { dims } => dims.len() - 1,
            EncoderKind::Conv { widths, .. } => widths.len(),
        }
    }

    /// Width of the input of each stage and of the last stage's output: `[in, s1, ..., sN]` (values for
    /// dense, channels for conv).
    pub fn widths(&self) -> Vec<usize> {
        match &self.kind {
            EncoderKind::Dense { dims } => dims.clone(),
            EncoderKind::Conv {
                in_channels,
                widths,
                ..
            } => std::iter::once(*in_channels)
                .chain(widths.iter().copied())
                .collect(),
        }
    }

    pub fn is_dense(&self) -> bool {
        matches!(self.kind, EncoderKind::Dense { .. })
    }

    /// Checks that images of `channels` x `size` x `size` fit this encoder: a dense encoder's input size
    /// must be `channels * size^2`, a convolutional one's channels must match. The error names both.
    pub fn check_input(&self, channels: usize, size: usize) -> Result<()> {
        let what = || format!("architecture `{}`", self.arch());
        match &self.kind {
            EncoderKind::Dense { dims } if dims[0] != channels * size * size => Err(Error::config(
                what(),
                format!(
                    "expects {} input values, but {size}x{size} images with {channels} channel{} give {}",
                    dims[0],
                    if channels == 1 { "" } else { "s" },
                    channels * size * size
                ),
            )),
            EncoderKind::Conv { in_channels, .. } if *in_channels != channels => Err(Error::config(
                what(),
                format!(
                    "expects {in_channels}-channel images, got {channels}-channel ones{}",
                    if channels == 3 {
                        " (add `:rgb` to the arch)"
                    } else {
                        ""
                    }
                ),
            )),
            EncoderKind::Conv {
                flat: Some(s), ..
            } if *s != size => Err(Error::config(
                what(),
                format!("flattens the features of {s}x{s} images, got {size}x{size} ones"),
            )),
            _ => Ok(()),
        }
    }

    /// Length of the feature vector: the last stage's width, times the area of its map when flattened.
    pub fn feature_dim(&self) -> usize {
        let last = *self.widths().last().expect("at least one stage");
        match &self.kind {
            EncoderKind::Conv {
                flat: Some(s),
                widths,
                ..
            } => {
                let side = widths.iter().fold(*s, |h, _| {
                    (h + 2 * CONV_PADDING - CONV_KERNEL) / CONV_STRIDE + 1
                });
                last * side * side
            }
            _ => last,
        }
    }

    /// The input (channels, size) a dense encoder implies: grey when its input is a square number, RGB when
    /// it is three times one; `None` for convolutional encoders (any size) or sizes that fit neither.
    pub fn implied_input(&self) -> Option<(usize, usize)> {
        let dims = match &self.kind {
            EncoderKind::Dense { dims } => dims,
            EncoderKind::Conv {
                in_channels,
                flat: Some(s),
                ..
            } => return Some((*in_channels, *s)),
            EncoderKind::Conv { .. } => return None,
        };
        let side = |n: usize| {
            let s = (n as f64).sqrt().round() as usize;
            (s * s == n).then_some(s)
        };
        side(dims[0]).map(|s| (1, s)).or_else(|| {
            (dims[0] % 3 == 0)
                .then(|| side(dims[0] / 3))
                .flatten()
                .map(|s| (3, s))
        })
    }

    /// Builds the encoder from a scoped builder.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn Backbone>> {
        Ok(match self.kind {
            EncoderKind::Dense { .. } => Box::new(DenseEncoder::new(self.clone(), vb)?),
            EncoderKind::Conv { .. } => Box::new(ConvEncoder::new(self.clone(), vb)?),
        })
    }
}

/// A fully connected stage `act(x Wᵀ + b)`, weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct DenseStage {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl DenseStage {
    fn new(fan_in: usize, fan_out: usize, act: EncoderActivation, vb: VarBuilder) -> Result<Self> {
        Ok(DenseStage {
            weight: vb.get_with_hints((fan_out, fan_in), "weight", act.init(fan_in, fan_out))?,
            bias: vb.get_with_hints(fan_out, "bias", Init::Const(0.0))?,
        })
    }

    /// The pre-activation `x Wᵀ + b`.
    pub fn linear(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let w = mode.weight(&self.weight);
        let y = match crate::kernels::linear_product_autocast(x, &w)? {
            Some(y) => y,
            None => x.matmul(&w.t()?)?,
        };
        Ok(y.broadcast_add(&mode.weight(&self.bias))?)
    }
}

/// Stages of fully connected layers over flattened images.
pub struct DenseEncoder {
    cfg: EncoderConfig,
    arch: String,
    pub stages: Vec<DenseStage>,
}

impl DenseEncoder {
    pub fn new(cfg: EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let dims = cfg.widths();
        let stages = (0..cfg.stages())
            .map(|i| {
                DenseStage::new(
                    dims[i],
                    dims[i + 1],
                    cfg.activation,
                    vb.pp(format!("stage{}", i + 1)),
                )
            })
            .collect::<Result<_>>()?;
        Ok(DenseEncoder {
            arch: cfg.arch(),
            cfg,
            stages,
        })
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }
}

/// Index of the group owning `key` among `stage1..stageN`.
fn stage_of(key: &str, n: usize) -> Option<usize> {
    let rest = key.strip_prefix("stage")?;
    let num: usize = rest.split('.').next()?.parse().ok()?;
    (1..=n).contains(&num).then(|| num - 1)
}

impl Backbone for DenseEncoder {
    fn arch(&self) -> &str {
        &self.arch
    }
    fn group_names(&self) -> Vec<String> {
        (1..=self.stages.len())
            .map(|i| format!("stage{i}"))
            .collect()
    }
    fn group_of(&self, key: &str) -> Option<usize> {
        stage_of(key, self.stages.len())
    }
    fn feature_dim(&self) -> usize {
        *self.cfg.widths().last().expect("at least one stage")
    }
    /// The decoder of a pretraining checkpoint is not part of the encoder.
    fn classifier_prefix(&self) -> &str {
        "decoder"
    }
    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = if i == 0 {
            let n_in = self.cfg.widths()[0];
            let per_image: usize = x.dims().iter().skip(1).product();
            if per_image != n_in {
                return Err(Error::config(
                    format!("architecture `{}`", self.arch),
                    format!(
                        "expects {n_in} input values per image, got images of shape {:?} ({per_image} values)",
                        &x.dims()[1..]
                    ),
                ));
            }
            x.flatten_from(1)?
        } else {
            x.clone()
        };
        self.cfg.activation.apply(&self.stages[i].linear(&x, mode)?)
    }
    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// Stages of stride-2 convolutions; features are the global average pool of the last stage.
pub struct ConvEncoder {
    cfg: EncoderConfig,
    arch: String,
    pub stages: Vec<Conv2d>,
}

/// The geometry of every convolutional stage.
pub fn conv_stage_config() -> Conv2dConfig {
    Conv2dConfig {
        padding: CONV_PADDING,
        stride: CONV_STRIDE,
        groups: 1,
        bias: true,
    }
}

impl ConvEncoder {
    pub fn new(cfg: EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.widths();
        let k2 = CONV_KERNEL * CONV_KERNEL;
        let stages = (0..cfg.stages())
            .map(|i| {
                let vb = vb.pp(format!("stage{}", i + 1));
                // Create the weight with the activation's init first; `conv2d` then finds it.
                vb.get_with_hints(
                    (w[i + 1], w[i], CONV_KERNEL, CONV_KERNEL),
                    "weight",
                    cfg.activation.init(w[i] * k2, w[i + 1] * k2),
                )?;
                conv2d(w[i], w[i + 1], CONV_KERNEL, conv_stage_config(), vb)
            })
            .collect::<Result<_>>()?;
        Ok(ConvEncoder {
            arch: cfg.arch(),
            cfg,
            stages,
        })
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }
}

impl Backbone for ConvEncoder {
    fn arch(&self) -> &str {
        &self.arch
    }
    fn group_names(&self) -> Vec<String> {
        (1..=self.stages.len())
            .map(|i| format!("stage{i}"))
            .collect()
    }
    fn group_of(&self, key: &str) -> Option<usize> {
        stage_of(key, self.stages.len())
    }
    fn feature_dim(&self) -> usize {
        self.cfg.feature_dim()
    }
    fn classifier_prefix(&self) -> &str {
        "decoder"
    }
    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.kind {
            EncoderKind::Conv { flat: Some(_), .. } => Ok(x.flatten_from(1)?),
            _ => crate::models::layers::global_avg_pool(x),
        }
    }
    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if i == 0 {
            let c = self.cfg.widths()[0];
            if x.rank() != 4 || x.dim(1)? != c {
                return Err(Error::config(
                    format!("architecture `{}`", self.arch),
                    format!("expects images of shape [N, {c}, H, W], got {:?}", x.dims()),
                ));
            }
        }
        self.cfg.activation.apply(&self.stages[i].forward(x, mode)?)
    }
}

/// Redraws every `stageK.weight` in `varmap` from the initialisation `cfg`'s activation calls for, and sets
/// every `stageK.bias` to zero, with a generator seeded by `seed`; keys outside the encoder are left alone.
pub fn seeded_init(cfg: &EncoderConfig, varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut keys: Vec<&String> = data
        .keys()
        .filter(|k| stage_of(k, cfg.stages()).is_some())
        .collect();
    keys.sort();
    let mut rng = crate::rng::seeded(seed);
    for key in keys {
        let var = &data[key];
        if key.ends_with(".weight") {
            let dims = var.dims();
            let k2: usize = dims.iter().skip(2).product();
            let init = cfg.activation.init(dims[1] * k2, dims[0] * k2);
            var.set(&draw(init, dims, &mut rng, var.device())?)?;
        } else {
            var.set(&var.zeros_like()?)?;
        }
    }
    Ok(())
}

/// A tensor of `dims` drawn from a normal or uniform `init` with `rng` (Box-Muller for the normal).
pub fn draw(
    init: Init,
    dims: &[usize],
    rng: &mut rand_chacha::ChaCha8Rng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    use rand::Rng;
    let n: usize = dims.iter().product();
    let v: Vec<f32> = match init {
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                let (u1, u2): (f64, f64) = (rng.random(), rng.random());
                let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (mean + stdev * z) as f32
            })
            .collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Const(c) => vec![c as f32; n],
        other => {
            return Err(Error::config(
                "initialisation",
                format!("{other:?} cannot be drawn with a seed"),
            ))
        }
    };
    Ok(Tensor::from_vec(v, dims, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn arch_strings_parse_and_print_canonically() {
        let d = EncoderConfig::parse("dense:784,300,150").unwrap();
        assert_eq!(d.arch(), "dense:784,300,150:selu");
        assert_eq!(d.stages(), 2);
        assert_eq!(EncoderConfig::parse(&d.arch()).unwrap(), d);
        let c = EncoderConfig::parse("conv:32,64,128:tanh:rgb").unwrap();
        assert_eq!(c.widths(), vec![3, 32, 64, 128]);
        assert_eq!(c.activation, EncoderActivation::Tanh);
        assert_eq!(EncoderConfig::parse(&c.arch()).unwrap(), c);
        let f = EncoderConfig::parse("conv:32,64,128:flat28").unwrap();
        assert_eq!(f.arch(), "conv:32,64,128:relu:flat28");
        // 28 -> 14 -> 7 -> 4.
        assert_eq!(f.feature_dim(), 128 * 4 * 4);
        assert_eq!(f.implied_input(), Some((1, 28)));
        assert!(f
            .check_input(1, 32)
            .unwrap_err()
            .to_string()
            .contains("28x28"));
        assert_eq!(d.implied_input(), Some((1, 28)));
        assert_eq!(
            EncoderConfig::parse("dense:768,10")
                .unwrap()
                .implied_input(),
            Some((3, 16))
        );
    }

    #[test]
    fn bad_arch_strings_name_the_string_and_the_fault() {
        for (arch, fault) in [
            ("dense", "expected dense"),
            ("dense:784", "at least one stage"),
            ("dense:784,x", "`x`"),
            ("dense:784,0", "`0`"),
            ("dense:784,300:gelu", "`gelu`"),
            ("dense:784,300:rgb", "`rgb`"),
            ("lstm:3,4", "`lstm`"),
            ("conv:32,64:relu:tanh", "more than one"),
            ("conv:32,64:flat", "flat28"),
        ] {
            let msg = EncoderConfig::parse(arch).unwrap_err().to_string();
            assert!(msg.contains(arch) && msg.contains(fault), "{arch}: {msg}");
        }
    }

    #[test]
    fn seeded_init_is_reproducible_and_matches_the_activation() {
        let cfg = EncoderConfig::parse("dense:400,200:relu").unwrap();
        let weights = |seed| {
            let varmap = VarMap::new();
            cfg.build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))
                .unwrap();
            seeded_init(&cfg, &varmap, seed).unwrap();
            let w = varmap.data().lock().unwrap()["stage1.weight"]
                .as_tensor()
                .clone();
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b, c) = (weights(1), weights(1), weights(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        // He normal: variance 2 / fan_in = 0.005.
        let var = a.iter().map(|v| (v * v) as f64).sum::<f64>() / a.len() as f64;
        assert!((var - 0.005).abs() < 0.0003, "{var}");
    }

    #[test]
    fn mismatched_image_sizes_are_named() {
        let d = EncoderConfig::parse("dense:784,300").unwrap();
        assert!(d.check_input(1, 28).is_ok());
        let msg = d.check_input(1, 32).unwrap_err().to_string();
        assert!(
            msg.contains("dense:784,300") && msg.contains("1024"),
            "{msg}"
        );
        let c = EncoderConfig::parse("conv:8,16").unwrap();
        let msg = c.check_input(3, 28).unwrap_err().to_string();
        assert!(msg.contains(":rgb"), "{msg}");
    }

    #[test]
    fn encoders_are_backbones_with_one_group_per_stage() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let b = EncoderConfig::parse("dense:16,8,4:sigmoid")
            .unwrap()
            .build(vb.clone())
            .unwrap();
        assert_eq!(b.group_names(), vec!["stage1", "stage2"]);
        assert_eq!(b.group_of("stage2.weight"), Some(1));
        assert_eq!(b.group_of("decoder.stage1.bias"), None);
        let x = Tensor::rand(0f32, 1f32, (5, 1, 4, 4), &dev).unwrap();
        let f = b.forward_features(&x, Mode::Frozen, 2).unwrap();
        assert_eq!(f.dims(), &[5, 4]);
        let wrong = Tensor::zeros((5, 1, 5, 5), DType::F32, &dev).unwrap();
        let msg = b
            .forward_features(&wrong, Mode::Frozen, 2)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dense:16,8,4") && msg.contains("25"), "{msg}");

        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let c = EncoderConfig::parse("conv:4,6").unwrap().build(vb).unwrap();
        let x = Tensor::rand(0f32, 1f32, (2, 1, 12, 12), &dev).unwrap();
        assert_eq!(
            c.forward_group(0, &x, Mode::Eval).unwrap().dims(),
            &[2, 4, 6, 6]
        );
        assert_eq!(
            c.forward_features(&x, Mode::Eval, 0).unwrap().dims(),
            &[2, 6]
        );
        assert_eq!(
            varmap.data().lock().unwrap()["stage2.weight"].dims(),
            &[6, 4, 3, 3]
        );
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let flat = EncoderConfig::parse("conv:4,6:flat12")
            .unwrap()
            .build(vb)
            .unwrap();
        assert_eq!(flat.feature_dim(), 6 * 3 * 3);
        assert_eq!(
            flat.forward_features(&x, Mode::Eval, 0).unwrap().dims(),
            &[2, 54]
        );
    }
}
