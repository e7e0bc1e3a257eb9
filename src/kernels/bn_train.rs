//! Training-mode BatchNorm as one CPU op with a hand-written backward.
//!
//! Composed from candle ops, a training BatchNorm records about ten full-size ops whose backward reduces
//! over axes 0 and 2 of `[N, C, S]` at once, which candle does one element at a time; the backward then
//! costs ten times the forward. Here the forward is one pass for the statistics and one for the output,
//! and the backward one pass for the two per-channel sums and one for the input gradient, all parallel
//! over channels or planes. Sums accumulate in f64, as PyTorch's CPU kernel does for f32.

use super::common::{dispatch1, dispatch2, dispatch3};
use super::par::par_zeroed;
use super::simd::vectorized;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Arc;

/// Batch statistics of `x` `[N, C, S]` (contiguous, CPU): per-channel mean and biased variance, in f64.
pub(crate) fn batch_stats(x: &Tensor) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    let (_, c, _) = x.dims3()?;
    let stats = x.apply_op1_no_bwd(&BnStats)?.to_vec2::<f64>()?;
    debug_assert_eq!(stats[0].len(), c);
    Ok((stats[0].clone(), stats[1].clone()))
}

/// `y = (x - mean) / sqrt(var + eps) * w + b` over `x` `[N, C, S]` with the given batch statistics
/// (computed as PyTorch's CPU kernel does: `x * alpha + beta`, in the tensor's type), then clamped to
/// `[0, clamp]` when `clamp` is given (ReLU: infinity, ReLU6: 6); differentiable in `x`, `w` and `b`
/// (the statistics' dependence on `x` included). The clamp's backward recomputes the pre-clamp value
/// from `x` (the same expression, so the same bits) and passes the gradient where it lies strictly
/// inside `(0, clamp)`, PyTorch's rule for ReLU and hardtanh.
pub(crate) fn batch_norm_train(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    mean: Vec<f64>,
    var: Vec<f64>,
    eps: f64,
    clamp: Option<f64>,
) -> candle_core::Result<Tensor> {
    let invstd = var.iter().map(|v| 1. / (v + eps).sqrt()).collect();
    let op = BnTrain {
        mean: Arc::new(mean),
        invstd: Arc::new(invstd),
        clamp,
    };
    x.apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// The planes of channel `ch` in a contiguous `[N, C, S]` buffer, image by image. (An iterator, not a
/// callback: a closure called per plane was left out of line by LLVM, outside [`vectorized!`]'s reach.)
#[inline(always)]
fn channel_planes<T>(x: &[T], c: usize, s: usize, ch: usize) -> impl Iterator<Item = &[T]> {
    x.chunks_exact(c * s)
        .map(move |img| &img[ch * s..(ch + 1) * s])
}

/// Lanes of [`lane_sums`]: independent f64 accumulators, so the compiler can vectorise a sum that
/// would otherwise wait on one accumulator's latency for every value (the BatchNorm reductions were
/// about a sixth of an EfficientNet-Lite0 training step).
const LANES: usize = 8;

/// `(sum f(a, b).0, sum f(a, b).1)` over the pairs of `a` and `b`, in [`LANES`] interleaved f64 partial
/// sums added at the end. The order differs from a sequential sum only in f64 rounding, which is far
/// below the f32 values summed.
#[inline(always)]
pub(super) fn lane_sums<A: Copy, B: Copy>(
    a: &[A],
    b: &[B],
    f: impl Fn(A, B) -> (f64, f64),
) -> (f64, f64) {
    let (mut s0, mut s1) = ([0f64; LANES], [0f64; LANES]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for j in 0..LANES {
            let (u, v) = f(xa[j], xb[j]);
            s0[j] += u;
            s1[j] += v;
        }
    }
    for (&x, &y) in ra.iter().zip(rb) {
        let (u, v) = f(x, y);
        s0[0] += u;
        s1[0] += v;
    }
    (s0.iter().sum(), s1.iter().sum())
}

fn dims3(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    l.shape().dims3()
}

/// `x [N, C, S] -> [2, C]` f64: mean and biased variance per channel (two passes).
struct BnStats;

impl BnStats {
    fn run<T: WithDType>(&self, x: &[T], (_, c, s): (usize, usize, usize)) -> (CpuStorage, Shape) {
        let count = (x.len() / c) as f64;
        let stats: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                vectorized! {
                    let mut sum = 0f64;
                    for p in channel_planes(x, c, s, ch) {
                        sum += lane_sums(p, p, |v, _| (v.to_f64(), 0.)).0;
                    }
                    let mean = sum / count;
                    let mut sq = 0f64;
                    for p in channel_planes(x, c, s, ch) {
                        sq += lane_sums(p, p, |v, _| ((v.to_f64() - mean).powi(2), 0.)).0;
                    }
                    (mean, sq / count)
                }
            })
            .collect();
        let mut out: Vec<f64> = stats.iter().map(|m| m.0).collect();
        out.extend(stats.iter().map(|m| m.1));
        (CpuStorage::F64(out), Shape::from((2, c)))
    }
}

impl CustomOp1 for BnStats {
    fn name(&self) -> &'static str {
        "graft-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims3(l)?;
        dispatch1!(self, s, l, d)
    }
}

/// `(x, w, b) -> y`, holding the batch statistics it normalises with.
struct BnTrain {
    mean: Arc<Vec<f64>>,
    invstd: Arc<Vec<f64>>,
    clamp: Option<f64>,
}

/// PyTorch's `alpha`, `beta` of channel `ch` in the tensor's type: `y = x * alpha + beta`.
#[inline]
fn affine<T: WithDType>(mean: f64, invstd: f64, w: T, b: T) -> (T, T) {
    let alpha = T::from_f64(invstd) * w;
    (alpha, b - T::from_f64(mean) * alpha)
}

impl BnTrain {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        b: &[T],
        c: usize,
        s: usize,
    ) -> (CpuStorage, Shape) {
        let y = par_zeroed(x.len(), s, |p, yp: &mut [T]| {
            let xp = &x[p * s..][..s];
            // PyTorch's CPU kernel: statistics rounded to the tensor's type, then
            // `y = x * alpha + beta` with `alpha = invstd * w`, `beta = b - mean * alpha`.
            let ch = p % c;
            let (alpha, beta) = affine(self.mean[ch], self.invstd[ch], w[ch], b[ch]);
            vectorized! {
                match self.clamp {
                    None => {
                        for (o, &v) in yp.iter_mut().zip(xp) {
                            *o = v * alpha + beta;
                        }
                    }
                    Some(max) => {
                        let (zero, max) = (T::from_f64(0.), T::from_f64(max));
                        for (o, &v) in yp.iter_mut().zip(xp) {
                            let z = v * alpha + beta;
                            *o = if z > zero {
                                if z < max {
                                    z
                                } else {
                                    max
                                }
                            } else {
                                zero
                            };
                        }
                    }
                }
            }
        });
        let n = x.len() / (c * s);
        (T::to_cpu_storage_owned(y), Shape::from((n, c, s)))
    }
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "graft-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, s) = dims3(l1)?;
        dispatch3!(self, s1, l1, s2, l2, s3, l3, c, s)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>();
        let (wv, bv) = (Arc::new(f64s(w)?), Arc::new(f64s(b)?));
        let mask = self.clamp.map(|max| Mask {
            w: wv.clone(),
            b: bv,
            max,
        });
        let stats = BnGradSums {
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
            mask: mask.clone(),
        };
        let sums = x.apply_op2_no_bwd(&grad, &stats)?.to_vec2::<f64>()?;
        let (sum_dy, sum_dy_xhat) = (sums[0].clone(), sums[1].clone());
        let c = sum_dy.len();
        let db = Tensor::from_vec(sum_dy.clone(), c, x.device())?.to_dtype(w.dtype())?;
        let dw = Tensor::from_vec(sum_dy_xhat.clone(), c, x.device())?.to_dtype(w.dtype())?;
        let gx = BnGradInput {
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
            w: wv,
            sum_dy,
            sum_dy_xhat,
            mask,
        };
        let dx = x.apply_op2_no_bwd(&grad, &gx)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The clamp of a fused BatchNorm + activation, for its backward: the affine parameters (exact in f64)
/// to recompute each pre-clamp value, and the clamp's upper bound.
#[derive(Clone)]
struct Mask {
    w: Arc<Vec<f64>>,
    b: Arc<Vec<f64>>,
    max: f64,
}

impl Mask {
    /// `dy` with the clamp's gradient mask of channel `ch` applied, as f64 values.
    ///
    /// One branch-free expression for both cases, so that the callers' loops vectorise (a `match` on
    /// the mask per value kept them scalar: about a tenth of an EfficientNet-Lite0 training step).
    /// Without a mask the pre-clamp value is taken as `x * 0 + 1`, which always passes; it differs
    /// only for an infinite or NaN `x`, whose channel's sums, and so every input gradient of the
    /// channel, are NaN either way.
    #[inline]
    fn apply<'a, T: WithDType>(
        mask: &'a Option<Mask>,
        bn: (&'a [f64], &'a [f64]),
        ch: usize,
    ) -> impl Fn(T, T) -> f64 + 'a {
        let (a, b, max) = match mask {
            Some(m) => {
                let (a, b) = affine(
                    bn.0[ch],
                    bn.1[ch],
                    T::from_f64(m.w[ch]),
                    T::from_f64(m.b[ch]),
                );
                (a, b, T::from_f64(m.max))
            }
            None => (T::zero(), T::one(), T::from_f64(f64::INFINITY)),
        };
        let zero = T::zero();
        move |xv: T, g: T| {
            let z = xv * a + b;
            if z > zero && z < max {
                g.to_f64()
            } else {
                0.
            }
        }
    }
}

/// `(x, dy) -> [2, C]` f64: per channel `sum(dy)` and `sum(dy * xhat)` (`dy` masked by the fused
/// activation's gradient, if any).
struct BnGradSums {
    mean: Arc<Vec<f64>>,
    invstd: Arc<Vec<f64>>,
    mask: Option<Mask>,
}

impl BnGradSums {
    fn run<T: WithDType>(&self, x: &[T], dy: &[T], c: usize, s: usize) -> (CpuStorage, Shape) {
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, invstd) = (self.mean[ch], self.invstd[ch]);
                let masked = Mask::apply::<T>(&self.mask, (&self.mean, &self.invstd), ch);
                let (mut a, mut b) = (0f64, 0f64);
                vectorized! {
                    for (xp, gp) in channel_planes(x, c, s, ch).zip(channel_planes(dy, c, s, ch)) {
                        let (da, db) = lane_sums(xp, gp, |xv, g| {
                            let g = masked(xv, g);
                            (g, g * (xv.to_f64() - mean))
                        });
                        a += da;
                        b += db;
                    }
                }
                (a, b * invstd)
            })
            .collect();
        let mut out: Vec<f64> = sums.iter().map(|v| v.0).collect();
        out.extend(sums.iter().map(|v| v.1));
        (CpuStorage::F64(out), Shape::from((2, c)))
    }
}

/// `(x, dy) -> dx = w * invstd * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)`.
struct BnGradInput {
    mean: Arc<Vec<f64>>,
    invstd: Arc<Vec<f64>>,
    w: Arc<Vec<f64>>,
    sum_dy: Vec<f64>,
    sum_dy_xhat: Vec<f64>,
    mask: Option<Mask>,
}

impl BnGradInput {
    fn run<T: WithDType>(&self, x: &[T], dy: &[T], c: usize, s: usize) -> (CpuStorage, Shape) {
        let m = (x.len() / c) as f64;
        let dx = par_zeroed(x.len(), s, |p, dxp: &mut [T]| {
            let (xp, gp) = (&x[p * s..][..s], &dy[p * s..][..s]);
            let ch = p % c;
            let (mean, invstd) = (self.mean[ch], self.invstd[ch]);
            let k = self.w[ch] * invstd;
            let (mdy, mdyx) = (self.sum_dy[ch] / m, self.sum_dy_xhat[ch] / m);
            let masked = Mask::apply::<T>(&self.mask, (&self.mean, &self.invstd), ch);
            vectorized! {
                for ((o, xv), g) in dxp.iter_mut().zip(xp).zip(gp) {
                    let xhat = (xv.to_f64() - mean) * invstd;
                    *o = T::from_f64(k * (masked(*xv, *g) - mdy - xhat * mdyx));
                }
            }
        });
        let n = x.len() / (c * s);
        (T::to_cpu_storage_owned(dx), Shape::from((n, c, s)))
    }
}

/// `impl CustomOp2` for a gradient op over `[N, C, S]` buffers: `run(x1, x2, c, s)`.
macro_rules! impl_op2 {
    ($ty:ty, $name:literal) => {
        impl CustomOp2 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                let (_, c, s) = dims3(l1)?;
                dispatch2!(self, s1, l1, s2, l2, c, s)
            }
        }
    };
}

impl_op2!(BnGradSums, "graft-batch-norm-grad-sums");
impl_op2!(BnGradInput, "graft-batch-norm-grad-input");
