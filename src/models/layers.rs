//! Shared layers: convolution, BatchNorm, linear, pooling.
//!
//! Every layer is a plain struct of tensors built by a free constructor over a scoped `VarBuilder`, so the
//! nesting of `vb.pp(..)` scopes is the safetensors key layout (`conv2d(64, 64, 3, cfg, vb.pp("conv1"))` reads
//! `<prefix>.conv1.weight`). Every forward takes a [`Mode`]: weights go through [`Mode::weight`], so a layer
//! run in [`Mode::Frozen`] builds no gradient graph.
//!
//! How the ops run is [`crate::kernels`]' business: a [`Conv2d`] convolves through
//! [`kernels::conv::conv2d`], which chooses the algorithm; a training [`BatchNorm`] on the CPU runs the
//! kernels' training op, with a following ReLU / ReLU6 fused in ([`conv_bn_act`]).
//!
//! Outside training, [`conv_bn_act`] folds the BatchNorm into the filter; in [`Mode::Frozen`] the folded
//! shift and the activation run inside the (dense or depthwise) convolution's last pass.

use super::Mode;
use crate::device::custom_kernels_on;
use crate::kernels::conv::ConvPadding;
use crate::kernels::{self, relu, relu6, Epilogue, Padding2d};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var, D};
use candle_nn::init::{FanInOut, Init, NonLinearity, NormalOrUniform};
use candle_nn::VarBuilder;

/// Geometry of a [`Conv2d`]: symmetric zero padding, stride, groups (dilation is always 1) and whether the
/// layer has a bias. `Default` is a stride-1, unpadded, ungrouped convolution without bias (the common case
/// before a BatchNorm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
    pub groups: usize,
    pub bias: bool,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            groups: 1,
            bias: false,
        }
    }
}

/// A 2-D convolution over `[N, C, H, W]`, weights `[out, in / groups, k, k]` under `weight` (and `bias`).
///
/// It runs by the algorithm [`kernels::conv::algorithm`] picks: a depthwise convolution (`groups == in ==
/// out`) on [`kernels::depthwise_conv2d`] instead of candle's grouped convolution, which would launch one
/// convolution per channel. Padding is the config's, symmetric, unless [`Conv2d::with_padding`] gave one
/// per side (TensorFlow's "SAME" padding).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
    /// Per-side padding replacing `cfg.padding`, when set.
    pad: Option<Padding2d>,
}

/// Builds a [`Conv2d`] with a square `kernel`, reading `weight` (and `bias` when `cfg.bias`) from `vb`.
///
/// Fresh weights (a `VarMap` builder without loaded values) use torchvision's initialisation: Kaiming normal,
/// fan-out, ReLU gain; a bias starts at zero.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    if cfg.groups == 0
        || !in_channels.is_multiple_of(cfg.groups)
        || !out_channels.is_multiple_of(cfg.groups)
    {
        return Err(Error::config(
            format!("conv2d `{}` groups", vb.prefix()),
            format!(
                "{} groups do not divide {in_channels} input and {out_channels} output channels",
                cfg.groups
            ),
        ));
    }
    if cfg.stride == 0 || kernel == 0 {
        return Err(Error::config(
            format!("conv2d `{}`", vb.prefix()),
            "kernel and stride must be positive",
        ));
    }
    let init = Init::Kaiming {
        dist: NormalOrUniform::Normal,
        fan: FanInOut::FanOut,
        non_linearity: NonLinearity::ReLU,
    };
    let weight = vb.get_with_hints(
        (out_channels, in_channels / cfg.groups, kernel, kernel),
        "weight",
        init,
    )?;
    let bias = if cfg.bias {
        Some(vb.get_with_hints(out_channels, "bias", Init::Const(0.))?)
    } else {
        None
    };
    Ok(Conv2d {
        weight,
        bias,
        cfg,
        pad: None,
    })
}

impl Conv2d {
    /// This layer (the same weights) with `pad` zero padding per side instead of its config's. A
    /// depthwise layer on the CPU pads inside its kernel; others pad the input first.
    pub fn with_padding(&self, pad: Padding2d) -> Conv2d {
        Conv2d {
            pad: Some(pad),
            ..self.clone()
        }
    }

    /// The padding: [`Conv2d::with_padding`]'s per side, else the config's on every side.
    fn padding(&self) -> ConvPadding {
        match self.pad {
            None => ConvPadding::Symmetric(self.cfg.padding),
            Some(p) => ConvPadding::PerSide(p),
        }
    }

    /// Convolves `x` (`[N, in, H, W]`) into `[N, out, H', W']`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let w = mode.weight(&self.weight);
        if let (Some(b), true) = (&self.bias, inference_epilogue_applies(x, mode)) {
            // The bias rides on the kernel's last pass over each output plane.
            let e = Epilogue::shift(b)?;
            if let Some(y) = self.convolve_with_epilogue(x, &w, e)? {
                return Ok(y);
            }
        }
        let y = self.convolve(x, &w)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => Ok(kernels::add_bias(&y, &mode.weight(b), 1)?),
        }
    }

    /// The bias-free convolution of `x` with the filter `w` (this layer's geometry).
    fn convolve(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        kernels::conv::conv2d(x, w, self.padding(), self.cfg.stride, self.cfg.groups)
    }

    /// [`Conv2d::convolve`] with `e` applied by the CPU kernel itself, for inference (no gradient is
    /// recorded); `None` where no kernel of ours runs this layer (other devices, grouped convolutions).
    fn convolve_with_epilogue(
        &self,
        x: &Tensor,
        w: &Tensor,
        e: Epilogue,
    ) -> Result<Option<Tensor>> {
        let (pad, stride, groups) = (self.padding(), self.cfg.stride, self.cfg.groups);
        kernels::conv::conv2d_shift_clamp(x, w, pad, stride, groups, e)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn config(&self) -> Conv2dConfig {
        self.cfg
    }
}

/// BatchNorm over dimension 1 of an `[N, C, ...]` tensor, keys `weight`, `bias`, `running_mean`,
/// `running_var` (PyTorch's `num_batches_tracked` is not read: momentum is fixed, so it is never needed).
///
/// In [`Mode::Train`] it normalises with the batch statistics (biased variance) and moves the running
/// statistics toward them with `momentum`, using the *unbiased* batch variance, as PyTorch does. In
/// [`Mode::Eval`] and [`Mode::Frozen`] it uses the running statistics, folded into one scale and shift per
/// channel. The running statistics are `Var`s that are updated in place and never receive gradients.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

/// `bn(conv(x))`. Outside [`Mode::Train`] the BatchNorm is folded into the convolution: the filter is
/// scaled per output channel and the shift becomes a bias, which saves two passes over the activations.
/// The result is the same up to float rounding, and it stays differentiable in every parameter
/// (in [`Mode::Eval`]) or builds no graph (in [`Mode::Frozen`]).
pub fn conv_bn(x: &Tensor, conv: &Conv2d, bn: &BatchNorm, mode: Mode) -> Result<Tensor> {
    conv_bn_act(x, conv, bn, mode, Activation::Identity)
}

/// `act(conv_bn(x, ..))`, with the activation fused into a training BatchNorm (see
/// [`BatchNorm::forward_act`]).
pub fn conv_bn_act(
    x: &Tensor,
    conv: &Conv2d,
    bn: &BatchNorm,
    mode: Mode,
    act: Activation,
) -> Result<Tensor> {
    if mode.is_train() {
        return bn.forward_act(&conv.forward(x, mode)?, mode, act);
    }
    let c = bn.num_features();
    let (scale, shift) = bn.folded(&mode.bn_param(&bn.weight), &mode.bn_param(&bn.bias))?;
    let (scale, mut shift) = (scale.reshape(c)?, shift.reshape(c)?);
    let w = mode
        .weight(&conv.weight)
        .broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
    if let Some(b) = &conv.bias {
        shift = (shift + mode.weight(b).mul(&scale)?)?;
    }
    if inference_epilogue_applies(x, mode) {
        // Nothing needs a gradient: the shift and the activation ride on the convolution's last pass.
        let e = Epilogue {
            shift: shift.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            max: act.clamp_max(),
            smooth: act.smooth(),
        };
        if let Some(y) = conv.convolve_with_epilogue(x, &w, e)? {
            return Ok(y);
        }
    }
    act.apply(&kernels::add_bias(&conv.convolve(x, &w)?, &shift, 1)?)
}

/// Whether a convolution of `x` in `mode` can leave its per-channel shift and activation to the kernel's
/// inference epilogue: nothing needs a gradient (a frozen layer on an input that records none), and a
/// kernel of ours runs it (elsewhere reading the shift would be a device-to-host copy for nothing).
pub(crate) fn inference_epilogue_applies(x: &Tensor, mode: Mode) -> bool {
    mode == Mode::Frozen && !x.track_op() && custom_kernels_on(x.device())
}

/// An activation that can follow a BatchNorm (and be fused into its training kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `max(x, 0)`, see [`kernels::relu`].
    Relu,
    /// `min(max(x, 0), 6)`, see [`kernels::relu6`].
    Relu6,
    /// `x * sigmoid(x)` (swish; EfficientNet), see [`kernels::silu`].
    Silu,
    /// `x * relu6(x + 3) / 6` (MobileNetV3), see [`kernels::hard_swish`].
    HardSwish,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Identity => x.clone(),
            Activation::Relu => relu(x)?,
            Activation::Relu6 => relu6(x)?,
            Activation::Silu => kernels::silu(x)?,
            Activation::HardSwish => kernels::hard_swish(x)?,
        })
    }

    /// The upper bound of the clamp `[0, max]` this activation is, if it is one.
    fn clamp_max(self) -> Option<f64> {
        match self {
            Activation::Relu => Some(f64::INFINITY),
            Activation::Relu6 => Some(6.),
            Activation::Identity | Activation::Silu | Activation::HardSwish => None,
        }
    }

    /// The smooth activation this is, if it is one (what a convolution epilogue applies after the shift).
    fn smooth(self) -> Option<kernels::Smooth> {
        match self {
            Activation::Silu => Some(kernels::Smooth::Silu),
            Activation::HardSwish => Some(kernels::Smooth::HardSwish),
            Activation::Identity | Activation::Relu | Activation::Relu6 => None,
        }
    }

    /// Whether the BatchNorm training kernel can fuse this activation (the identity or a clamp); the
    /// others run as their own op afterwards. (A convolution's inference epilogue takes every one.)
    fn fusable(self) -> bool {
        matches!(
            self,
            Activation::Identity | Activation::Relu | Activation::Relu6
        )
    }
}

/// PyTorch's default BatchNorm momentum: `running = 0.9 * running + 0.1 * batch`.
pub const BN_MOMENTUM: f64 = 0.1;

/// Builds a [`BatchNorm`] over `num_features` channels with the given `eps` (ResNet 1e-5, EfficientNet 1e-3)
/// and momentum [`BN_MOMENTUM`].
///
/// The running statistics are taken as `Var`s: from a `VarMap` builder they are the map's own variables (so
/// updates are seen by whoever saves the map); from any other builder they are copied into fresh variables.
pub fn batch_norm(num_features: usize, eps: f64, vb: VarBuilder) -> Result<BatchNorm> {
    if eps <= 0. {
        return Err(Error::config(
            format!("batch_norm `{}` eps", vb.prefix()),
            "must be positive",
        ));
    }
    let weight = vb.get_with_hints(num_features, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.))?;
    let running_mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
    let running_var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
    Ok(BatchNorm {
        weight,
        bias,
        running_mean: Var::from_tensor(&running_mean)?,
        running_var: Var::from_tensor(&running_var)?,
        eps,
        momentum: BN_MOMENTUM,
    })
}

impl BatchNorm {
    /// Normalises `x` (`[N, C, ...]`); see the type's doc for what each mode does.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_act(x, mode, Activation::Identity)
    }

    /// `act(self.forward(x, mode))`. A training BatchNorm on the CPU applies the activation inside its
    /// kernel (one op, one output buffer, and the activation's gradient mask applied within the
    /// BatchNorm backward) instead of as a separate op.
    pub fn forward_act(&self, x: &Tensor, mode: Mode, act: Activation) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 2 || dims[1] != self.num_features() {
            return Err(Error::config(
                "batch_norm input",
                format!("expected [N, {}, ...], got {:?}", self.num_features(), dims),
            ));
        }
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        // [N, C, S] view: per-channel reductions run over the contiguous last axis, then the batch axis.
        let x3 = x.reshape((n, c, spatial))?;
        let w = mode.bn_param(&self.weight).reshape((1, c, 1))?;
        let b = mode.bn_param(&self.bias).reshape((1, c, 1))?;
        let y = if mode.is_train() {
            let count = n * spatial;
            if count < 2 {
                return Err(Error::config(
                    "batch_norm input",
                    format!("training needs more than one value per channel, got {dims:?}"),
                ));
            }
            if custom_kernels_on(x.device()) {
                let fused = if act.fusable() {
                    act
                } else {
                    Activation::Identity
                };
                let (y, mean, var) = self.train_kernel(&x3, mode, fused)?;
                self.update_running(&mean, &var, count)?;
                let y = y.reshape(dims)?;
                return if act.fusable() { Ok(y) } else { act.apply(&y) };
            }
            let (y, mean, var) = self.train_composed(&x3, &w, &b)?;
            self.update_running(&mean, &var, count)?;
            y
        } else {
            let (scale, shift) = self.folded(&w, &b)?;
            x3.broadcast_mul(&scale)?.broadcast_add(&shift)?
        };
        act.apply(&y.reshape(dims)?)
    }

    /// Training forward on the CPU kernel: `(y, batch mean, biased batch variance)`.
    fn train_kernel(
        &self,
        x3: &Tensor,
        mode: Mode,
        act: Activation,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let x3 = x3.contiguous()?;
        let (mean, var) = kernels::batch_stats(&x3)?;
        let (c, dev) = (mean.len(), x3.device());
        let (mean_t, var_t) = (
            Tensor::from_vec(mean.clone(), c, dev)?,
            Tensor::from_vec(var.clone(), c, dev)?,
        );
        let (w, b) = (mode.weight(&self.weight), mode.weight(&self.bias));
        let y = kernels::batch_norm_train(&x3, &w, &b, mean, var, self.eps, act.clamp_max())?;
        Ok((y, mean_t, var_t))
    }

    /// Training forward composed from candle ops (any device): `(y, batch mean, biased batch variance)`.
    /// `w` and `b` are `[1, C, 1]`.
    fn train_composed(
        &self,
        x3: &Tensor,
        w: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let count = (x3.elem_count() / self.num_features()) as f64;
        let mean = (x3.sum_keepdim(2)?.sum_keepdim(0)? / count)?;
        let centered = x3.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)?.sum_keepdim(0)? / count)?;
        let scale = w.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        let y = centered.broadcast_mul(&scale)?.broadcast_add(b)?;
        Ok((y, mean.detach(), var.detach()))
    }

    /// Eval-mode scale and shift `[1, C, 1]`: `y = x * scale + shift`.
    fn folded(&self, w: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = self.num_features();
        let mean = self.running_mean.as_tensor().detach().reshape((1, c, 1))?;
        let var = self.running_var.as_tensor().detach().reshape((1, c, 1))?;
        let (w, b) = (w.reshape((1, c, 1))?, b.reshape((1, c, 1))?);
        let scale = w.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let shift = b.broadcast_sub(&mean.broadcast_mul(&scale)?)?;
        Ok((scale, shift))
    }

    fn update_running(&self, mean: &Tensor, biased_var: &Tensor, count: usize) -> Result<()> {
        let m = self.momentum;
        let c = self.num_features();
        let dtype = self.running_mean.dtype();
        let mean = mean.flatten_all()?.to_dtype(dtype)?;
        let unbiased =
            (biased_var.flatten_all()? * (count as f64 / (count - 1) as f64))?.to_dtype(dtype)?;
        debug_assert_eq!(mean.dims1()?, c);
        let rm = ((self.running_mean.as_tensor() * (1. - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1. - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(())
    }

    pub fn num_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn running_mean(&self) -> &Var {
        &self.running_mean
    }

    pub fn running_var(&self) -> &Var {
        &self.running_var
    }
}

/// A fully connected layer `y = x Wᵀ + b`, weight `[out, in]` under `weight`, bias `[out]` under `bias`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

/// Builds a [`Linear`] layer; fresh weights use PyTorch's default, uniform in `±1/sqrt(in)`.
pub fn linear(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1. / (in_features.max(1) as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((out_features, in_features), "weight", init)?;
    let bias = vb.get_with_hints(out_features, "bias", init)?;
    Ok(Linear { weight, bias })
}

impl Linear {
    /// Maps `x` `[N, in]` to `[N, out]`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let w = mode.weight(&self.weight);
        let b = mode.weight(&self.bias);
        let y = match crate::kernels::linear_product_autocast(x, &w)? {
            Some(y) => y,
            None => x.matmul(&w.t()?)?,
        };
        Ok(kernels::add_bias(&y, &b, 1)?)
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

/// Global average pool: `[N, C, H, W]` to `[N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok((x.reshape((n, c, h * w))?.sum(D::Minus1)? / (h * w) as f64)?)
}

thread_local! {
    /// The stream of [`seeded_drop_path`]'s scope on this thread: its seed and the masks drawn so far.
    static DROP_PATH_STREAM: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every [`drop_path`] inside drawing its mask from a generator seeded by `seed` and the
/// call's position in the scope (the k-th drop path of a forward gets stream k), so a training step's
/// masks are a function of `seed` alone: a run is reproducible and a resumed run draws what the
/// uninterrupted one drew. (candle's `Tensor::rand`, used outside a scope, is unseeded.) The forward must
/// run on this thread, as a training step does inside `on_pool`.
pub fn seeded_drop_path<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<(u64, u64)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DROP_PATH_STREAM.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(DROP_PATH_STREAM.with(|s| s.replace(Some((seed, 0)))));
    f()
}

/// Zeroes whole samples of `x` with probability `rate` and scales the rest by `1 / (1 - rate)` (timm's
/// `drop_path`, `scale_by_keep`): stochastic depth on a residual branch, in training only. Seeded inside
/// [`seeded_drop_path`].
pub fn drop_path(x: &Tensor, rate: f32) -> Result<Tensor> {
    let n = x.dim(0)?;
    let keep = 1.0 - rate as f64;
    let u = match DROP_PATH_STREAM.with(|s| s.get()) {
        Some((seed, k)) => {
            DROP_PATH_STREAM.with(|s| s.set(Some((seed, k + 1))));
            let mut rng = crate::rng::seeded(crate::rng::mix(seed ^ crate::rng::mix(k)));
            let u: Vec<f32> = (0..n).map(|_| rand::Rng::random::<f32>(&mut rng)).collect();
            Tensor::from_vec(u, n, x.device())?
        }
        None => Tensor::rand(0f32, 1f32, n, x.device())?,
    };
    let mask = (u.lt(keep)?.to_dtype(x.dtype())? / keep)?;
    let mut shape = vec![n];
    shape.resize(x.rank(), 1);
    Ok(x.broadcast_mul(&mask.reshape(shape)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A BatchNorm over 3 channels with non-trivial affine parameters and running statistics.
    fn batch_norm_f64(varmap: &VarMap) -> BatchNorm {
        let vb = VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu);
        let bn = batch_norm(3, 1e-3, vb.pp("bn")).unwrap();
        let data = varmap.data().lock().unwrap();
        let set = |k: &str, v: &[f64]| data[k].set(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        set("bn.weight", &[0.5, 1.5, 2.0]);
        set("bn.bias", &[0.1, -0.2, 0.3]);
        set("bn.running_mean", &[0.2, -0.1, 0.0]);
        set("bn.running_var", &[0.8, 1.2, 2.0]);
        bn
    }

    /// Per-channel values of `[N, C, H, W]` as plain vectors.
    fn channel_values(x: &Tensor, c: usize) -> Vec<f64> {
        x.narrow(1, c, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn batch_norm_train_uses_batch_statistics_and_updates_running_ones_like_pytorch() {
        let varmap = VarMap::new();
        let bn = batch_norm_f64(&varmap);
        let x = Tensor::randn(1f64, 2., (4, 3, 5, 6), &Device::Cpu).unwrap();
        let y = bn.forward(&x, Mode::Train).unwrap();
        let (w, b) = ([0.5, 1.5, 2.0], [0.1, -0.2, 0.3]);
        let (rm0, rv0) = ([0.2, -0.1, 0.0], [0.8, 1.2, 2.0]);
        let rm: Vec<f64> = bn.running_mean().as_tensor().to_vec1().unwrap();
        let rv: Vec<f64> = bn.running_var().as_tensor().to_vec1().unwrap();
        for c in 0..3 {
            let xs = channel_values(&x, c);
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let expected: Vec<f64> = xs
                .iter()
                .map(|v| (v - mean) / (var + 1e-3).sqrt() * w[c] + b[c])
                .collect();
            let ys = channel_values(&y, c);
            for (a, e) in ys.iter().zip(&expected) {
                assert!((a - e).abs() < 1e-12, "channel {c}: {a} vs {e}");
            }
            assert!((rm[c] - (0.9 * rm0[c] + 0.1 * mean)).abs() < 1e-12);
            assert!((rv[c] - (0.9 * rv0[c] + 0.1 * var * n / (n - 1.))).abs() < 1e-12);
        }
    }

    #[test]
    fn batch_norm_training_kernel_matches_the_composed_ops_with_gradients() {
        // With and without the fused activation (composed: candle's BatchNorm ops, then relu / relu6).
        for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
            let varmap = VarMap::new();
            let bn = batch_norm_f64(&varmap);
            let x = candle_core::Var::randn(0.5f64, 2., (3, 3, 4, 5), &Device::Cpu).unwrap();
            let x3 = x.as_tensor().reshape((3, 3, 20)).unwrap();
            let probe = Tensor::randn(0f64, 1., (3, 3, 20), &Device::Cpu).unwrap();
            let (w, b) = (
                bn.weight().reshape((1, 3, 1)).unwrap(),
                bn.bias().reshape((1, 3, 1)).unwrap(),
            );
            let (y1, m1, v1) = bn.train_kernel(&x3, Mode::Train, act).unwrap();
            let (y2, m2, v2) = bn.train_composed(&x3, &w, &b).unwrap();
            let y2 = act.apply(&y2).unwrap();
            assert!(max_abs(&y1, &y2) < 1e-12, "{act:?}");
            assert!(max_abs(&m1.flatten_all().unwrap(), &m2.flatten_all().unwrap()) < 1e-12);
            assert!(max_abs(&v1.flatten_all().unwrap(), &v2.flatten_all().unwrap()) < 1e-12);
            let g1 = (y1 * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (y2 * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for t in [x.as_tensor(), bn.weight(), bn.bias()] {
                let (a, b) = (g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(max_abs(a, b) < 1e-12, "{act:?}: {}", max_abs(a, b));
            }
        }
    }

    #[test]
    fn batch_norm_eval_uses_running_statistics_and_leaves_them_alone() {
        let varmap = VarMap::new();
        let bn = batch_norm_f64(&varmap);
        let x = Tensor::randn(0f64, 1., (2, 3, 4, 4), &Device::Cpu).unwrap();
        for mode in [Mode::Eval, Mode::Frozen] {
            let y = bn.forward(&x, mode).unwrap();
            let (w, b) = ([0.5, 1.5, 2.0], [0.1, -0.2, 0.3]);
            let (rm, rv) = ([0.2, -0.1, 0.0], [0.8, 1.2, 2.0]);
            for c in 0..3 {
                let expected: Vec<f64> = channel_values(&x, c)
                    .iter()
                    .map(|v| (v - rm[c]) / (rv[c] + 1e-3f64).sqrt() * w[c] + b[c])
                    .collect();
                for (a, e) in channel_values(&y, c).iter().zip(&expected) {
                    assert!((a - e).abs() < 1e-12);
                }
            }
            let after: Vec<f64> = bn.running_mean().as_tensor().to_vec1().unwrap();
            assert_eq!(after, rm.to_vec());
        }
    }

    #[test]
    fn conv_bn_folds_batch_norm_outside_training_without_changing_results_or_gradients() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            bias: true,
            ..Default::default()
        };
        let conv = conv2d(2, 3, 3, cfg, vb.pp("conv")).unwrap();
        let bn = batch_norm_f64(&varmap);
        let x = Tensor::randn(0f64, 1., (2, 2, 7, 7), &dev).unwrap();
        let probe = Tensor::randn(0f64, 1., (2, 3, 4, 4), &dev).unwrap();
        let params = [conv.weight(), conv.bias().unwrap(), bn.weight(), bn.bias()];
        let folded = conv_bn(&x, &conv, &bn, Mode::Eval).unwrap();
        let plain = bn
            .forward(&conv.forward(&x, Mode::Eval).unwrap(), Mode::Eval)
            .unwrap();
        assert!(max_abs(&folded, &plain) < 1e-12);
        let g1 = (folded * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (plain * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for p in params {
            assert!(max_abs(g1.get(p).unwrap(), g2.get(p).unwrap()) < 1e-12);
        }
        let frozen = conv_bn(&x, &conv, &bn, Mode::Frozen).unwrap();
        let g3 = (frozen * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for p in params {
            assert!(g3.get(p).is_none());
        }
    }

    #[test]
    fn batch_norm_gradients_skip_running_statistics() {
        let varmap = VarMap::new();
        let bn = batch_norm_f64(&varmap);
        let x = Tensor::randn(0f64, 1., (2, 3, 4, 4), &Device::Cpu).unwrap();
        for mode in [Mode::Train, Mode::Eval] {
            let grads = bn
                .forward(&x, mode)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(grads.get(bn.weight()).is_some());
            assert!(grads.get(bn.running_mean().as_tensor()).is_none());
            assert!(grads.get(bn.running_var().as_tensor()).is_none());
        }
    }

    #[test]
    fn batch_norm_rejects_a_single_value_per_channel_in_training() {
        let varmap = VarMap::new();
        let bn = batch_norm_f64(&varmap);
        let x = Tensor::zeros((1, 3, 1, 1), DType::F64, &Device::Cpu).unwrap();
        assert!(bn.forward(&x, Mode::Train).is_err());
        assert!(bn.forward(&x, Mode::Eval).is_ok());
    }

    #[test]
    fn frozen_layers_record_no_gradient() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            padding: 1,
            bias: true,
            ..Default::default()
        };
        let conv = conv2d(3, 4, 3, cfg, vb.pp("conv")).unwrap();
        let fc = linear(4, 2, vb.pp("fc")).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 5), &Device::Cpu).unwrap();
        let run = |mode: Mode| {
            let h = global_avg_pool(&conv.forward(&x, mode).unwrap()).unwrap();
            let loss = fc.forward(&h, mode).unwrap().sum_all().unwrap();
            loss.backward().unwrap()
        };
        let eval = run(Mode::Eval);
        let frozen = run(Mode::Frozen);
        for t in [conv.weight(), conv.bias().unwrap(), fc.weight(), fc.bias()] {
            assert!(eval.get(t).is_some());
            assert!(frozen.get(t).is_none());
        }
    }

    #[test]
    fn conv2d_uses_the_depthwise_kernel_and_matches_candle() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            padding: 2,
            stride: 2,
            groups: 6,
            bias: true,
        };
        let conv = conv2d(6, 6, 5, cfg, vb.pp("dw")).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 6, 9, 9), &Device::Cpu).unwrap();
        assert_eq!(
            kernels::conv::algorithm(&x, conv.weight(), conv.padding(), 2, 6).unwrap(),
            kernels::conv::ConvAlgorithm::Depthwise
        );
        let ours = conv.forward(&x, Mode::Eval).unwrap();
        let reference = x
            .conv2d(conv.weight(), 2, 2, 1, 6)
            .unwrap()
            .broadcast_add(&conv.bias().unwrap().reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        assert!(max_abs(&ours, &reference) < 1e-5);
    }

    #[test]
    fn strided_conv2d_on_a_non_square_input_has_finite_difference_gradients() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let conv = conv2d(2, 3, 3, cfg, vb.pp("conv")).unwrap();
        // 9 rows leave no unused row, 8 columns leave one unused column.
        let x = candle_core::Var::randn(0f64, 1., (2, 2, 9, 8), &dev).unwrap();
        let probe = Tensor::randn(0f64, 1., (2, 3, 5, 4), &dev).unwrap();
        let loss = |t: &Tensor| {
            (conv.forward(t, Mode::Eval).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let reference = x.as_tensor().conv2d(conv.weight(), 1, 2, 1, 1).unwrap();
        let forward = conv.forward(x.as_tensor(), Mode::Eval).unwrap();
        assert!(max_abs(&forward, &reference) < 1e-12);
        let grads = loss(x.as_tensor()).backward().unwrap();
        let gx: Vec<f64> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for i in (0..base.len()).step_by(7) {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                loss(&Tensor::from_vec(v, (2, 2, 9, 8), &dev).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2. * eps);
            assert!((fd - gx[i]).abs() < 1e-6, "input {i}: {fd} vs {}", gx[i]);
        }
        assert!(grads.get(conv.weight()).is_some());
    }

    #[test]
    fn conv2d_rejects_groups_that_do_not_divide_the_channels() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            groups: 4,
            ..Default::default()
        };
        assert!(matches!(
            conv2d(6, 8, 3, cfg, vb),
            Err(Error::Config { .. })
        ));
    }

    #[test]
    fn linear_computes_x_w_transposed_plus_b() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let fc = linear(2, 3, vb.pp("fc")).unwrap();
        {
            let data = varmap.data().lock().unwrap();
            let w = Tensor::new(&[[1f64, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
            data["fc.weight"].set(&w).unwrap();
            data["fc.bias"]
                .set(&Tensor::new(&[0.5f64, 0., -1.], &Device::Cpu).unwrap())
                .unwrap();
        }
        let x = Tensor::new(&[[1f64, -1.]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f64>> = fc.forward(&x, Mode::Eval).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![-0.5, -1., -2.]]);
    }
}
