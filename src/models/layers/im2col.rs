//! Dense convolution as `im2col` + batched matmul, with `col2im` as the backward of `im2col`.
//!
//! candle 0.11's CPU conv2d spends a large share of its time in a generic per-element im2col, and its
//! backward rebuilds the input gradient with a direct (slow) transposed convolution. Here the unfolding is
//! a custom op whose backward is the matching fold, and the products are candle matmuls, so the backward
//! pass is two matmuls and one fold, all differentiable through candle's own autograd.

use super::depthwise::{axpy_scatter, contiguous_slice, span, Geom};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `bias-free conv2d(x, weight)` for `groups == 1`: `x` `[N, C, H, W]`, `weight` `[O, C, K, K]`, symmetric
/// zero `padding`, `stride`. CPU only (the caller checks the device).
pub(super) fn conv2d_im2col(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (o, _, kh, kw) = weight.dims4()?;
    let geom = Geom {
        c,
        h,
        w,
        kh,
        kw,
        padding,
        stride,
    };
    let (oh, ow) = geom.out_hw();
    let cols = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        x.reshape((n, c, h * w))?
    } else {
        x.contiguous()?.apply_op1(Im2Col(geom))?
    };
    let wm = weight.reshape((o, c * kh * kw))?.broadcast_left(n)?;
    wm.matmul(&cols)?.reshape((n, o, oh, ow))
}

/// `[N, C, H, W] -> [N, C * KH * KW, OH * OW]`: row `(c, ky, kx)` holds the input pixel that filter tap
/// `(ky, kx)` of channel `c` sees at each output position (zero where it falls in the padding).
struct Im2Col(Geom);

impl Im2Col {
    fn run<T: WithDType>(&self, x: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane_in, l, taps) = (g.h * g.w, oh * ow, g.kh * g.kw);
        let n = x.len() / (g.c * plane_in);
        let mut cols = vec![T::from_f64(0.); n * g.c * taps * l];
        cols.par_chunks_mut(taps * l)
            .zip(x.par_chunks(plane_in))
            .for_each(|(dst, src)| {
                g.for_each_run(|r| {
                    let row = &mut dst[r.tap * l + r.out..r.tap * l + r.out + r.len];
                    let seen = &src[span(r, g.stride)];
                    if g.stride == 1 {
                        row.copy_from_slice(seen);
                    } else {
                        for (d, &v) in row.iter_mut().zip(seen.iter().step_by(g.stride)) {
                            *d = v;
                        }
                    }
                })
            });
        (
            T::to_cpu_storage_owned(cols),
            Shape::from((n, g.c * taps, l)),
        )
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "graft-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        match s {
            CpuStorage::F32(_) => Ok(self.run(contiguous_slice::<f32>(s, l, name)?)),
            CpuStorage::F64(_) => Ok(self.run(contiguous_slice::<f64>(s, l, name)?)),
            CpuStorage::F16(_) => Ok(self.run(contiguous_slice::<half::f16>(s, l, name)?)),
            CpuStorage::BF16(_) => Ok(self.run(contiguous_slice::<half::bf16>(s, l, name)?)),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?))
    }
}

/// The adjoint of [`Im2Col`]: `[N, C * KH * KW, OH * OW] -> [N, C, H, W]`, summing overlapping taps.
struct Col2Im(Geom);

impl Col2Im {
    fn run<T: WithDType>(&self, cols: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane_in, l, taps) = (g.h * g.w, oh * ow, g.kh * g.kw);
        let n = cols.len() / (g.c * taps * l);
        let mut x = vec![T::from_f64(0.); n * g.c * plane_in];
        x.par_chunks_mut(plane_in)
            .zip(cols.par_chunks(taps * l))
            .for_each(|(dst, src)| {
                g.for_each_run(|r| {
                    let row = &src[r.tap * l + r.out..r.tap * l + r.out + r.len];
                    axpy_scatter(&mut dst[span(r, g.stride)], T::from_f64(1.), row, g.stride)
                })
            });
        (T::to_cpu_storage_owned(x), Shape::from((n, g.c, g.h, g.w)))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "graft-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        match s {
            CpuStorage::F32(_) => Ok(self.run(contiguous_slice::<f32>(s, l, name)?)),
            CpuStorage::F64(_) => Ok(self.run(contiguous_slice::<f64>(s, l, name)?)),
            CpuStorage::F16(_) => Ok(self.run(contiguous_slice::<half::f16>(s, l, name)?)),
            CpuStorage::BF16(_) => Ok(self.run(contiguous_slice::<half::bf16>(s, l, name)?)),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        let dev = Device::Cpu;
        // (in, out, h, w, kernel, padding, stride); non-square inputs keep candle's backward valid.
        let cases = [
            (3, 4, 9, 9, 7, 3, 2),
            (4, 5, 8, 8, 3, 1, 1),
            (4, 6, 8, 8, 3, 1, 2),
            (4, 6, 8, 8, 1, 0, 2),
            (3, 2, 6, 7, 1, 0, 1),
            (2, 3, 11, 9, 5, 0, 2),
        ];
        for (ci, co, h, w, k, p, s) in cases {
            let x = Var::randn(0f64, 1., (2, ci, h, w), &dev).unwrap();
            let wt = Var::randn(0f64, 1., (co, ci, k, k), &dev).unwrap();
            let ours = conv2d_im2col(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            let what = format!("{ci}->{co} {h}x{w} k{k} p{p} s{s}");
            assert_eq!(ours.dims(), theirs.dims(), "{what}");
            assert!(max_abs(&ours, &theirs) < 1e-10, "forward {what}");
            let probe = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
            let g1 = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_abs(a, b) < 1e-10, "gradient {what}");
            }
        }
    }
}
