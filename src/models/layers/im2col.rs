//! Dense convolution (`groups == 1`) on the CPU as one GEMM over the whole batch, forward and backward.
//!
//! The batch is folded into the GEMM's columns: the input is unfolded into `cols` `[K * K * C, N * OH * OW]`
//! (rows tap-major: row `(ky * K + kx) * C + c`), so the forward is one product `W [O, K * K * C] x cols`,
//! the filter gradient one product `dY [O, N * OH * OW] x cols^T` and the input gradient one product
//! `W^T x dY` folded back by col2im. One product per layer instead of one per image matters: the GEMM
//! packs its left operand on every call, and for the late layers (a few output pixels per image) packing
//! the filter once per image cost as much as the multiplication itself.
//!
//! Why tap-major rows: candle's tiled conv2d orders its reduction the same way, and with the same `k`
//! the GEMM sums each output in the same order, so the forward values are bit-identical to candle's
//! (checked by the tests below). That matters for PyTorch gradient parity: values that differ in the
//! last bit move the golden ResNet-18 stem gradients by 1e-3 relative (near-ties in the max-pool after
//! the stem flip), against 4e-6 with these values.

use super::depthwise::{axpy_scatter, contiguous_slice, span, Geom};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, Device, Layout, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

/// `bias-free conv2d(x, weight)` for `groups == 1`: `x` `[N, C, H, W]`, `weight` `[O, C, K, K]`, symmetric
/// zero `padding`, `stride`. Differentiable in both arguments (an input that tracks no gradient gets none
/// computed). CPU only (the caller checks the device).
pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let geom = Geom {
        c,
        h,
        w,
        kh,
        kw,
        padding,
        stride,
    };
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, FoldedConv(geom))
}

/// `(x, weight) -> conv2d(x, weight)`, see the module comment.
struct FoldedConv(Geom);

impl FoldedConv {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let o = wl.dims()[0];
        let (oh, ow) = g.out_hw();
        let l = oh * ow;
        let n = x.len() / (g.c * g.h * g.w);
        let ckk = g.c * g.kh * g.kw;
        let dev = Device::Cpu;
        let cols = Tensor::from_vec(im2col_folded(g, x), (ckk, n * l), &dev)?;
        let wm = Tensor::from_vec(tap_major(w, o, g), (o, ckk), &dev)?;
        let y = wm.matmul(&cols)?;
        drop(cols);
        let (storage, layout) = y.storage_and_layout();
        let y = match &*storage {
            Storage::Cpu(cs) => contiguous_slice::<T>(cs, layout, "graft-conv2d")?,
            _ => candle_core::bail!("graft-conv2d: the product left the CPU"),
        };
        // [O, N * L] -> [N, O, L]
        let mut out = vec![T::from_f64(0.); n * o * l];
        out.par_chunks_mut(l).enumerate().for_each(|(p, dst)| {
            let (b, oc) = (p / o, p % o);
            dst.copy_from_slice(&y[(oc * n + b) * l..(oc * n + b + 1) * l]);
        });
        Ok((T::to_cpu_storage_owned(out), Shape::from((n, o, oh, ow))))
    }
}

/// `weight` `[O, C, KH, KW]` as `[O, KH * KW * C]` (tap-major, the row order of [`im2col_folded`]).
fn tap_major<T: WithDType>(w: &[T], o: usize, g: Geom) -> Vec<T> {
    let taps = g.kh * g.kw;
    if taps == 1 {
        return w.to_vec();
    }
    let mut out = vec![T::from_f64(0.); w.len()];
    for oc in 0..o {
        for ch in 0..g.c {
            for t in 0..taps {
                out[(oc * taps + t) * g.c + ch] = w[(oc * g.c + ch) * taps + t];
            }
        }
    }
    out
}

/// Unfolds `x` `[N, C, H, W]` into `[KH * KW * C, N * OH * OW]`: row `tap * C + c` holds, for every image
/// and output position, the input pixel that filter tap `tap` of channel `c` sees (zero in the padding).
fn im2col_folded<T: WithDType>(g: Geom, x: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let (plane_in, l) = (g.h * g.w, oh * ow);
    let n = x.len() / (g.c * plane_in);
    let nl = n * l;
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
    let mut cols = vec![T::from_f64(0.); g.c * g.kh * g.kw * nl];
    cols.par_chunks_mut(nl).enumerate().for_each(|(row, dst)| {
        let (tap, ch) = (row / g.c, row % g.c);
        for b in 0..n {
            let src = &x[(b * g.c + ch) * plane_in..(b * g.c + ch + 1) * plane_in];
            let dst = &mut dst[b * l..(b + 1) * l];
            if pointwise {
                dst.copy_from_slice(src);
                continue;
            }
            g.for_each_run_of_tap(tap, |r| {
                let row = &mut dst[r.out..r.out + r.len];
                let seen = &src[span(r, g.stride)];
                if g.stride == 1 {
                    row.copy_from_slice(seen);
                } else {
                    for (d, &v) in row.iter_mut().zip(seen.iter().step_by(g.stride)) {
                        *d = v;
                    }
                }
            })
        }
    });
    cols
}

/// The adjoint of [`im2col_folded`]: `[KH * KW * C, N * OH * OW] -> [N, C, H, W]`, summing overlapping
/// taps.
fn col2im_folded<T: WithDType>(g: Geom, cols: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let (plane_in, l) = (g.h * g.w, oh * ow);
    let nl = cols.len() / (g.c * g.kh * g.kw);
    let n = nl / l;
    let mut x = vec![T::from_f64(0.); n * g.c * plane_in];
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
    x.par_chunks_mut(plane_in).enumerate().for_each(|(p, dst)| {
        let (b, ch) = (p / g.c, p % g.c);
        if pointwise {
            dst.copy_from_slice(&cols[ch * nl + b * l..ch * nl + (b + 1) * l]);
            return;
        }
        g.for_each_run(|r| {
            let at = (r.tap * g.c + ch) * nl + b * l + r.out;
            axpy_scatter(
                &mut dst[span(r, g.stride)],
                T::from_f64(1.),
                &cols[at..at + r.len],
                g.stride,
            )
        })
    });
    x
}

impl CustomOp2 for FoldedConv {
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
        let name = self.name();
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.run(
                contiguous_slice::<f32>(s1, l1, name)?,
                contiguous_slice::<f32>(s2, l2, name)?,
                l2,
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.run(
                contiguous_slice::<f64>(s1, l1, name)?,
                contiguous_slice::<f64>(s2, l2, name)?,
                l2,
            ),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => self.run(
                contiguous_slice::<half::f16>(s1, l1, name)?,
                contiguous_slice::<half::f16>(s2, l2, name)?,
                l2,
            ),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.run(
                contiguous_slice::<half::bf16>(s1, l1, name)?,
                contiguous_slice::<half::bf16>(s2, l2, name)?,
                l2,
            ),
            _ => candle_core::bail!(
                "{name}: unsupported or mixed dtypes {:?}, {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        }
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
        let g = self.0;
        let (n, o, oh, ow) = grad.dims4()?;
        let (ckk, l) = (g.c * g.kh * g.kw, oh * ow);
        let grad_nchw = grad.contiguous()?;
        let grad = grad_nchw
            .transpose(0, 1)?
            .contiguous()?
            .reshape((o, n * l))?;
        let gw = if weight.track_op() {
            Some(x.apply_op2_no_bwd(&grad_nchw, &FilterGrad(g))?)
        } else {
            None
        };
        if !x.track_op() {
            return Ok((None, gw));
        }
        let wm = weight
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((o, ckk))?;
        let gcols = wm.t()?.matmul(&grad)?;
        Ok((Some(gcols.apply_op1_no_bwd(&Col2ImFolded(g))?), gw))
    }
}

/// The filter gradient of [`FoldedConv`]: `(x [N, C, H, W], dY [N, O, OH, OW]) -> dW [O, C, KH, KW]`.
///
/// `dW = dY x cols^T` reduces over every image and output pixel. A GEMM parallelises over the rows and
/// columns of its result, which are few here (`O x K * K * C`) against a long reduction, so instead the
/// images are split into one chunk per thread: each thread unfolds only its own images and runs a
/// single-threaded GEMM over them, and the partial filters are summed. This also keeps only a chunk's
/// columns in memory. Half-precision types use candle's matmul for the product.
struct FilterGrad(Geom);

impl FilterGrad {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        grad: &[T],
        o: usize,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane_c, l, taps) = (g.c * g.h * g.w, oh * ow, g.kh * g.kw);
        let ckk = g.c * taps;
        let n = x.len() / plane_c;
        let per = n.div_ceil(rayon::current_num_threads().clamp(1, n.max(1)));
        let chunk = |b0: usize| -> candle_core::Result<Vec<T>> {
            let b1 = (b0 + per).min(n);
            let k = (b1 - b0) * l;
            let cols = im2col_folded(g, &x[b0 * plane_c..b1 * plane_c]);
            // This chunk's dY as [O, (b1 - b0) * L].
            let mut gt = vec![T::from_f64(0.); o * k];
            for (j, b) in (b0..b1).enumerate() {
                for oc in 0..o {
                    gt[oc * k + j * l..oc * k + (j + 1) * l]
                        .copy_from_slice(&grad[(b * o + oc) * l..(b * o + oc + 1) * l]);
                }
            }
            let mut dw = vec![T::from_f64(0.); o * ckk];
            if !matches!(T::DTYPE, candle_core::DType::F32 | candle_core::DType::F64) {
                let dev = Device::Cpu;
                let p = Tensor::from_vec(gt, (o, k), &dev)?
                    .matmul(&Tensor::from_vec(cols, (ckk, k), &dev)?.t()?)?;
                return p.flatten_all()?.to_vec1::<T>();
            }
            // SAFETY: the pointers and strides describe `gt` [O, k] and `cols` [ckk, k] (read as its
            // transpose [k, ckk]), both row-major and alive for the call; `dw` [O, ckk] is written.
            unsafe {
                gemm::gemm(
                    o,
                    ckk,
                    k,
                    dw.as_mut_ptr(),
                    1,
                    ckk as isize,
                    false,
                    gt.as_ptr(),
                    1,
                    k as isize,
                    cols.as_ptr(),
                    k as isize,
                    1,
                    T::from_f64(0.),
                    T::from_f64(1.),
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
            Ok(dw)
        };
        let partials = (0..n)
            .step_by(per.max(1))
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(chunk)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut sum = partials.into_iter();
        let mut dw = sum.next().unwrap_or_else(|| vec![T::from_f64(0.); o * ckk]);
        for p in sum {
            dw.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
        }
        // [O, taps, C] -> [O, C, KH, KW]
        let mut out = vec![T::from_f64(0.); o * ckk];
        for oc in 0..o {
            for t in 0..taps {
                for ch in 0..g.c {
                    out[(oc * g.c + ch) * taps + t] = dw[(oc * taps + t) * g.c + ch];
                }
            }
        }
        Ok((
            T::to_cpu_storage_owned(out),
            Shape::from((o, g.c, g.kh, g.kw)),
        ))
    }
}

impl CustomOp2 for FilterGrad {
    fn name(&self) -> &'static str {
        "graft-conv2d-filter-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let o = l2.dims()[1];
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.run(
                contiguous_slice::<f32>(s1, l1, name)?,
                contiguous_slice::<f32>(s2, l2, name)?,
                o,
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.run(
                contiguous_slice::<f64>(s1, l1, name)?,
                contiguous_slice::<f64>(s2, l2, name)?,
                o,
            ),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => self.run(
                contiguous_slice::<half::f16>(s1, l1, name)?,
                contiguous_slice::<half::f16>(s2, l2, name)?,
                o,
            ),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.run(
                contiguous_slice::<half::bf16>(s1, l1, name)?,
                contiguous_slice::<half::bf16>(s2, l2, name)?,
                o,
            ),
            _ => candle_core::bail!(
                "{name}: unsupported or mixed dtypes {:?}, {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        }
    }
}

/// [`col2im_folded`] as an op.
struct Col2ImFolded(Geom);

impl Col2ImFolded {
    fn run<T: WithDType>(&self, cols: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let x = col2im_folded(g, cols);
        let n = x.len() / (g.c * g.h * g.w);
        (T::to_cpu_storage_owned(x), Shape::from((n, g.c, g.h, g.w)))
    }
}

macro_rules! impl_no_bwd_op1 {
    ($ty:ty, $name:literal) => {
        impl CustomOp1 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s: &CpuStorage,
                l: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                let name = self.name();
                match s {
                    CpuStorage::F32(_) => Ok(self.run(contiguous_slice::<f32>(s, l, name)?)),
                    CpuStorage::F64(_) => Ok(self.run(contiguous_slice::<f64>(s, l, name)?)),
                    CpuStorage::F16(_) => Ok(self.run(contiguous_slice::<half::f16>(s, l, name)?)),
                    CpuStorage::BF16(_) => {
                        Ok(self.run(contiguous_slice::<half::bf16>(s, l, name)?))
                    }
                    _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
                }
            }
        }
    };
}

impl_no_bwd_op1!(Col2ImFolded, "graft-col2im-folded");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::test_support::{gradient_gaps, max_abs};
    use candle_core::{DType, Var};

    /// (in, out, h, w, kernel, padding, stride): ResNet's stem, 3x3 at stride 1 and 2, 1x1 at stride 1
    /// and 2, odd and non-square sizes.
    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 7] = [
        (3, 8, 20, 20, 7, 3, 2),
        (8, 8, 9, 9, 3, 1, 1),
        (8, 16, 9, 9, 3, 1, 2),
        (8, 16, 8, 8, 1, 0, 2),
        (8, 16, 8, 8, 1, 0, 1),
        (3, 2, 6, 7, 1, 0, 1),
        (2, 3, 11, 9, 5, 0, 2),
    ];

    #[test]
    fn forward_is_bit_identical_to_candle_conv2d_in_f32() {
        let dev = Device::Cpu;
        for (ci, co, h, w, k, p, s) in CASES {
            // Non-square inputs of mixed parity under a stride are not candle-safe: skip those here.
            let x = Tensor::randn(0f32, 1., (3, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (co, ci, k, k), &dev).unwrap();
            let ours = conv2d(&x, &wt, p, s).unwrap();
            let theirs = x.conv2d(&wt, p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert_eq!(
                max_abs(&ours, &theirs),
                0.0,
                "{ci}->{co} {h}x{w} k{k} p{p} s{s}"
            );
            assert_eq!(ours.dtype(), DType::F32);
        }
    }

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        let dev = Device::Cpu;
        for (ci, co, h, w, k, p, s) in CASES {
            let x = Var::randn(0f64, 1., (2, ci, h, w), &dev).unwrap();
            let wt = Var::randn(0f64, 1., (co, ci, k, k), &dev).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
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

    #[test]
    fn an_input_without_gradient_gets_none_computed() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev).unwrap();
        let wt = Var::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap();
        let y = conv2d(&x, wt.as_tensor(), 1, 1).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert_eq!(grads.get(wt.as_tensor()).unwrap().dims(), &[4, 3, 3, 3]);
    }
}
