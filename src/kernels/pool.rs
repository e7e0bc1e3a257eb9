//! Max-pooling with padding and overlapping windows, forward and backward.
//!
//! candle 0.11's `max_pool2d` has no padding and no backward when the stride differs from the kernel (the
//! ResNet stem is 3x3, stride 2, padding 1). This is a CPU custom op, one rayon task per `(n, c)` plane.
//! It follows PyTorch exactly, ties included: padding never wins, and each output takes the *first* maximum
//! of its window in row-major order, which is the only input that receives its gradient. (Ties are common:
//! the stem pools a ReLU output, whose windows are often all zero.)

use super::common::{check_float, dispatch1, dispatch3};
use super::par::{par_zeroed, par_zeroed_init};
use super::simd::vectorized;
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, WithDType};

/// Max-pools `x` `[N, C, H, W]` with a square `kernel`, `stride` and implicit `-inf` `padding`
/// (floor output size, like PyTorch's `ceil_mode=False`). Differentiable; CPU only.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    check_float(x, "max_pool2d")?;
    let (_, _, h, w) = x.dims4()?;
    let geom = PoolGeom {
        kernel,
        stride,
        padding,
        h,
        w,
    };
    geom.validate()?;
    if !crate::device::custom_kernels_on(x.device()) {
        return max_pool2d_composed(x, kernel, stride, padding);
    }
    Ok(x.contiguous()?.apply_op1(MaxPool2d(geom))?)
}

/// The same max-pool composed from differentiable candle ops, for devices without the CPU kernel: pad with
/// `-inf`, stack the `kernel * kernel` shifted strided views on a new last axis in row-major window order,
/// and gather each window's `argmax` (candle's argmax keeps the first maximum, like PyTorch). Gather routes
/// the gradient to that one input, so ties behave as in [`max_pool2d`]. It is several times slower and
/// builds `kernel^2` copies of the output, so the CPU path never uses it.
pub fn max_pool2d_composed(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    check_float(x, "max_pool2d")?;
    let (n, c, h, w) = x.dims4()?;
    let geom = PoolGeom {
        kernel,
        stride,
        padding,
        h,
        w,
    };
    geom.validate()?;
    let (oh, ow) = geom.out_hw();
    let (k, s, p) = (kernel, stride, padding);
    // Every view starts at offset d < k and spans s * out rows: pad the far side up to k - 1 + s * out.
    let (ph, pw) = ((k - 1 + s * oh).max(h + p), (k - 1 + s * ow).max(w + p));
    let neg_inf = |hh: usize, ww: usize| -> Result<Tensor> {
        Ok(Tensor::full(f32::NEG_INFINITY, (n, c, hh, ww), x.device())?.to_dtype(x.dtype())?)
    };
    let mut rows = vec![];
    if p > 0 {
        rows.push(neg_inf(p, w)?);
    }
    rows.push(x.clone());
    if ph > h + p {
        rows.push(neg_inf(ph - h - p, w)?);
    }
    let tall = Tensor::cat(&rows, 2)?;
    let mut cols = vec![];
    if p > 0 {
        cols.push(neg_inf(ph, p)?);
    }
    cols.push(tall);
    if pw > w + p {
        cols.push(neg_inf(ph, pw - w - p)?);
    }
    let padded = Tensor::cat(&cols, 3)?;
    let mut views = Vec::with_capacity(k * k);
    for dy in 0..k {
        let band = padded
            .narrow(2, dy, s * oh)?
            .reshape((n, c, oh, s, pw))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for dx in 0..k {
            let v = band
                .narrow(3, dx, s * ow)?
                .reshape((n, c, oh, ow, s))?
                .narrow(4, 0, 1)?;
            views.push(v);
        }
    }
    let stacked = Tensor::cat(&views, 4)?;
    let idx = stacked.detach().argmax_keepdim(4)?;
    Ok(stacked.gather(&idx, 4)?.squeeze(4)?)
}

#[derive(Debug, Clone, Copy)]
struct PoolGeom {
    kernel: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
}

impl PoolGeom {
    fn validate(&self) -> Result<()> {
        if self.kernel == 0 || self.stride == 0 {
            return Err(Error::config(
                "max_pool2d",
                "kernel and stride must be positive",
            ));
        }
        if 2 * self.padding > self.kernel {
            return Err(Error::config(
                "max_pool2d padding",
                format!(
                    "padding {} exceeds half the kernel {}",
                    self.padding, self.kernel
                ),
            ));
        }
        if self.h + 2 * self.padding < self.kernel || self.w + 2 * self.padding < self.kernel {
            return Err(Error::config(
                "max_pool2d input",
                format!(
                    "{}x{} (padded by {}) is smaller than the kernel {}",
                    self.h, self.w, self.padding, self.kernel
                ),
            ));
        }
        Ok(())
    }

    fn out_hw(&self) -> (usize, usize) {
        let o = |i: usize| (i + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    /// The input rows (or columns, with `size` the width) that output row (column) `o`'s window covers,
    /// the padding left out.
    #[inline]
    fn span(&self, o: usize, size: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.padding as isize;
        start.max(0) as usize..((start + self.kernel as isize) as usize).min(size)
    }

    /// Every window's maximum of a plane without NaN into `out` `[OH, OW]`: per output row, the
    /// elementwise maximum of the window's input rows (a loop over whole rows, which vectorises), then
    /// the maximum of each window's columns of it. The value equals the first maximum's
    /// ([`PoolGeom::argmax`]), up to the sign of a zero that ties with another.
    fn window_maxima<T: WithDType>(&self, plane: &[T], out: &mut [T]) {
        let (oh, ow) = self.out_hw();
        let mut rows = vec![T::from_f64(0.); self.w];
        for (oy, o) in out.chunks_exact_mut(ow).enumerate().take(oh) {
            let ys = self.span(oy, self.h);
            rows.copy_from_slice(&plane[ys.start * self.w..(ys.start + 1) * self.w]);
            for y in ys.start + 1..ys.end {
                for (m, &v) in rows.iter_mut().zip(&plane[y * self.w..(y + 1) * self.w]) {
                    *m = if v > *m { v } else { *m };
                }
            }
            for (ox, dst) in o.iter_mut().enumerate() {
                let xs = self.span(ox, self.w);
                let mut best = rows[xs.start];
                for &v in &rows[xs.start + 1..xs.end] {
                    best = if v > best { v } else { best };
                }
                *dst = best;
            }
        }
    }

    /// The plane's columns split by their phase modulo the stride: `phases[(r * h + y) * pw + j]` is
    /// `plane[y * w + r + stride * j]`, `pw = ceil(w / stride)`; so a filter tap's inputs for
    /// consecutive outputs of a row are consecutive values (see [`PoolGeom::first_equals`]).
    fn column_phases<T: WithDType>(&self, plane: &[T], phases: &mut Vec<T>) {
        let (s, pw) = (self.stride, self.w.div_ceil(self.stride));
        phases.resize(s * self.h * pw, T::zero());
        for (y, row) in plane.chunks_exact(self.w).enumerate() {
            for (x, &v) in row.iter().enumerate() {
                phases[((x % s) * self.h + y) * pw + x / s] = v;
            }
        }
    }

    /// For every output of row `oy`, the row-major index inside the plane of the first input of its
    /// window equal to `y[ox]`, the window's maximum (a NaN matches a NaN), into `first` (`usize::MAX`
    /// where none matches, which the forward's own output never gives): where [`PoolGeom::argmax`]
    /// would find the first maximum, without its comparisons. Read from the plane's
    /// [`PoolGeom::column_phases`]. The windows are scanned tap by tap in reverse row-major order, each
    /// tap a branch-free select across the row's outputs over consecutive values (which vectorises), so
    /// the last match written is the first in row-major order. Scanning window by window and returning
    /// at the first match cost a mispredicted branch per output (where the maximum sits in its window
    /// is random): ResNet-18's max-pool backward at 224 took about 50 ms per step.
    #[inline(always)]
    fn first_equals<T: WithDType>(&self, phases: &[T], oy: usize, y: &[T], first: &mut [usize]) {
        let (s, pw) = (self.stride, self.w.div_ceil(self.stride));
        first.fill(usize::MAX);
        for iy in self.span(oy, self.h).rev() {
            for kx in (0..self.kernel).rev() {
                // The outputs whose tap `kx` lands inside the row: `0 <= ox * s + kx - p < w`.
                let lo = self.padding.saturating_sub(kx).div_ceil(s);
                let hi = (self.w + self.padding)
                    .saturating_sub(kx)
                    .div_ceil(s)
                    .min(y.len());
                if lo >= hi {
                    continue;
                }
                let ix0 = lo * s + kx - self.padding;
                let src = &phases[((ix0 % s) * self.h + iy) * pw + ix0 / s..][..hi - lo];
                let at0 = iy * self.w + ix0;
                for (i, ((f, &v), &m)) in first[lo..hi]
                    .iter_mut()
                    .zip(src)
                    .zip(&y[lo..hi])
                    .enumerate()
                {
                    #[allow(clippy::eq_op)]
                    let hit = (v == m) | ((m != m) & (v != v)); // `|`, `&`: no branch
                    *f = if hit { at0 + i * s } else { *f };
                }
            }
        }
    }

    /// Row-major index inside the plane of the first maximum of output `(oy, ox)`'s window.
    #[inline]
    fn argmax<T: WithDType>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        let (ys, xs) = (self.span(oy, self.h), self.span(ox, self.w));
        let mut best = ys.start * self.w + xs.start;
        let mut best_v = plane[best];
        for y in ys {
            let row = &plane[y * self.w..(y + 1) * self.w];
            for (x, &v) in row.iter().enumerate().take(xs.end).skip(xs.start) {
                // `v != v` is NaN: PyTorch propagates NaN, so a NaN wins like a new maximum.
                #[allow(clippy::eq_op)]
                if v > best_v || v != v {
                    best_v = v;
                    best = y * self.w + x;
                }
            }
        }
        best
    }
}

struct MaxPool2d(PoolGeom);

impl MaxPool2d {
    fn run<T: WithDType>(&self, x: &[T], n: usize, c: usize) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (pin, pout) = (g.h * g.w, oh * ow);
        let out = par_zeroed(n * c * pout, pout, |i, o: &mut [T]| {
            let plane = &x[i * pin..][..pin];
            // A NaN must win like PyTorch's; the vectorised maxima would drop it.
            #[allow(clippy::eq_op)]
            if plane.iter().any(|&v| v != v) {
                for oy in 0..oh {
                    for ox in 0..ow {
                        o[oy * ow + ox] = plane[g.argmax(plane, oy, ox)];
                    }
                }
            } else {
                g.window_maxima(plane, o);
            }
        });
        (T::to_cpu_storage_owned(out), Shape::from((n, c, oh, ow)))
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "graft-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = l.shape().dims4()?;
        dispatch1!(self, s, l, n, c)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &MaxPool2dBackward(self.0),
        )?;
        Ok(Some(grad))
    }
}

/// `(input, output, grad_output) -> grad_input`: routes each output gradient to its window's first
/// maximum, the first input equal to the window's output (or, for a NaN output, the first NaN).
struct MaxPool2dBackward(PoolGeom);

impl MaxPool2dBackward {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        y: &[T],
        gy: &[T],
        n: usize,
        c: usize,
    ) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (pin, pout) = (g.h * g.w, oh * ow);
        let gx = par_zeroed_init(
            n * c * pin,
            pin,
            || (Vec::new(), vec![0usize; ow]),
            |(phases, first), i, gxp: &mut [T]| {
                let plane = &x[i * pin..][..pin];
                let (yp, gyp) = (&y[i * pout..][..pout], &gy[i * pout..][..pout]);
                g.column_phases(plane, phases);
                for (oy, (yr, gr)) in yp.chunks_exact(ow).zip(gyp.chunks_exact(ow)).enumerate() {
                    vectorized! { g.first_equals(phases, oy, yr, first) }
                    for (ox, (&at, &gv)) in first.iter().zip(gr).enumerate() {
                        let at = if at == usize::MAX {
                            g.argmax(plane, oy, ox)
                        } else {
                            at
                        };
                        gxp[at] += gv;
                    }
                }
            },
        );
        (T::to_cpu_storage_owned(gx), Shape::from((n, c, g.h, g.w)))
    }
}

impl CustomOp3 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "graft-max-pool2d-backward"
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
        let (n, c, _, _) = l1.shape().dims4()?;
        dispatch3!(self, s1, l1, s2, l2, s3, l3, n, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Reference max-pool from candle ops: pad with -inf, stack the k*k shifted strided windows, take the max.
    fn reference_forward(x: &Tensor, k: usize, s: usize, p: usize) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![f64::NEG_INFINITY; n * c * oh * ow];
        for plane in 0..n * c {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (y, xx) = (
                                (oy * s + ky) as isize - p as isize,
                                (ox * s + kx) as isize - p as isize,
                            );
                            if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                                let v = xv[plane * h * w + y as usize * w + xx as usize];
                                let o = &mut out[plane * oh * ow + oy * ow + ox];
                                *o = o.max(v);
                            }
                        }
                    }
                }
            }
        }
        Tensor::from_vec(out, (n, c, oh, ow), x.device()).unwrap()
    }

    /// A NaN in a window makes that window's output NaN (PyTorch's behaviour), other windows of the
    /// same plane keep their maxima, and the gradient of a NaN output goes to the NaN.
    #[test]
    fn a_nan_wins_its_window_like_pytorch() {
        let dev = Device::Cpu;
        let mut v: Vec<f32> = (0..36).map(|i| (i * 7 % 11) as f32).collect();
        v[0] = f32::NAN;
        let x = Var::from_tensor(&Tensor::from_vec(v, (1, 1, 6, 6), &dev).unwrap()).unwrap();
        let y = max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
        let out: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(out[0].is_nan(), "{out:?}");
        assert!(out[1..].iter().all(|v| !v.is_nan()), "{out:?}");
        let gx = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = gx
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gx[0], 1.0, "{gx:?}");
    }

    #[test]
    fn forward_matches_a_direct_loop() {
        let dev = Device::Cpu;
        for &(k, s, p, h, w) in &[
            (3, 2, 1, 8, 8),
            (3, 2, 1, 7, 9),
            (2, 2, 0, 6, 6),
            (3, 1, 1, 5, 4),
            (5, 3, 2, 11, 10),
        ] {
            let x = Tensor::randn(0f64, 1., (2, 3, h, w), &dev).unwrap();
            let ours = max_pool2d(&x, k, s, p).unwrap();
            let reference = reference_forward(&x, k, s, p);
            let diff: f64 = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(diff, 0.0, "k{k} s{s} p{p} {h}x{w}");
        }
    }

    #[test]
    fn composed_pool_matches_the_kernel_forward_and_backward_ties_included() {
        let dev = Device::Cpu;
        for &(k, s, p, h, w) in &[
            (3, 2, 1, 8, 8),
            (3, 2, 1, 7, 9),
            (2, 2, 0, 6, 6),
            (3, 1, 1, 5, 4),
            (5, 3, 2, 11, 10),
        ] {
            // Rounded values make ties common, as after a ReLU.
            let x = Var::from_tensor(
                &Tensor::randn(0f64, 1., (2, 3, h, w), &dev)
                    .unwrap()
                    .relu()
                    .unwrap()
                    .round()
                    .unwrap(),
            )
            .unwrap();
            let probe = Tensor::randn(
                0f64,
                1.,
                (2, 3, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1),
                &dev,
            )
            .unwrap();
            let a = max_pool2d(x.as_tensor(), k, s, p).unwrap();
            let b = max_pool2d_composed(x.as_tensor(), k, s, p).unwrap();
            let diff: f64 = (&a - &b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(diff, 0.0, "forward k{k} s{s} p{p} {h}x{w}");
            let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap(),
            );
            let diff: f64 = (ga - gb)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-12, "backward k{k} s{s} p{p} {h}x{w}: {diff}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 2, 7, 8), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f64, 1., (2, 2, 4, 4), &dev).unwrap();
        let loss = |t: &Tensor| {
            (max_pool2d(t, 3, 2, 1).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(x.as_tensor()).backward().unwrap();
        let g: Vec<f64> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let f = |v: Vec<f64>| -> f64 {
                loss(&Tensor::from_vec(v, (2, 2, 7, 8), &dev).unwrap())
                    .to_scalar()
                    .unwrap()
            };
            let fd = (f(plus) - f(minus)) / (2. * eps);
            assert!(
                (fd - g[i]).abs() < 1e-6,
                "element {i}: finite difference {fd}, backward {}",
                g[i]
            );
        }
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum_like_pytorch() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &dev).unwrap())
                .unwrap();
        let y = max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        // Windows start at (-1,-1), (-1,1), (1,-1), (1,1): first in-bounds elements (0,0), (0,1), (1,0), (1,1).
        let expected = Tensor::new(
            &[
                [1f32, 1., 0., 0.],
                [1., 1., 0., 0.],
                [0., 0., 0., 0.],
                [0., 0., 0., 0.],
            ],
            &dev,
        )
        .unwrap();
        let diff: f32 = (g.squeeze(0).unwrap().squeeze(0).unwrap() - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}
