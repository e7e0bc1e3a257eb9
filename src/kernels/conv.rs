//! Convolution: the one place that chooses how a convolution runs ([`choose`]), and the ops built on that
//! choice: [`conv2d`] for a layer (depthwise kernel, candle's conv2d, or one of the dense algorithms), and
//! the dense op that runs Winograd, the shifted GEMMs or im2col per pass, forward and backward.
//!
//! The top of the kernels' import graph: it imports the algorithms (`depthwise`, `winograd`, `shifted`,
//! `im2col`) and `common`; none of them imports it.

use super::common::{dispatch2, impl_forward_only_op2, Epilogue, Geom, Padding2d};
use super::depthwise::{depthwise_conv2d_padded, depthwise_conv2d_shift_clamp};
use super::{im2col, shifted, winograd};
use crate::device::custom_kernels_on;
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

/// How a convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// candle's own conv2d: devices without graft's kernels, and grouped convolutions that are not
    /// depthwise.
    Candle,
    /// The depthwise kernel ([`crate::kernels::depthwise_conv2d`]; on devices without graft's kernels,
    /// its form composed from candle ops).
    Depthwise,
    /// Winograd's F(2x2, 3x3) over the whole batch (`winograd`).
    Winograd,
    /// A sum of shifted GEMMs per image, with no column matrix (`shifted`).
    Shifted,
    /// im2col one image (and band of output rows) at a time (`im2col`).
    ImageByImage,
    /// im2col over the whole batch, one GEMM (`im2col`; the gradients per chunk of images).
    Im2col,
}

/// The pass of a convolution an algorithm is chosen for: each pass of a dense convolution chooses anew
/// (the filter gradient's GEMMs have other shapes than the forward's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    Forward,
    FilterGrad,
    InputGrad,
}

/// How a layer pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPadding {
    /// `p` zeros on every side, applied by the convolution itself.
    Symmetric(usize),
    /// Zeros per side (TensorFlow's "SAME" padding is asymmetric for stride 2 on even sizes). The
    /// depthwise kernel pads inside itself; every other algorithm gets a padded copy of the input.
    PerSide(Padding2d),
}

impl ConvPadding {
    /// The padding on each side.
    fn per_side(self) -> Padding2d {
        match self {
            ConvPadding::Symmetric(p) => Padding2d::symmetric(p),
            ConvPadding::PerSide(p) => p,
        }
    }

    /// The input padded when the padding is per side, and the symmetric padding left to apply.
    fn apply(self, x: &Tensor) -> Result<(Tensor, usize)> {
        Ok(match self {
            ConvPadding::Symmetric(p) => (x.clone(), p),
            ConvPadding::PerSide(p) => (
                x.pad_with_zeros(2, p.top, p.bottom)?
                    .pad_with_zeros(3, p.left, p.right)?,
                0,
            ),
        })
    }
}

/// What [`choose`] looks at.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvSpec {
    /// The input as the dense algorithms see it: per-side padding already applied (see
    /// [`ConvPadding::PerSide`]).
    geom: Geom,
    out_channels: usize,
    /// Input channels of each filter (`in / groups`).
    filter_channels: usize,
    groups: usize,
    dtype: DType,
    /// Whether graft's CPU kernels may run on the input's device ([`custom_kernels_on`]).
    kernels_on: bool,
}

impl ConvSpec {
    /// The convolution of `x` `[N, C, H, W]` with `weight` `[O, C / groups, KH, KW]`.
    fn of(
        x: &Tensor,
        weight: &Tensor,
        pad: ConvPadding,
        stride: usize,
        groups: usize,
    ) -> Result<Self> {
        let (_, c, h, w) = x.dims4()?;
        let (out_channels, filter_channels, kh, kw) = weight.dims4()?;
        let (h, w, padding) = match pad {
            ConvPadding::Symmetric(p) => (h, w, p),
            ConvPadding::PerSide(p) => (h + p.top + p.bottom, w + p.left + p.right, 0),
        };
        Ok(Self {
            geom: Geom {
                c,
                h,
                w,
                kh,
                kw,
                padding,
                stride,
                precision: super::precision::for_convolution(c),
            },
            out_channels,
            filter_channels,
            groups,
            dtype: x.dtype(),
            kernels_on: custom_kernels_on(x.device()),
        })
    }

    /// A dense convolution (`groups == 1`) of geometry `geom` into `o` channels, in `T`, run by the dense
    /// op on the CPU.
    fn dense<T: WithDType>(geom: Geom, o: usize) -> Self {
        Self {
            geom,
            out_channels: o,
            filter_channels: geom.c,
            groups: 1,
            dtype: T::DTYPE,
            kernels_on: true,
        }
    }
}

/// Output pixels per image from which the shifted GEMMs beat im2col (see `shifted`'s module comment).
const SHIFTED_MIN_PIXELS: usize = 256;

/// Input channels from which they do: each tap's GEMM reduces over the channels alone, and a reduction
/// of a few (an RGB image) would run the GEMM far below its speed.
const SHIFTED_MIN_CHANNELS: usize = 16;

/// Channels, of the input and of the output, from which Winograd beats the other paths on the forward
/// and the input gradient. Per 3x3 layer of ResNet-18, batch 16, summed over a training step's calls (ms,
/// other path -> Winograd; the two runs of each moved by about 10%): at 128x128, 128 channels at 16x16
/// forward 22 -> 15-18, input gradient 24 -> 17-23; 256 at 8x8 22-25 -> 14-18 and 20-22 -> 16-18; 512 at
/// 4x4 24-27 -> 22 and 23-25 -> 20-23. At 224x224: 128 at 28x28 63 -> 50-52, 256 at 14x14 61 -> 41,
/// 512 at 7x7 60-65 -> 52-57. At 64 channels (32x32) the transforms cost more than they save: forward
/// 29 -> 42.
const WINOGRAD_MIN_CHANNELS: usize = 128;

/// The algorithm that runs `pass` of the convolution `spec`: the first rule that applies.
///
/// 1. [`ConvAlgorithm::Depthwise`] when `groups == in == out` channels, on any device: candle 0.11 runs a
///    grouped convolution as one convolution per group (a tiny im2col + matmul per channel), about 50x
///    slower forward and backward; elsewhere the depthwise op composes itself from candle ops.
/// 2. [`ConvAlgorithm::Candle`] where graft's kernels do not run ([`custom_kernels_on`]: other devices,
///    or the generic path forced) and for other grouped convolutions.
/// 3. [`ConvAlgorithm::Winograd`] for 3x3 filters at stride 1 and padding 1 in f32/f64 with at least
///    `WINOGRAD_MIN_CHANNELS` (128) input and output channels: 2.25x fewer multiply-adds, which pay for
///    the transforms only with many channels (at 64 channels, 32x32, the forward went 29 -> 42 ms; at 128
///    and more, 10-30% faster). The filter gradient only where the shifted GEMMs do not apply (rule 4):
///    its GEMMs write a `16 x O x C` product per call, and on maps of 256 pixels and more the shifted
///    filter gradient stayed faster (128 channels at 28x28: 64 -> 73 ms); below, 256 channels at 8x8
///    went 22 -> 18-19 and at 14x14 56 -> 42; 512 channels at 4x4 26-29 -> 22-25.
/// 4. [`ConvAlgorithm::Shifted`] at stride 1 in f32/f64 with at least `SHIFTED_MIN_CHANNELS` (16) input
///    channels and `SHIFTED_MIN_PIXELS` (256) output pixels per image: it writes no column matrix `K * K`
///    times the input (which on 2 cores cost more than the GEMM on ResNet's first stage: a 64-channel
///    3x3 at 32x32, forward 27 -> 7 ms, backward 27 -> 16), but pays junk columns and packing the filter
///    per image and tap, small only for large images (at 8x8 and 4x4 its backward was slower).
/// 5. [`ConvAlgorithm::ImageByImage`] (forward and filter gradient) in f32/f64 when one image's column
///    matrix exceeds `im2col::IMAGE_BY_IMAGE_BYTES` (1 MiB, about a core's L2 cache), so the columns are
///    read back from cache: it splits ResNet's stem (2.4 MB per image at 128x128); the late layers stay
///    batched, where one GEMM amortises packing the filter.
/// 6. [`ConvAlgorithm::Im2col`] otherwise (also every half-precision dense convolution).
pub(super) fn choose(spec: &ConvSpec, pass: Pass) -> ConvAlgorithm {
    let (g, o, dtype) = (spec.geom, spec.out_channels, spec.dtype);
    if spec.groups > 1 && spec.filter_channels == 1 && o == spec.groups {
        return ConvAlgorithm::Depthwise;
    }
    if !spec.kernels_on || spec.groups != 1 {
        return ConvAlgorithm::Candle;
    }
    let (oh, ow) = g.out_hw();
    let shifted =
        shifted::can_run(g, dtype) && g.c >= SHIFTED_MIN_CHANNELS && oh * ow >= SHIFTED_MIN_PIXELS;
    let winograd = winograd::can_run(g, dtype) && g.c.min(o) >= WINOGRAD_MIN_CHANNELS;
    if winograd && !(pass == Pass::FilterGrad && shifted) {
        return ConvAlgorithm::Winograd;
    }
    if shifted {
        return ConvAlgorithm::Shifted;
    }
    let columns_per_image = g.c * g.kh * g.kw * oh * ow * dtype.size_in_bytes();
    if pass != Pass::InputGrad
        && columns_per_image > im2col::IMAGE_BY_IMAGE_BYTES
        && matches!(dtype, DType::F32 | DType::F64)
    {
        return ConvAlgorithm::ImageByImage;
    }
    ConvAlgorithm::Im2col
}

/// The algorithm [`conv2d`] runs the forward of this convolution with (see [`choose`]); the backward
/// chooses again per gradient.
pub fn algorithm(
    x: &Tensor,
    weight: &Tensor,
    pad: ConvPadding,
    stride: usize,
    groups: usize,
) -> Result<ConvAlgorithm> {
    Ok(choose(
        &ConvSpec::of(x, weight, pad, stride, groups)?,
        Pass::Forward,
    ))
}

/// The bias-free convolution of `x` `[N, C, H, W]` with `weight` `[O, C / groups, KH, KW]`, dilation 1,
/// by the algorithm [`choose`] picks. Differentiable in both arguments.
///
/// candle's conv2d gets its input through [`backward_safe_input`].
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    pad: ConvPadding,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    match algorithm(x, weight, pad, stride, groups)? {
        ConvAlgorithm::Depthwise => depthwise_conv2d_padded(x, weight, pad.per_side(), stride),
        ConvAlgorithm::Candle => {
            let (x, p) = pad.apply(x)?;
            let (x, padding) = backward_safe_input(&x, weight.dim(2)?, p, stride)?;
            // Under bf16 autocast, candle's own bf16 convolution (cuDNN's on a GPU), as PyTorch's
            // autocast does it: bf16 inputs, the result widened back to f32.
            let image = x.dim(1)? <= super::precision::F32_MAX_INPUT_CHANNELS;
            if let Some(dt) = super::precision::autocast_dtype(x.dtype()).filter(|_| !image) {
                let f32 = x.dtype();
                if x.device().is_cpu() {
                    // candle's CPU convolution has no bf16 kernel: the same products from inputs rounded
                    // to bf16 and multiplied in f32 (a bf16 x bf16 product is exact in f32).
                    let round = |t: &Tensor| t.to_dtype(dt)?.to_dtype(f32);
                    return Ok(round(&x)?.conv2d(&round(weight)?, padding, stride, 1, groups)?);
                }
                let y =
                    x.to_dtype(dt)?
                        .conv2d(&weight.to_dtype(dt)?, padding, stride, 1, groups)?;
                return Ok(y.to_dtype(f32)?);
            }
            Ok(x.conv2d(weight, padding, stride, 1, groups)?)
        }
        _ => {
            let (x, p) = pad.apply(x)?;
            Ok(dense_conv2d(&x, weight, p, stride)?)
        }
    }
}

/// [`conv2d`] with `epilogue` applied by the kernel itself, for inference (no gradient is recorded);
/// `None` where no kernel of graft's runs the convolution (other devices, grouped convolutions).
pub(crate) fn conv2d_shift_clamp(
    x: &Tensor,
    weight: &Tensor,
    pad: ConvPadding,
    stride: usize,
    groups: usize,
    epilogue: Epilogue,
) -> Result<Option<Tensor>> {
    if !custom_kernels_on(x.device()) {
        return Ok(None);
    }
    Ok(match algorithm(x, weight, pad, stride, groups)? {
        ConvAlgorithm::Depthwise => Some(depthwise_conv2d_shift_clamp(
            x,
            weight,
            pad.per_side(),
            stride,
            epilogue,
        )?),
        ConvAlgorithm::Candle => None,
        _ => {
            let (x, p) = pad.apply(x)?;
            Some(dense_conv2d_shift_clamp(&x, weight, p, stride, epilogue)?)
        }
    })
}

/// The input and padding to hand candle's conv2d: `(x, padding)` unchanged, unless the two axes leave a
/// different number of trailing rows/columns that no window reaches (a non-square input of mixed parity
/// under a stride). Then the zero padding is applied here and the unreached edge cut off, and the
/// convolution runs unpadded on exactly the extent its windows cover (`k` is the filter size).
///
/// The output is the same either way; the point is candle 0.11's conv2d backward, which rebuilds the
/// input gradient with a transposed convolution whose output padding it derives from the height alone,
/// so an input whose width leaves a different remainder gets a gradient of the wrong width (a shape
/// error). Square inputs, and any whose axes leave the same remainder, pass through untouched.
fn backward_safe_input(x: &Tensor, k: usize, p: usize, s: usize) -> Result<(Tensor, usize)> {
    let (_, _, h, w) = x.dims4()?;
    if h + 2 * p < k || w + 2 * p < k {
        return Ok((x.clone(), p)); // let candle report the size error
    }
    // Padded extent the windows cover: (out - 1) * stride + k.
    let reach = |i: usize| (i + 2 * p - k) / s * s + k;
    let (rh, rw) = (reach(h), reach(w));
    if h + 2 * p - rh == w + 2 * p - rw {
        return Ok((x.clone(), p));
    }
    let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    Ok((padded.narrow(2, 0, rh)?.narrow(3, 0, rw)?, 0))
}

/// Bias-free `conv2d(x, weight)` for `groups == 1`: `x` `[N, C, H, W]`, `weight` `[O, C, K, K]`, symmetric
/// zero `padding`, `stride`. Differentiable in both arguments (an input that tracks no gradient gets none
/// computed). CPU only (the caller checks the device).
fn dense_conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let geom = Geom::of(x, weight, padding, stride)?;
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        DenseConv {
            geom,
            epilogue: None,
            keep_filter: x.track_op(),
            keep_input: weight.track_op(),
            kept: Default::default(),
        },
    )
}

/// `clamp(conv2d(x, weight) + shift[o], 0, max)` (no clamp when `max` is `None`) in one op, for inference
/// (no gradient is recorded): the shift and clamp are applied in the pass that lays the product out, so a
/// folded conv + BatchNorm + activation costs no pass of its own. Same contract as [`dense_conv2d`]
/// otherwise.
fn dense_conv2d_shift_clamp(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    epilogue: Epilogue,
) -> candle_core::Result<Tensor> {
    let o = weight.dims4()?.0;
    if epilogue.shift.len() != o {
        candle_core::bail!(
            "conv2d_shift_clamp: {} shifts for {o} channels",
            epilogue.shift.len()
        );
    }
    let geom = Geom::of(x, weight, padding, stride)?;
    x.contiguous()?.apply_op2_no_bwd(
        &weight.contiguous()?,
        &DenseConv {
            geom,
            epilogue: Some(epilogue),
            keep_filter: false,
            keep_input: false,
            kept: Default::default(),
        },
    )
}

/// `(x, weight) -> conv2d(x, weight)` for `groups == 1` on the CPU, each pass by the algorithm [`choose`]
/// picks, with an optional inference epilogue.
struct DenseConv {
    geom: Geom,
    epilogue: Option<Epilogue>,
    /// Whether a Winograd forward keeps its transformed filter (the input gradient reads it: the input
    /// tracks a gradient) and its transformed input (the filter gradient reads it: the filter does).
    /// Decided when the op is built, so that inference and frozen layers hold neither.
    keep_filter: bool,
    keep_input: bool,
    /// A Winograd forward's transforms, kept for the backward. Taken, so freed, by the backward;
    /// dropped with the op when no backward comes (inference: the op is not recorded).
    kept: std::sync::Mutex<Kept>,
}

/// A Winograd forward's transformed filter and input (each a `Vec<T>`), see [`DenseConv::kept`].
///
/// The input gradient reads the same filter transform, and the filter gradient the same input
/// transform: one memory-bound pass less each per layer and step (16 MB for a 512-channel filter; 4x
/// the layer's input for the input), for holding them from the forward to the backward.
#[derive(Default)]
struct Kept {
    filter: Option<Box<dyn std::any::Any + Send>>,
    input: Option<Box<dyn std::any::Any + Send>>,
}

impl DenseConv {
    fn run<T: WithDType>(&self, x: &[T], w: &[T]) -> (CpuStorage, Shape) {
        let g = self.geom;
        let o = w.len() / (g.c * g.kh * g.kw);
        let (oh, ow) = g.out_hw();
        let n = x.len() / (g.c * g.h * g.w);
        let e = self.epilogue.as_ref();
        let out = match choose(&ConvSpec::dense::<T>(g, o), Pass::Forward) {
            ConvAlgorithm::Winograd => {
                let u = winograd::filter_transform(w, o, g.c);
                let (out, v) = winograd::forward_with(g, x, &u, o, e, self.keep_input);
                if let Ok(mut kept) = self.kept.lock() {
                    *kept = Kept {
                        filter: self
                            .keep_filter
                            .then(|| Box::new(u) as Box<dyn std::any::Any + Send>),
                        input: v.map(|v| Box::new(v) as Box<dyn std::any::Any + Send>),
                    };
                }
                out
            }
            ConvAlgorithm::Shifted => shifted::forward(g, x, w, o, e),
            ConvAlgorithm::ImageByImage => im2col::forward_image_by_image(g, x, w, o, e),
            _ => im2col::forward(g, x, w, o, e),
        };
        (T::to_cpu_storage_owned(out), Shape::from((n, o, oh, ow)))
    }
}

impl CustomOp2 for DenseConv {
    fn name(&self) -> &'static str {
        "graft-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch2!(self, s1, l1, s2, l2)
    }

    /// Filter gradient `dY x cols^T` (only when the filter tracks a gradient) and input gradient
    /// `col2im(W^T x dY)` (only when the input does: not for the image, nor for a frozen group's output).
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.epilogue.is_some() {
            candle_core::bail!("graft-conv2d: the inference epilogue has no backward");
        }
        let g = self.geom;
        let grad = grad.contiguous()?;
        let kept = self
            .kept
            .lock()
            .map(|mut k| std::mem::take(&mut *k))
            .unwrap_or_default();
        let gw = if weight.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &FilterGrad(g, kept.input))?)
        } else {
            None
        };
        if !x.track_op() {
            return Ok((None, gw));
        }
        let dx = grad.apply_op2_no_bwd(weight, &InputGrad(g, kept.filter))?;
        Ok((Some(dx), gw))
    }
}

/// The filter gradient of [`DenseConv`]: `(x [N, C, H, W], dY [N, O, OH, OW]) -> dW [O, C, KH, KW]`,
/// with a Winograd forward's transformed input when it kept one.
struct FilterGrad(Geom, Option<Box<dyn std::any::Any + Send>>);

impl FilterGrad {
    fn run<T: WithDType>(&self, x: &[T], grad: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let n = x.len() / (g.c * g.h * g.w);
        let o = grad.len() / (n * oh * ow).max(1);
        let dw = match choose(&ConvSpec::dense::<T>(g, o), Pass::FilterGrad) {
            ConvAlgorithm::Winograd => {
                let kept = self.1.as_ref().and_then(|v| v.downcast_ref::<Vec<T>>());
                winograd::filter_grad_with(g, x, kept.map(|v| &v[..]), grad, o)
            }
            ConvAlgorithm::Shifted => shifted::filter_grad(g, x, grad, o),
            ConvAlgorithm::ImageByImage => im2col::filter_grad(g, x, grad, o, true),
            _ => im2col::filter_grad(g, x, grad, o, false),
        };
        (
            T::to_cpu_storage_owned(dw),
            Shape::from((o, g.c, g.kh, g.kw)),
        )
    }
}

impl_forward_only_op2!(FilterGrad, "graft-conv2d-filter-grad");

/// The input gradient of [`DenseConv`]: `(dY [N, O, OH, OW], weight [O, C, KH, KW]) -> dX [N, C, H, W]`,
/// with a Winograd forward's transformed filter when it kept one.
struct InputGrad(Geom, Option<Box<dyn std::any::Any + Send>>);

impl InputGrad {
    fn run<T: WithDType>(&self, grad: &[T], w: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let o = w.len() / (g.c * g.kh * g.kw);
        let n = grad.len() / (o * oh * ow).max(1);
        let dx = match choose(&ConvSpec::dense::<T>(g, o), Pass::InputGrad) {
            ConvAlgorithm::Winograd => {
                match self.1.as_ref().and_then(|u| u.downcast_ref::<Vec<T>>()) {
                    Some(u) => winograd::input_grad_with(g, grad, u, o),
                    None => winograd::input_grad(g, grad, w, o),
                }
            }
            ConvAlgorithm::Shifted => shifted::input_grad(g, grad, w, o),
            _ => im2col::input_grad(g, grad, w, o),
        };
        (T::to_cpu_storage_owned(dx), Shape::from((n, g.c, g.h, g.w)))
    }
}

impl_forward_only_op2!(InputGrad, "graft-conv2d-input-grad");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::precision::Precision;
    use crate::kernels::test_support::{gradient_gaps, max_abs};
    use crate::kernels::Smooth;
    use candle_core::{DType, Device, Var};

    /// (in, out, h, w, kernel, padding, stride): ResNet's stem, 3x3 at stride 1 and 2, 1x1 at stride 1
    /// and 2, odd and non-square sizes; then four large enough for the shifted GEMMs ([`shifted`]):
    /// padded, unpadded with junk columns, 1x1 (neither), and 5x5; and two that run image by image
    /// (over `IMAGE_BY_IMAGE_BYTES` of columns per image): the stem at 96x96, and a 3x3 at stride 2.
    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 15] = [
        (256, 16, 6, 6, 3, 1, 1),
        (512, 8, 4, 4, 1, 0, 2),
        (3, 8, 20, 20, 7, 3, 2),
        (8, 8, 9, 9, 3, 1, 1),
        (8, 16, 9, 9, 3, 1, 2),
        (8, 16, 8, 8, 1, 0, 2),
        (8, 16, 8, 8, 1, 0, 1),
        (3, 2, 6, 7, 1, 0, 1),
        (2, 3, 11, 9, 5, 0, 2),
        (16, 8, 16, 16, 3, 1, 1),
        (16, 4, 19, 18, 3, 0, 1),
        (20, 6, 16, 17, 1, 0, 1),
        (16, 5, 16, 17, 5, 2, 1),
        (3, 8, 96, 96, 7, 3, 2),
        (64, 8, 48, 48, 3, 1, 2),
    ];

    fn geom(c: usize, h: usize, w: usize, k: usize, padding: usize, stride: usize) -> Geom {
        Geom {
            c,
            h,
            w,
            kh: k,
            kw: k,
            padding,
            stride,
            precision: Precision::F32,
        }
    }

    #[test]
    fn f32_forward_rounds_like_candle_conv2d() {
        let dev = Device::Cpu;
        for (ci, co, h, w, k, p, s) in CASES {
            let x = Tensor::randn(0f32, 1., (3, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (co, ci, k, k), &dev).unwrap();
            let ours = dense_conv2d(&x, &wt, p, s).unwrap();
            let theirs = x.conv2d(&wt, p, s, 1, 1).unwrap();
            let what = format!("{ci}->{co} {h}x{w} k{k} p{p} s{s}");
            assert_eq!(ours.dims(), theirs.dims(), "{what}");
            assert_eq!(ours.dtype(), DType::F32);
            let gap = max_abs(&ours, &theirs);
            let spec = ConvSpec::dense::<f32>(geom(ci, h, w, k, p, s), co);
            if ci * k * k <= 147 && choose(&spec, Pass::Forward) != ConvAlgorithm::Shifted {
                // Short reductions (ResNet's stem: 3 x 7 x 7) sum in candle's order exactly.
                assert_eq!(gap, 0.0, "{what}");
            } else {
                let scale = max_abs(&theirs, &theirs.zeros_like().unwrap());
                assert!(gap <= 1e-5 * scale, "{what}: {gap} of {scale}");
            }
        }
    }

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        let dev = Device::Cpu;
        for (ci, co, h, w, k, p, s) in CASES {
            let x = Var::randn(0f64, 1., (2, ci, h, w), &dev).unwrap();
            let wt = Var::randn(0f64, 1., (co, ci, k, k), &dev).unwrap();
            let ours = dense_conv2d(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            let what = format!("{ci}->{co} {h}x{w} k{k} p{p} s{s}");
            assert_eq!(ours.dims(), theirs.dims(), "{what}");
            assert!(max_abs(&ours, &theirs) < 1e-10, "forward {what}");
            let probe = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
            for gap in gradient_gaps(&ours, &theirs, &probe, &[&x, &wt]) {
                assert!(gap < 1e-10, "gradient {what}");
            }
        }
    }

    /// `||a - b|| / ||b||` over all values.
    fn relative_l2(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f64>().unwrap() / n.to_scalar::<f64>().unwrap()).sqrt()
    }

    /// Under `autocast(Bf16)` every algorithm (the cases cover im2col batched and image by image,
    /// shifted GEMMs and, with 256 and 512 channels, Winograd) multiplies in bf16, except on an image's
    /// few channels (the stem stays f32): forward and both
    /// gradients within bf16's rounding of the f64 result (8 bits of mantissa: relative errors of a few
    /// 1e-3 per product; 2e-2 bounds the L2 error of sums of hundreds), and measurably off f32's
    /// (so the bf16 path ran) where the CPU has it.
    #[test]
    fn bf16_autocast_runs_every_algorithm_within_bf16_rounding() {
        let dev = Device::Cpu;
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for (ci, co, h, w, k, p, s) in CASES {
            let what = format!("{ci}->{co} {h}x{w} k{k} p{p} s{s}");
            let x = Var::randn(0f32, 1., (2, ci, h, w), &dev).unwrap();
            let wt = Var::randn(0f32, 1., (co, ci, k, k), &dev).unwrap();
            let (x64, w64) = (
                Var::from_tensor(&to64(x.as_tensor())).unwrap(),
                Var::from_tensor(&to64(wt.as_tensor())).unwrap(),
            );
            let want = dense_conv2d(x64.as_tensor(), w64.as_tensor(), p, s).unwrap();
            let probe = Tensor::randn(0f64, 1., want.dims(), &dev).unwrap();
            let want_grads = (&want * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (got, grads) = crate::kernels::precision::autocast(Precision::Bf16, || {
                let y = dense_conv2d(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
                let g = (&y * probe.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (y, g)
            });
            let pairs = [
                ("forward", to64(&got), want.clone()),
                (
                    "input grad",
                    to64(grads.get(&x).unwrap()),
                    want_grads.get(&x64).unwrap().clone(),
                ),
                (
                    "filter grad",
                    to64(grads.get(&wt).unwrap()),
                    want_grads.get(&w64).unwrap().clone(),
                ),
            ];
            for (pass, ours, reference) in pairs {
                let err = relative_l2(&ours, &reference);
                assert!(err < 2e-2, "{what} {pass}: relative L2 error {err}");
                if ci <= crate::kernels::precision::F32_MAX_INPUT_CHANNELS {
                    // An image's convolution (the stem) stays f32.
                    assert!(err < 1e-5, "{what} {pass}: {err} is not f32's error");
                } else if crate::kernels::precision::bf16_supported() {
                    assert!(
                        err > 1e-5,
                        "{what} {pass}: {err} is f32's error, not bf16's"
                    );
                }
            }
        }
    }

    /// Where graft's kernels do not run (a GPU; here the generic path), bf16 autocast runs candle's own
    /// bf16 convolution: within bf16 rounding of f32, and not f32 itself; gradients reach both inputs.
    #[test]
    fn bf16_autocast_off_graft_kernels_uses_candles_bf16_convolution() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 8, 9, 9), &dev).unwrap();
        let wt = Var::randn(0f32, 1., (16, 8, 3, 3), &dev).unwrap();
        let pad = ConvPadding::Symmetric(1);
        let want = x.as_tensor().conv2d(wt.as_tensor(), 1, 2, 1, 1).unwrap();
        let got = crate::device::with_generic_ops(|| {
            crate::kernels::precision::autocast(Precision::Bf16, || {
                conv2d(x.as_tensor(), wt.as_tensor(), pad, 2, 1).unwrap()
            })
        });
        assert_eq!(got.dtype(), DType::F32);
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let err = relative_l2(&to64(&got), &to64(&want));
        assert!(err < 2e-2 && err > 1e-5, "relative L2 error {err}");
        let grads = got.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&x).unwrap().dtype(), DType::F32);
        assert_eq!(grads.get(&wt).unwrap().dims(), &[16, 8, 3, 3]);
    }

    #[test]
    fn shift_and_clamp_epilogue_matches_the_separate_ops() {
        // Batched im2col, shifted GEMMs, image-by-image im2col.
        for (c, size, stride) in [(4, 7, 2), (16, 16, 1), (64, 48, 2)] {
            shift_and_clamp_case(c, size, stride);
        }
    }

    fn shift_and_clamp_case(c: usize, size: usize, stride: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, c, size, size), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1., (5, c, 3, 3), &dev).unwrap();
        let shift = vec![-1.0, -0.5, 0.0, 0.5, 1.0];
        let shifted = dense_conv2d(&x, &wt, 1, stride)
            .unwrap()
            .broadcast_add(
                &Tensor::new(&[-1f32, -0.5, 0.0, 0.5, 1.0], &dev)
                    .unwrap()
                    .reshape((1, 5, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        for max in [None, Some(f64::INFINITY), Some(2.)] {
            let e = Epilogue {
                shift: shift.clone(),
                max,
                smooth: None,
            };
            let ours = dense_conv2d_shift_clamp(&x, &wt, 1, stride, e).unwrap();
            let theirs = match max {
                None => shifted.clone(),
                Some(m) => shifted.clamp(0f32, m as f32).unwrap(),
            };
            assert_eq!(max_abs(&ours, &theirs), 0.0, "{max:?}");
        }
        // The smooth activations, against our own separate op (the same arithmetic, so bit-equal).
        for f in [Smooth::Silu, Smooth::HardSwish] {
            let e = Epilogue {
                shift: shift.clone(),
                max: None,
                smooth: Some(f),
            };
            let ours = dense_conv2d_shift_clamp(&x, &wt, 1, stride, e).unwrap();
            let theirs = f.apply(&shifted).unwrap();
            assert_eq!(max_abs(&ours, &theirs), 0.0, "{f:?}");
        }
    }

    #[test]
    fn an_input_without_gradient_gets_none_computed() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev).unwrap();
        let wt = Var::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap();
        let y = dense_conv2d(&x, wt.as_tensor(), 1, 1).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert_eq!(grads.get(wt.as_tensor()).unwrap().dims(), &[4, 3, 3, 3]);
    }

    /// The shifted GEMMs with one image (fewer images than threads: the GEMM threads itself), and an odd count split into
    /// uneven chunks, against candle's conv2d in f64, forward and both gradients.
    #[test]
    fn shifted_gemms_match_candle_conv2d_at_any_batch_size() {
        let dev = Device::Cpu;
        for n in [1, 5] {
            let x = Var::randn(0f64, 1., (n, 16, 16, 16), &dev).unwrap();
            let wt = Var::randn(0f64, 1., (8, 16, 3, 3), &dev).unwrap();
            let g = Geom {
                c: 16,
                h: 16,
                w: 16,
                kh: 3,
                kw: 3,
                padding: 1,
                stride: 1,
                precision: Precision::F32,
            };
            assert_eq!(
                choose(&ConvSpec::dense::<f64>(g, 8), Pass::Forward),
                ConvAlgorithm::Shifted
            );
            let ours = dense_conv2d(x.as_tensor(), wt.as_tensor(), 1, 1).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1).unwrap();
            assert!(max_abs(&ours, &theirs) < 1e-10, "forward, {n} images");
            let probe = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
            for gap in gradient_gaps(&ours, &theirs, &probe, &[&x, &wt]) {
                assert!(gap < 1e-10, "gradient, {n} images");
            }
        }
    }

    /// Each pass of a few ResNet-18 layers (batch of any size, f32) goes where [`choose`]'s rules say.
    #[test]
    fn choose_follows_its_rules() {
        use ConvAlgorithm::*;
        let pick = |c, o, size, k, p, s, pass| {
            choose(
                &ConvSpec::dense::<f32>(geom(c, size, size, k, p, s), o),
                pass,
            )
        };
        // The stem, 3 -> 64 at 128x128: 2.4 MB of columns per image.
        assert_eq!(pick(3, 64, 128, 7, 3, 2, Pass::Forward), ImageByImage);
        assert_eq!(pick(3, 64, 128, 7, 3, 2, Pass::FilterGrad), ImageByImage);
        assert_eq!(pick(3, 64, 128, 7, 3, 2, Pass::InputGrad), Im2col);
        // layer1 at 32x32: too few channels for Winograd, enough pixels for the shifted GEMMs.
        assert_eq!(pick(64, 64, 32, 3, 1, 1, Pass::Forward), Shifted);
        // layer2 at 16x16: Winograd, but the filter gradient stays with the shifted GEMMs.
        assert_eq!(pick(128, 128, 16, 3, 1, 1, Pass::Forward), Winograd);
        assert_eq!(pick(128, 128, 16, 3, 1, 1, Pass::InputGrad), Winograd);
        assert_eq!(pick(128, 128, 16, 3, 1, 1, Pass::FilterGrad), Shifted);
        // layer4 at 4x4: Winograd in every pass; its strided and 1x1 convolutions batched im2col.
        assert_eq!(pick(512, 512, 4, 3, 1, 1, Pass::FilterGrad), Winograd);
        assert_eq!(pick(256, 512, 8, 3, 1, 2, Pass::Forward), Im2col);
        assert_eq!(pick(256, 512, 8, 1, 0, 2, Pass::Forward), Im2col);
        // Half precision: the GEMM crate's own kernels take f32 and f64 only.
        let half = ConvSpec {
            dtype: DType::F16,
            ..ConvSpec::dense::<f32>(geom(128, 16, 16, 3, 1, 1), 128)
        };
        assert_eq!(choose(&half, Pass::Forward), Im2col);
    }

    #[test]
    fn choose_sends_depthwise_grouped_and_generic_convolutions_to_their_ops() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6, 9, 9), DType::F32, &dev).unwrap();
        let depthwise = Tensor::zeros((6, 1, 3, 3), DType::F32, &dev).unwrap();
        let grouped = Tensor::zeros((6, 2, 3, 3), DType::F32, &dev).unwrap();
        let dense = Tensor::zeros((4, 6, 3, 3), DType::F32, &dev).unwrap();
        let pad = ConvPadding::Symmetric(1);
        let on = |w: &Tensor, groups| algorithm(&x, w, pad, 1, groups).unwrap();
        assert_eq!(on(&depthwise, 6), ConvAlgorithm::Depthwise);
        assert_eq!(on(&grouped, 3), ConvAlgorithm::Candle);
        assert_eq!(on(&dense, 1), ConvAlgorithm::Im2col);
        crate::device::with_generic_ops(|| {
            assert_eq!(on(&depthwise, 6), ConvAlgorithm::Depthwise);
            assert_eq!(on(&dense, 1), ConvAlgorithm::Candle);
        });
    }
}
