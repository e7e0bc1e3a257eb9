//! Depthwise convolution (`groups == in == out channels`), forward and backward, on the CPU.
//!
//! candle 0.11 runs a grouped convolution as one convolution per group, chunking and concatenating the
//! tensors: for a depthwise layer that is one tiny im2col + matmul per channel. Here each `(n, c)` plane is
//! one rayon task that slides its `k x k` filter directly; the backward pass computes the input gradient the
//! same way and the filter gradient one task per channel.
//!
//! Each plane is first split into zero-padded phase planes ([`Phases`]), so that every filter tap is one
//! long multiply-add over contiguous memory that the compiler vectorises, whatever the stride. Sliding the
//! filter row by row instead left runs of 4 to 16 values on EfficientNet's late maps, and strided
//! reads for stride 2: scalar loops that were the largest item of its training step's profile.

use super::common::{check_float, dispatch2, impl_forward_only_op2, Epilogue, Geom, Padding2d};
use super::par::par_zeroed_init;
use super::simd::vectorized;
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Depthwise 2-D convolution of `x` `[N, C, H, W]` with `weight` `[C, 1, KH, KW]`, symmetric zero `padding`
/// and `stride`, dilation 1, no bias. Differentiable in both arguments. The kernel runs on the CPU; other
/// devices (see [`crate::device::custom_kernels_on`]) get the same convolution composed from candle ops.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    depthwise_with(x, weight, Padding2d::symmetric(padding), stride, None)
}

/// [`depthwise_conv2d`] with a zero padding of its own per side (TensorFlow's "SAME" padding is
/// asymmetric for stride 2 on even sizes), applied inside the kernel: no padded copy of the input is
/// made, and none of its gradient.
pub fn depthwise_conv2d_padded(
    x: &Tensor,
    weight: &Tensor,
    padding: Padding2d,
    stride: usize,
) -> Result<Tensor> {
    depthwise_with(x, weight, padding, stride, None)
}

/// `clamp(depthwise_conv2d(x, weight) + shift[c], 0, max)` in one op, for inference (no gradient is
/// recorded): the epilogue runs on each output plane while it is still in cache.
pub(super) fn depthwise_conv2d_shift_clamp(
    x: &Tensor,
    weight: &Tensor,
    padding: Padding2d,
    stride: usize,
    epilogue: Epilogue,
) -> Result<Tensor> {
    depthwise_with(x, weight, padding, stride, Some(epilogue))
}

fn depthwise_with(
    x: &Tensor,
    weight: &Tensor,
    pad: Padding2d,
    stride: usize,
    epilogue: Option<Epilogue>,
) -> Result<Tensor> {
    check_float(x, "depthwise_conv2d")?;
    let (_, c, h, w) = x.dims4()?;
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != c || one != 1 {
        return Err(Error::config(
            "depthwise_conv2d weight",
            format!(
                "expected [{c}, 1, k, k] for {c} channels, got {:?}",
                weight.dims()
            ),
        ));
    }
    if stride == 0 || h + pad.top + pad.bottom < kh || w + pad.left + pad.right < kw {
        return Err(Error::config(
            "depthwise_conv2d",
            format!("input {h}x{w} with padding {pad:?} and stride {stride} does not fit a {kh}x{kw} kernel"),
        ));
    }
    if !crate::device::custom_kernels_on(x.device()) {
        let y = depthwise_composed(x, weight, pad, stride)?;
        return Ok(match epilogue {
            None => y,
            Some(e) => e.apply_composed(&y)?,
        });
    }
    let geom = Geom::of(x, weight, 0, stride)?;
    let ph = Phases::new(geom, pad);
    if let Some(e) = &epilogue {
        if e.shift.len() != c {
            return Err(Error::config(
                "depthwise_conv2d shift",
                format!("{} shifts for {c} channels", e.shift.len()),
            ));
        }
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    Ok(match epilogue {
        None => x.apply_op2(&weight, DepthwiseConv(ph, None))?,
        Some(e) => x.apply_op2_no_bwd(&weight, &DepthwiseConv(ph, Some(e)))?,
    })
}

/// The depthwise convolution as a sum of `KH * KW` products, each tap's strided view of the padded input
/// times that tap's weight per channel, in candle ops that every device runs and differentiates (what a GPU
/// uses: candle's grouped conv2d would launch one convolution per channel). The sum runs over the taps in
/// row-major order, so it rounds differently from the CPU kernel, by float rounding only.
fn depthwise_composed(
    x: &Tensor,
    weight: &Tensor,
    pad: Padding2d,
    stride: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let s = stride;
    let (hp, wp) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
    let (oh, ow) = ((hp - kh) / s + 1, (wp - kw) / s + 1);
    // Every tap's view starts at d < k and spans s * out rows (columns): pad the far side up to that, with
    // zeros that no window reads.
    let (bottom, right) = (
        (kh - 1 + s * oh).max(hp) - h - pad.top,
        (kw - 1 + s * ow).max(wp) - w - pad.left,
    );
    let padded = x
        .pad_with_zeros(2, pad.top, bottom)?
        .pad_with_zeros(3, pad.left, right)?;
    let full_w = padded.dim(3)?;
    let mut sum: Option<Tensor> = None;
    for dy in 0..kh {
        let band = padded
            .narrow(2, dy, s * oh)?
            .reshape((n, c, oh, s, full_w))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for dx in 0..kw {
            let view = band
                .narrow(3, dx, s * ow)?
                .reshape((n, c, oh, ow, s))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            let tap = weight
                .narrow(2, dy, 1)?
                .narrow(3, dx, 1)?
                .reshape((1, c, 1, 1))?;
            let term = view.broadcast_mul(&tap)?;
            sum = Some(match sum {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
    }
    Ok(sum.expect("a kernel has at least one tap"))
}

/// One plane's zero-padded input (`pad`, per side) split by stride phase: phase `(py, px)` holds the padded pixels
/// `(y, x)` with `y % stride == py` and `x % stride == px`, at `(y / stride, x / stride)` of a
/// `[HS, WS]` grid. Output pixel `(oy, ox)` then reads, at tap `(ky, kx)`, position
/// `(oy + ky / stride, ox + kx / stride)` of phase `(ky % stride, kx % stride)`: the output's own position
/// in a grid of pitch `WS` plus a constant. So a tap's contribution to the whole plane is one multiply-add
/// over `n = (OH - 1) * WS + OW` consecutive values, into a pitched output whose `WS - OW` columns past
/// each row's end are junk (dropped) or, for the gradients, zero. For stride 1 the one phase is the
/// padded plane itself.
#[derive(Debug, Clone, Copy)]
struct Phases {
    /// The unpadded input's geometry (its `padding` is unused: see `pad`).
    g: Geom,
    pad: Padding2d,
    oh: usize,
    ow: usize,
    hs: usize,
    ws: usize,
    /// Pitched positions each tap covers.
    n: usize,
}

impl Phases {
    fn new(g: Geom, pad: Padding2d) -> Self {
        let (hp, wp) = (g.h + pad.top + pad.bottom, g.w + pad.left + pad.right);
        let (oh, ow) = ((hp - g.kh) / g.stride + 1, (wp - g.kw) / g.stride + 1);
        let (hs, ws) = (hp.div_ceil(g.stride), wp.div_ceil(g.stride));
        Self {
            g,
            pad,
            oh,
            ow,
            hs,
            ws,
            n: (oh - 1) * ws + ow,
        }
    }

    /// A zeroed buffer for the phase planes; [`Phases::split`] only ever writes the pixels' positions,
    /// so the padding stays zero across planes.
    fn scratch<T: WithDType>(&self) -> Vec<T> {
        vec![T::from_f64(0.); self.g.stride * self.g.stride * self.hs * self.ws]
    }

    /// Values of a pitched output plane.
    fn pitched(&self) -> usize {
        self.oh * self.ws
    }

    /// One task's scratch: zeroed phase planes ([`Phases::scratch`]) and a zeroed pitched plane.
    fn scratches<T: WithDType>(&self) -> (Vec<T>, Vec<T>) {
        (self.scratch(), vec![T::from_f64(0.); self.pitched()])
    }

    /// Start of tap `tap`'s run in the phase planes.
    #[inline(always)]
    fn offset(&self, tap: usize) -> usize {
        let s = self.g.stride;
        let (ky, kx) = (tap / self.g.kw, tap % self.g.kw);
        ((ky % s) * s + kx % s) * self.hs * self.ws + (ky / s) * self.ws + kx / s
    }

    /// Index in the phase planes of input pixel `(iy, ix)`.
    #[inline(always)]
    fn place(&self, iy: usize, ix: usize) -> usize {
        let s = self.g.stride;
        let (y, x) = (iy + self.pad.top, ix + self.pad.left);
        ((y % s) * s + x % s) * self.hs * self.ws + (y / s) * self.ws + x / s
    }

    /// `plane` `[H, W]` into the phase planes `q`.
    #[inline(always)]
    fn split<T: WithDType>(&self, plane: &[T], q: &mut [T]) {
        let w = self.g.w;
        if self.g.stride == 1 {
            let (top, left) = (self.pad.top, self.pad.left);
            for (iy, row) in plane.chunks_exact(w).enumerate() {
                q[(iy + top) * self.ws + left..][..w].copy_from_slice(row);
            }
            return;
        }
        for (iy, row) in plane.chunks_exact(w).enumerate() {
            for (ix, &v) in row.iter().enumerate() {
                q[self.place(iy, ix)] = v;
            }
        }
    }

    /// The phase planes `q` back into `plane` `[H, W]` (the padding's positions dropped).
    #[inline(always)]
    fn merge<T: WithDType>(&self, q: &[T], plane: &mut [T]) {
        let w = self.g.w;
        if self.g.stride == 1 {
            let (top, left) = (self.pad.top, self.pad.left);
            for (iy, row) in plane.chunks_exact_mut(w).enumerate() {
                row.copy_from_slice(&q[(iy + top) * self.ws + left..][..w]);
            }
            return;
        }
        for (iy, row) in plane.chunks_exact_mut(w).enumerate() {
            for (ix, v) in row.iter_mut().enumerate() {
                *v = q[self.place(iy, ix)];
            }
        }
    }

    /// `y` `[OH, OW]` into the valid columns of `yp` `[OH, WS]` (the junk columns are left as they
    /// are: zero, written once).
    #[inline(always)]
    fn pitch<T: WithDType>(&self, y: &[T], yp: &mut [T]) {
        for (row, dst) in y.chunks_exact(self.ow).zip(yp.chunks_exact_mut(self.ws)) {
            dst[..self.ow].copy_from_slice(row);
        }
    }

    /// The valid columns of `yp` `[OH, WS]` into `y` `[OH, OW]`.
    #[inline(always)]
    fn unpitch<T: WithDType>(&self, yp: &[T], y: &mut [T]) {
        for (row, src) in y.chunks_exact_mut(self.ow).zip(yp.chunks_exact(self.ws)) {
            row.copy_from_slice(&src[..self.ow]);
        }
    }
}

/// `sum_j a[j] * b[j]`, in eight independent partial sums so that the loop vectorises (a single sum
/// is latency-bound).
#[inline(always)]
fn dot<T: WithDType>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [T::from_f64(0.); 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] += ca[i] * cb[i];
        }
    }
    let tail = n - n % 8;
    let mut acc = T::from_f64(0.);
    for (&x, &y) in a[tail..].iter().zip(&b[tail..]) {
        acc += x * y;
    }
    for v in lanes {
        acc += v;
    }
    acc
}

/// `(input, weight) -> output`, with an optional inference epilogue (then it has no backward).
struct DepthwiseConv(Phases, Option<Epilogue>);

impl DepthwiseConv {
    fn run<T: WithDType>(&self, x: &[T], wt: &[T]) -> (CpuStorage, Shape) {
        let ph = self.0;
        let g = ph.g;
        let (plane_in, plane_out, taps) = (g.h * g.w, ph.oh * ph.ow, g.kh * g.kw);
        let n = x.len() / (g.c * plane_in);
        let out = par_zeroed_init(
            n * g.c * plane_out,
            plane_out,
            || ph.scratches(),
            |(q, yp), p, o: &mut [T]| {
                let xi = &x[p * plane_in..][..plane_in];
                vectorized! {
                    let f = &wt[(p % g.c) * taps..(p % g.c + 1) * taps];
                    ph.split(xi, q);
                    yp.fill(T::from_f64(0.));
                    for (tap, &a) in f.iter().enumerate() {
                        let src = &q[ph.offset(tap)..][..ph.n];
                        for (d, &v) in yp[..ph.n].iter_mut().zip(src) {
                            *d += a * v;
                        }
                    }
                    ph.unpitch(yp, o);
                    if let Some(e) = &self.1 {
                        e.apply(p % g.c, o);
                    }
                }
            },
        );
        (
            T::to_cpu_storage_owned(out),
            Shape::from((n, g.c, ph.oh, ph.ow)),
        )
    }
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "graft-depthwise-conv2d"
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

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the gradients something upstream needs: not the input's when it is the output of a frozen
        // group, not the filter's when it is detached.
        let grad = grad.contiguous()?;
        let gx = match x.track_op() {
            true => Some(grad.apply_op2_no_bwd(weight, &DepthwiseGradInput(self.0))?),
            false => None,
        };
        let gw = match weight.track_op() {
            true => Some(x.apply_op2_no_bwd(&grad, &DepthwiseGradWeight(self.0))?),
            false => None,
        };
        Ok((gx, gw))
    }
}

/// `(grad_output, weight) -> grad_input`: each tap's multiply-add of [`DepthwiseConv`] transposed,
/// from the pitched output gradient (zero in the junk columns) into the phase planes, merged back.
struct DepthwiseGradInput(Phases);

impl DepthwiseGradInput {
    fn run<T: WithDType>(&self, gy: &[T], wt: &[T]) -> (CpuStorage, Shape) {
        let ph = self.0;
        let g = ph.g;
        let (plane_in, plane_out, taps) = (g.h * g.w, ph.oh * ph.ow, g.kh * g.kw);
        let n = gy.len() / (g.c * plane_out);
        let gx = par_zeroed_init(
            n * g.c * plane_in,
            plane_in,
            || ph.scratches(),
            |(gq, gyp), p, gxi: &mut [T]| {
                let gyi = &gy[p * plane_out..][..plane_out];
                vectorized! {
                    let f = &wt[(p % g.c) * taps..(p % g.c + 1) * taps];
                    ph.pitch(gyi, gyp);
                    gq.fill(T::from_f64(0.));
                    for (tap, &a) in f.iter().enumerate() {
                        let dst = &mut gq[ph.offset(tap)..][..ph.n];
                        for (d, &v) in dst.iter_mut().zip(&gyp[..ph.n]) {
                            *d += a * v;
                        }
                    }
                    ph.merge(gq, gxi);
                }
            },
        );
        (T::to_cpu_storage_owned(gx), Shape::from((n, g.c, g.h, g.w)))
    }
}

impl_forward_only_op2!(DepthwiseGradInput, "graft-depthwise-conv2d-grad-input");

/// `(input, grad_output) -> grad_weight`, one task per channel summing over the batch: per tap, the
/// dot product of the pitched output gradient (zero in the junk columns) with the tap's run of the
/// phase planes.
struct DepthwiseGradWeight(Phases);

impl DepthwiseGradWeight {
    fn run<T: WithDType>(&self, x: &[T], gy: &[T]) -> (CpuStorage, Shape) {
        let ph = self.0;
        let g = ph.g;
        let (plane_in, plane_out, taps) = (g.h * g.w, ph.oh * ph.ow, g.kh * g.kw);
        let n = x.len() / (g.c * plane_in);
        let mut gw = vec![T::from_f64(0.); g.c * taps];
        gw.par_chunks_mut(taps).enumerate().for_each_init(
            || ph.scratches(),
            |(q, gyp), (ch, f)| {
                vectorized! {
                    for b in 0..n {
                        let p = b * g.c + ch;
                        ph.split(&x[p * plane_in..(p + 1) * plane_in], q);
                        ph.pitch(&gy[p * plane_out..(p + 1) * plane_out], gyp);
                        for (tap, acc) in f.iter_mut().enumerate() {
                            *acc += dot(&gyp[..ph.n], &q[ph.offset(tap)..][..ph.n]);
                        }
                    }
                }
            },
        );
        (
            T::to_cpu_storage_owned(gw),
            Shape::from((g.c, 1, g.kh, g.kw)),
        )
    }
}

impl_forward_only_op2!(DepthwiseGradWeight, "graft-depthwise-conv2d-grad-weight");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{gradient_gaps, max_abs};
    use crate::kernels::Smooth;
    use candle_core::{Device, Var};

    #[test]
    fn shift_and_clamp_epilogue_matches_the_separate_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 9, 9), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1., (3, 1, 3, 3), &dev).unwrap();
        let conv = depthwise_conv2d(&x, &wt, 1, 2).unwrap();
        let shifted = conv
            .broadcast_add(
                &Tensor::new(&[-0.5f32, 0.0, 0.5], &dev)
                    .unwrap()
                    .reshape((1, 3, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        for max in [None, Some(f64::INFINITY), Some(1.)] {
            let e = Epilogue {
                shift: vec![-0.5, 0.0, 0.5],
                max,
                smooth: None,
            };
            let ours =
                depthwise_conv2d_shift_clamp(&x, &wt, Padding2d::symmetric(1), 2, e).unwrap();
            let theirs = match max {
                None => shifted.clone(),
                Some(m) => shifted.clamp(0f32, m as f32).unwrap(),
            };
            assert_eq!(max_abs(&ours, &theirs), 0.0, "{max:?}");
        }
        for f in [Smooth::Silu, Smooth::HardSwish] {
            let e = Epilogue {
                shift: vec![-0.5, 0.0, 0.5],
                max: None,
                smooth: Some(f),
            };
            let ours =
                depthwise_conv2d_shift_clamp(&x, &wt, Padding2d::symmetric(1), 2, e).unwrap();
            let theirs = f.apply(&shifted).unwrap();
            assert_eq!(max_abs(&ours, &theirs), 0.0, "{f:?}");
        }
    }

    #[test]
    fn forward_and_gradients_match_candle_grouped_conv() {
        let dev = Device::Cpu;
        // (channels, h, w, kernel, padding, stride). Non-square inputs keep both axes at the same
        // conv-transpose output padding: candle 0.11's conv2d backward assumes that.
        let cases = [
            (3, 8, 8, 3, 1, 1),
            (4, 9, 7, 3, 1, 2),
            (2, 10, 10, 5, 2, 2),
            (3, 11, 9, 5, 0, 2),
            (2, 6, 6, 3, 0, 1),
            (2, 7, 7, 5, 2, 1),
        ];
        for (c, h, w, k, p, s) in cases {
            let x = Var::randn(0f64, 1., (2, c, h, w), &dev).unwrap();
            let wt = Var::randn(0f64, 1., (c, 1, k, k), &dev).unwrap();
            let probe = {
                let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
                Tensor::randn(0f64, 1., (2, c, oh, ow), &dev).unwrap()
            };
            let ours = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, c).unwrap();
            let what = format!("c{c} {h}x{w} k{k} p{p} s{s}");
            assert_eq!(ours.dims(), theirs.dims(), "{what}");
            assert!(max_abs(&ours, &theirs) < 1e-12, "forward {what}");
            for gap in gradient_gaps(&ours, &theirs, &probe, &[&x, &wt]) {
                assert!(gap < 1e-12, "gradient {what}");
            }
        }
    }

    /// Padding per side inside the kernel equals padding the input first, forward and gradients.
    #[test]
    fn padding_per_side_matches_padding_the_input_first() {
        let dev = Device::Cpu;
        for (h, w, k, s, pad) in [
            (8, 8, 3, 2, (0, 1, 0, 1)),
            (9, 6, 5, 2, (1, 2, 2, 1)),
            (7, 7, 3, 1, (2, 0, 1, 0)),
        ] {
            let x = Var::randn(0f64, 1., (2, 3, h, w), &dev).unwrap();
            let wt = Var::randn(0f64, 1., (3, 1, k, k), &dev).unwrap();
            let (top, bottom, left, right) = pad;
            let padding = Padding2d {
                top,
                bottom,
                left,
                right,
            };
            let ours = depthwise_conv2d_padded(x.as_tensor(), wt.as_tensor(), padding, s).unwrap();
            let padded = x
                .as_tensor()
                .pad_with_zeros(2, top, bottom)
                .unwrap()
                .pad_with_zeros(3, left, right)
                .unwrap();
            let theirs = depthwise_conv2d(&padded, wt.as_tensor(), 0, s).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{pad:?}");
            assert!(max_abs(&ours, &theirs) < 1e-12, "forward {pad:?}");
            let probe = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
            for gap in gradient_gaps(&ours, &theirs, &probe, &[&x, &wt]) {
                assert!(gap < 1e-12, "gradient {pad:?}");
            }
        }
    }

    #[test]
    fn f32_forward_matches_candle_grouped_conv() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 8, 12, 12), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1., (8, 1, 3, 3), &dev).unwrap();
        let ours = depthwise_conv2d(&x, &wt, 1, 2).unwrap();
        let theirs = x.conv2d(&wt, 1, 2, 1, 8).unwrap();
        let diff = max_abs(
            &ours.to_dtype(candle_core::DType::F64).unwrap(),
            &theirs.to_dtype(candle_core::DType::F64).unwrap(),
        );
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn a_weight_with_the_wrong_shape_is_rejected() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 5, 5), candle_core::DType::F32, &dev).unwrap();
        let wt = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(depthwise_conv2d(&x, &wt, 1, 1).is_err());
    }
}
