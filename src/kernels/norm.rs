//! LayerNorm over any one dimension and softmax over the last, each one CPU op with a hand-written
//! backward.
//!
//! Composed from candle ops, a LayerNorm records seven full-size ops, and its backward reduces the weight
//! and bias gradients over every other axis one element at a time; ConvNeXt also paid two full copies per
//! block to permute NCHW to channels-last and back around it (a ConvNeXt-Atto training step at 224 spent
//! ~14% in candle's reductions and ~35% faulting in the pages of those temporaries). Here a norm reads
//! `x` viewed as `[outer, C, inner]` and normalises over `C` in place of the layout: rows (`inner == 1`:
//! the Vision Transformer's tokens, pooled features) or columns of an NCHW tensor (`LayerNorm2d`, over
//! the channels of each pixel, vectorised across pixels), so nothing is permuted. Statistics accumulate
//! in f64 and are recomputed by the backward (two cheap passes) rather than kept.
//!
//! Both follow PyTorch: biased variance, `y = (x - mean) * rstd * w + b`; `dx = rstd * (g - mean(g) -
//! x̂ * mean(g x̂))` with `g = dy * w`, `dw = Σ dy x̂`, `db = Σ dy`; softmax `y = exp(x - max) / Σ`,
//! `dx = y * (dy - Σ dy y)`.

use super::bn_train::lane_sums;
use super::common::{dispatch1, dispatch2, dispatch3};
use crate::device::custom_kernels_on;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Pixels normalised together in the column layout: their statistics are arrays the loops over
/// channels vectorise across (64 f64 sums, 512 bytes each), and one block's rows stay in L2.
const BLOCK: usize = 64;

/// Rows per parallel task in the row layout.
const ROWS_PER_TASK: usize = 32;

/// LayerNorm of `x` over dimension `dim` with weight and bias `[x.dim(dim)]`, differentiable in all
/// three. On devices without graft's kernels, the same composed of candle ops.
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    dim: usize,
) -> candle_core::Result<Tensor> {
    if !custom_kernels_on(x.device()) {
        return layer_norm_composed(x, w, b, eps, dim);
    }
    let dims = x.dims();
    let c = dims[dim];
    let inner: usize = dims[dim + 1..].iter().product();
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNormOp { eps, c, inner },
    )
}

/// [`layer_norm`] composed of candle ops (other devices, and the tests' reference).
pub fn layer_norm_composed(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    dim: usize,
) -> candle_core::Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[dim] = x.dim(dim)?;
    let mean = x.mean_keepdim(dim)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(dim)?;
    let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(&w.reshape(shape.as_slice())?)?
        .broadcast_add(&b.reshape(shape.as_slice())?)
}

/// Softmax over the last dimension, differentiable. candle's own `softmax_last_dim` has no backward,
/// and its composed `softmax` records four full-size ops (the attention scores of a ViT are its largest
/// tensors).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !custom_kernels_on(x.device()) {
        return candle_nn::ops::softmax(x, candle_core::D::Minus1);
    }
    let c = x.dim(candle_core::D::Minus1)?;
    x.contiguous()?.apply_op1(Softmax { c })
}

/// `x + b` with `b` `[x.dim(dim)]` broadcast over the other dimensions (a convolution's or linear
/// layer's bias), differentiable in both. Its backward reduces the bias gradient over every other axis
/// in one parallel pass (candle's `broadcast_add` reduces it one element at a time: about a fifth of a
/// ConvNeXt-Atto training step).
pub fn add_bias(x: &Tensor, b: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[dim] = x.dim(dim)?;
    if !custom_kernels_on(x.device()) {
        return x.broadcast_add(&b.reshape(shape.as_slice())?);
    }
    let inner: usize = x.dims()[dim + 1..].iter().product();
    x.contiguous()?.apply_op2(
        &b.contiguous()?,
        AddBias {
            c: x.dim(dim)?,
            inner,
        },
    )
}

/// `(x, b) -> x + b` over `x` `[outer, c, inner]`.
struct AddBias {
    c: usize,
    inner: usize,
}

impl AddBias {
    fn run<T: WithDType>(&self, x: &[T], b: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        let (c, inner) = (self.c, self.inner);
        // Rows of `c` (inner 1) or one `[c, inner]` item per task.
        let chunk = if inner == 1 {
            ROWS_PER_TASK * c
        } else {
            c * inner
        };
        let y = super::par::par_zeroed(x.len(), chunk, |i, ys: &mut [T]| {
            let xs = &x[i * chunk..][..ys.len()];
            super::simd::vectorized! {
                if inner == 1 {
                    for (yr, xr) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                        for ((o, &v), &b) in yr.iter_mut().zip(xr).zip(b) {
                            *o = v + b;
                        }
                    }
                } else {
                    for ((yp, xp), &bc) in ys.chunks_exact_mut(inner).zip(xs.chunks_exact(inner)).zip(b) {
                        for (o, &v) in yp.iter_mut().zip(xp) {
                            *o = v + bc;
                        }
                    }
                }
            }
        });
        (T::to_cpu_storage_owned(y), shape.clone())
    }
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "graft-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l2.shape().elem_count() != self.c {
            candle_core::bail!(
                "{}: bias {:?}, {} channels",
                self.name(),
                l2.shape(),
                self.c
            );
        }
        let shape = l1.shape().clone();
        dispatch2!(self, s1, l1, s2, l2, &shape)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let sums = grad.contiguous()?.apply_op1_no_bwd(&ChannelSums {
            c: self.c,
            inner: self.inner,
        })?;
        Ok((Some(grad.clone()), Some(sums.reshape(b.shape())?)))
    }
}

/// `x [outer, c, inner] -> [c]`: the sum over `outer` and `inner` per channel, accumulated in f64.
struct ChannelSums {
    c: usize,
    inner: usize,
}

impl ChannelSums {
    fn run<T: WithDType>(&self, x: &[T]) -> (CpuStorage, Shape) {
        let (c, inner) = (self.c, self.inner);
        let sums: Vec<f64> = if inner == 1 {
            x.par_chunks(ROWS_PER_TASK * c)
                .map(|rows| {
                    let mut s = vec![0f64; c];
                    super::simd::vectorized! {
                        for r in rows.chunks_exact(c) {
                            for (s, v) in s.iter_mut().zip(r) {
                                *s += v.to_f64();
                            }
                        }
                    }
                    s
                })
                .reduce(
                    || vec![0f64; c],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                        a
                    },
                )
        } else {
            (0..c)
                .into_par_iter()
                .map(|ch| {
                    super::simd::vectorized! {
                        x.chunks_exact(c * inner)
                            .map(|item| lanes(&item[ch * inner..][..inner], |v| v.to_f64()))
                            .sum::<f64>()
                    }
                })
                .collect()
        };
        let out: Vec<T> = sums.into_iter().map(T::from_f64).collect();
        (T::to_cpu_storage_owned(out), Shape::from(c))
    }
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "graft-channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch1!(self, s, l,)
    }
}

/// Mean and `1 / sqrt(var + eps)` of one row, in f64.
#[inline(always)]
fn row_stats<T: WithDType>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = lanes(x, |v| v.to_f64()) / n;
    let var = lanes(x, |v| (v.to_f64() - mean).powi(2)) / n;
    (mean, 1. / (var + eps).sqrt())
}

/// `Σ f(v)` over `x` in [`lane_sums`]' interleaved f64 partial sums (so the loop vectorises).
#[inline(always)]
fn lanes<T: Copy>(x: &[T], f: impl Fn(T) -> f64) -> f64 {
    lane_sums(x, x, |v, _| (f(v), 0.)).0
}

/// Means and `1 / sqrt(var + eps)` of the `n <= BLOCK` columns starting at `p0` of one `[C, inner]`
/// item, each over the C channels.
#[inline(always)]
fn column_stats<T: WithDType>(
    x: &[T],
    c: usize,
    inner: usize,
    p0: usize,
    n: usize,
    eps: f64,
) -> ([f64; BLOCK], [f64; BLOCK]) {
    let (mut mean, mut q) = ([0f64; BLOCK], [0f64; BLOCK]);
    for ch in 0..c {
        let row = &x[ch * inner + p0..][..n];
        for (s, v) in mean.iter_mut().zip(row) {
            *s += v.to_f64();
        }
    }
    for m in &mut mean {
        *m /= c as f64;
    }
    for ch in 0..c {
        let row = &x[ch * inner + p0..][..n];
        for ((s, v), m) in q.iter_mut().zip(row).zip(&mean) {
            *s += (v.to_f64() - m).powi(2);
        }
    }
    for s in &mut q {
        *s = 1. / (*s / c as f64 + eps).sqrt();
    }
    (mean, q)
}

/// `(x, w, b) -> y` over `x` `[outer, c, inner]`.
struct LayerNormOp {
    eps: f64,
    c: usize,
    inner: usize,
}

impl LayerNormOp {
    fn run<T: WithDType>(&self, x: &[T], w: &[T], b: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        let (c, inner, eps) = (self.c, self.inner, self.eps);
        let item = c * inner;
        let chunk = if inner == 1 { ROWS_PER_TASK * c } else { item };
        let y = super::par::par_zeroed(x.len(), chunk, |i, ys: &mut [T]| {
            let xs = &x[i * chunk..][..ys.len()];
            super::simd::vectorized! {
                if inner == 1 {
                    for (yr, xr) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                        let (mean, rstd) = row_stats(xr, eps);
                        let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                        for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                            *o = (v - mean) * rstd * w + b;
                        }
                    }
                } else {
                    for p0 in (0..inner).step_by(BLOCK) {
                        let n = BLOCK.min(inner - p0);
                        let (mean, rstd) = column_stats(xs, c, inner, p0, n, eps);
                        let mean: [T; BLOCK] = std::array::from_fn(|j| T::from_f64(mean[j]));
                        let rstd: [T; BLOCK] = std::array::from_fn(|j| T::from_f64(rstd[j]));
                        for ch in 0..c {
                            let (wc, bc) = (w[ch], b[ch]);
                            let xr = &xs[ch * inner + p0..][..n];
                            let yr = &mut ys[ch * inner + p0..][..n];
                            for (((o, &v), &m), &r) in yr.iter_mut().zip(xr).zip(&mean).zip(&rstd) {
                                *o = (v - m) * r * wc + bc;
                            }
                        }
                    }
                }
            }
        });
        (T::to_cpu_storage_owned(y), shape.clone())
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "graft-layer-norm"
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
        if l2.shape().elem_count() != self.c || l3.shape().elem_count() != self.c {
            candle_core::bail!(
                "{}: weight and bias need {} values, got {:?} and {:?}",
                self.name(),
                self.c,
                l2.shape(),
                l3.shape()
            );
        }
        let shape = l1.shape().clone();
        dispatch3!(self, s1, l1, s2, l2, s3, l3, &shape)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = LayerNormGrad {
            eps: self.eps,
            c: self.c,
            inner: self.inner,
            partials: std::sync::Mutex::new(Vec::new()),
        };
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, w, &op)?;
        // Added in chunk order, so that the result does not depend on which task finished first.
        let mut partials = op.partials.into_inner().expect("no task panicked");
        partials.sort_by_key(|p| p.0);
        let mut sums = vec![0f64; 2 * self.c];
        for (_, p) in &partials {
            sums.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        let as_w = |v: &[f64]| Tensor::from_slice(v, w.shape(), w.device())?.to_dtype(w.dtype());
        let (dw, db) = sums.split_at(self.c);
        Ok((Some(dx), Some(as_w(dw)?), Some(as_w(db)?)))
    }
}

/// `(x, dy, w) -> dx`, leaving each chunk's terms of the weight and bias gradients (`Σ dy x̂`, `Σ dy`)
/// in `partials` (one sweep for all three).
struct LayerNormGrad {
    eps: f64,
    c: usize,
    inner: usize,
    partials: std::sync::Mutex<Vec<(usize, Vec<f64>)>>,
}

impl LayerNormGrad {
    fn run<T: WithDType>(&self, x: &[T], dy: &[T], w: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        let (c, inner, eps) = (self.c, self.inner, self.eps);
        let chunk = if inner == 1 {
            ROWS_PER_TASK * c
        } else {
            c * inner
        };
        let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
        let dx = super::par::par_zeroed(x.len(), chunk, |i, dxs: &mut [T]| {
            let xs = &x[i * chunk..][..dxs.len()];
            let gs = &dy[i * chunk..][..dxs.len()];
            let mut sums = vec![0f64; 2 * c];
            super::simd::vectorized! {
                let (dw, db) = sums.split_at_mut(c);
                if inner == 1 {
                    for ((dxr, xr), gr) in dxs.chunks_exact_mut(c).zip(xs.chunks_exact(c)).zip(gs.chunks_exact(c)) {
                        row_grad(xr, gr, &wf, eps, dxr, dw, db);
                    }
                } else {
                    for p0 in (0..inner).step_by(BLOCK) {
                        let n = BLOCK.min(inner - p0);
                        column_grad(xs, gs, &wf, (c, inner, p0, n), eps, dxs, dw, db);
                    }
                }
            }
            self.partials
                .lock()
                .expect("no task panicked")
                .push((i, sums));
        });
        (T::to_cpu_storage_owned(dx), shape.clone())
    }
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "graft-layer-norm-grad"
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
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: {:?} vs {:?}", self.name(), l1.shape(), l2.shape());
        }
        let shape = l1.shape().clone();
        dispatch3!(self, s1, l1, s2, l2, s3, l3, &shape)
    }
}

/// One row's input gradient, and its terms of the weight and bias gradients.
#[inline(always)]
fn row_grad<T: WithDType>(
    x: &[T],
    dy: &[T],
    w: &[f64],
    eps: f64,
    dx: &mut [T],
    dw: &mut [f64],
    db: &mut [f64],
) {
    let c = x.len() as f64;
    let (mean, rstd) = row_stats(x, eps);
    let (mut sg, mut sgx) = ([0f64; 8], [0f64; 8]);
    for (j, (((&v, &g), &wc), (dwc, dbc))) in x
        .iter()
        .zip(dy)
        .zip(w)
        .zip(dw.iter_mut().zip(db.iter_mut()))
        .enumerate()
    {
        let (xh, g) = ((v.to_f64() - mean) * rstd, g.to_f64());
        *dwc += g * xh;
        *dbc += g;
        sg[j % 8] += g * wc;
        sgx[j % 8] += g * wc * xh;
    }
    let (mg, mgx) = (sg.iter().sum::<f64>() / c, sgx.iter().sum::<f64>() / c);
    for (((o, &v), &g), &wc) in dx.iter_mut().zip(x).zip(dy).zip(w) {
        let xh = (v.to_f64() - mean) * rstd;
        *o = T::from_f64(rstd * (g.to_f64() * wc - mg - xh * mgx));
    }
}

/// The input gradient of `n <= BLOCK` columns from `p0` of one `[C, inner]` item, and their terms of
/// the weight and bias gradients.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn column_grad<T: WithDType>(
    x: &[T],
    dy: &[T],
    w: &[f64],
    (c, inner, p0, n): (usize, usize, usize, usize),
    eps: f64,
    dx: &mut [T],
    dw: &mut [f64],
    db: &mut [f64],
) {
    let (mean, rstd) = column_stats(x, c, inner, p0, n, eps);
    let (mut sg, mut sgx) = ([0f64; BLOCK], [0f64; BLOCK]);
    for ch in 0..c {
        let (xr, gr) = (&x[ch * inner + p0..][..n], &dy[ch * inner + p0..][..n]);
        let wc = w[ch];
        let (mut dwl, mut dbl) = ([0f64; BLOCK], [0f64; BLOCK]);
        for j in 0..n {
            let xh = (xr[j].to_f64() - mean[j]) * rstd[j];
            let g = gr[j].to_f64();
            dwl[j] = g * xh;
            dbl[j] = g;
            sg[j] += g * wc;
            sgx[j] += g * wc * xh;
        }
        let (sw, sb) = lane_sums(&dwl[..n], &dbl[..n], |a, b| (a, b));
        dw[ch] += sw;
        db[ch] += sb;
    }
    let cf = c as f64;
    for ch in 0..c {
        let (xr, gr) = (&x[ch * inner + p0..][..n], &dy[ch * inner + p0..][..n]);
        let dr = &mut dx[ch * inner + p0..][..n];
        let wc = w[ch];
        for j in 0..n {
            let xh = (xr[j].to_f64() - mean[j]) * rstd[j];
            dr[j] = T::from_f64(rstd[j] * (gr[j].to_f64() * wc - sg[j] / cf - xh * sgx[j] / cf));
        }
    }
}

/// `x -> softmax(x)` over rows of `c`.
struct Softmax {
    c: usize,
}

impl Softmax {
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        let c = self.c;
        let chunk = ROWS_PER_TASK * c;
        let y = super::par::par_zeroed(x.len(), chunk, |i, ys: &mut [T]| {
            let xs = &x[i * chunk..][..ys.len()];
            super::simd::vectorized! {
                for (yr, xr) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                    softmax_row(xr, yr);
                }
            }
        });
        (T::to_cpu_storage_owned(y), shape.clone())
    }
}

/// One row's softmax: f32 rows through [`super::activation::exp_f32`] (vectorised), f64 exactly.
#[inline(always)]
fn softmax_row<T: WithDType>(x: &[T], y: &mut [T]) {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()));
    if T::DTYPE == candle_core::DType::F64 {
        for (o, v) in y.iter_mut().zip(x) {
            *o = T::from_f64((v.to_f64() - max).exp());
        }
    } else {
        let m = max as f32;
        for (o, v) in y.iter_mut().zip(x) {
            *o = T::from_f64(super::activation::exp_f32(v.to_f64() as f32 - m) as f64);
        }
    }
    let inv = T::from_f64(1. / lanes(y, |v| v.to_f64()));
    for o in y.iter_mut() {
        let v = *o;
        *o = v * inv;
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "graft-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l.shape().clone();
        dispatch1!(self, s, l, &shape)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(y, &SoftmaxGrad { c: self.c })?,
        ))
    }
}

/// `(dy, y) -> y * (dy - Σ dy y)` per row.
struct SoftmaxGrad {
    c: usize,
}

impl SoftmaxGrad {
    fn run<T: WithDType>(&self, dy: &[T], y: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        let c = self.c;
        let chunk = ROWS_PER_TASK * c;
        let dx = super::par::par_zeroed(y.len(), chunk, |i, out: &mut [T]| {
            let (ys, gs) = (&y[i * chunk..][..out.len()], &dy[i * chunk..][..out.len()]);
            super::simd::vectorized! {
                for ((o, yr), gr) in out.chunks_exact_mut(c).zip(ys.chunks_exact(c)).zip(gs.chunks_exact(c)) {
                    let mut s = [0f64; 8];
                    for (j, (&a, &b)) in yr.iter().zip(gr).enumerate() {
                        s[j % 8] += a.to_f64() * b.to_f64();
                    }
                    let dot = T::from_f64(s.iter().sum());
                    for ((o, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                        *o = a * (b - dot);
                    }
                }
            }
        });
        (T::to_cpu_storage_owned(dx), shape.clone())
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "graft-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: {:?} vs {:?}", self.name(), l1.shape(), l2.shape());
        }
        let shape = l2.shape().clone();
        dispatch2!(self, s1, l1, s2, l2, &shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{gradient_gaps, max_abs};
    use candle_core::{DType, Device, Var};

    fn var(shape: &[usize], seed: u64, dtype: DType) -> Var {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 250.) - 2.)
            .collect();
        Var::from_tensor(
            &Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    }

    /// Both layouts (rows; NCHW columns with a partial last block), f64 (exact) and f32.
    #[test]
    fn layer_norm_matches_the_composed_ops_and_their_gradients() {
        for (shape, dim) in [
            (vec![3, 5, 40], 2),
            (vec![2, 24, 9, 11], 1),
            (vec![2, 7, 70], 1),
        ] {
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
                let x = var(&shape, 1, dtype);
                let w = var(&[shape[dim]], 2, dtype);
                let b = var(&[shape[dim]], 3, dtype);
                let ours = layer_norm(x.as_tensor(), &w, &b, 1e-6, dim).unwrap();
                let theirs = layer_norm_composed(x.as_tensor(), &w, &b, 1e-6, dim).unwrap();
                assert!(max_abs(&ours, &theirs) < tol, "{shape:?} {dtype:?}");
                let probe = var(&shape, 4, dtype);
                let gaps = gradient_gaps(&ours, &theirs, &probe, &[&x, &w, &b]);
                for g in gaps {
                    assert!(g < tol * 50., "{shape:?} {dtype:?}: gradient gap {g}");
                }
            }
        }
    }

    #[test]
    fn add_bias_matches_broadcast_add_and_its_gradients() {
        for (shape, dim) in [(vec![3, 5, 40], 2), (vec![2, 24, 9, 11], 1)] {
            let x = var(&shape, 7, DType::F64);
            let b = var(&[shape[dim]], 8, DType::F64);
            let mut bshape = vec![1; shape.len()];
            bshape[dim] = shape[dim];
            let ours = add_bias(x.as_tensor(), &b, dim).unwrap();
            let theirs = x.broadcast_add(&b.reshape(bshape).unwrap()).unwrap();
            assert!(max_abs(&ours, &theirs) < 1e-14);
            let probe = var(&shape, 9, DType::F64);
            for g in gradient_gaps(&ours, &theirs, &probe, &[&x, &b]) {
                assert!(g < 1e-12, "{shape:?}: {g}");
            }
        }
    }

    #[test]
    fn softmax_matches_candle_and_its_gradient() {
        for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
            let x = var(&[4, 3, 37], 5, dtype);
            let ours = softmax_last_dim(x.as_tensor()).unwrap();
            let theirs = candle_nn::ops::softmax(x.as_tensor(), candle_core::D::Minus1).unwrap();
            assert!(max_abs(&ours, &theirs) < tol, "{dtype:?}");
            let probe = var(&[4, 3, 37], 6, dtype);
            let gaps = gradient_gaps(&ours, &theirs, &probe, &[&x]);
            assert!(gaps[0] < tol * 10., "{dtype:?}: {gaps:?}");
        }
    }
}
