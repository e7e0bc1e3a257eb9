//! Dense convolution as `im2col` + batched matmul, with `col2im` as the backward of `im2col`.
//!
//! candle 0.11's CPU conv2d spends a large share of its time in a generic per-element im2col, and its
//! backward rebuilds the input gradient with a direct (slow) transposed convolution. Here the unfolding is
//! a custom op whose backward is the matching fold, and the products are candle matmuls, so the backward
//! pass is two matmuls and one fold, all differentiable through candle's own autograd.

use super::depthwise::{axpy_scatter, contiguous_slice, span, Geom};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, Device, Layout, Shape, Storage, Tensor, WithDType,
};
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

/// Which code computes the forward values of [`conv2d_im2col_backward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Forward {
    /// candle's conv2d, whose rounding tracks PyTorch's closely (what gradient parity needs).
    Candle,
    /// [`conv2d_im2col`]: faster, equal up to the last bits.
    Im2col,
}

/// `bias-free conv2d(x, weight)` for `groups == 1` whose forward values come from `forward` and whose
/// backward is two matmuls and a col2im (instead of candle's direct transposed convolution). CPU only.
pub(super) fn conv2d_im2col_backward(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    forward: Forward,
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
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        ConvWithIm2ColBackward { geom, forward },
    )
}

/// `(x, weight) -> conv2d(x, weight)`, computed by `forward`, differentiated as a convolution.
///
/// The forward values are computed inside the op (on tensors rebuilt from its inputs) rather than
/// passed in as a third argument: an argument stays alive with the autograd graph, which would keep every
/// convolution output twice until the backward pass.
struct ConvWithIm2ColBackward {
    geom: Geom,
    forward: Forward,
}

impl ConvWithIm2ColBackward {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        xl: &Layout,
        w: &[T],
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dev = Device::Cpu;
        let (xt, wt) = (
            Tensor::from_slice(x, xl.shape(), &dev)?,
            Tensor::from_slice(w, wl.shape(), &dev)?,
        );
        let (p, s) = (self.geom.padding, self.geom.stride);
        let y = match self.forward {
            Forward::Candle => xt.conv2d(&wt, p, s, 1, 1)?,
            Forward::Im2col => conv2d_im2col(&xt, &wt, p, s)?,
        }
        .contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        let values = match &*storage {
            Storage::Cpu(cs) => contiguous_slice::<T>(cs, layout, "graft-conv2d-im2col")?.to_vec(),
            _ => candle_core::bail!("graft-conv2d-im2col: the forward left the CPU"),
        };
        Ok((T::to_cpu_storage_owned(values), y.shape().clone()))
    }
}

impl CustomOp2 for ConvWithIm2ColBackward {
    fn name(&self) -> &'static str {
        "graft-conv2d-im2col-backward"
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
                l1,
                contiguous_slice::<f32>(s2, l2, name)?,
                l2,
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.run(
                contiguous_slice::<f64>(s1, l1, name)?,
                l1,
                contiguous_slice::<f64>(s2, l2, name)?,
                l2,
            ),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => self.run(
                contiguous_slice::<half::f16>(s1, l1, name)?,
                l1,
                contiguous_slice::<half::f16>(s2, l2, name)?,
                l2,
            ),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.run(
                contiguous_slice::<half::bf16>(s1, l1, name)?,
                l1,
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

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geom;
        let (n, o, oh, ow) = grad.dims4()?;
        let (ckk, l) = (g.c * g.kh * g.kw, oh * ow);
        let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
        // Batch folded into the columns, so each product is one large matmul: grad [O, N * L],
        // cols [C * K * K, N * L].
        let grad = grad.transpose(0, 1)?.contiguous()?.reshape((o, n * l))?;
        let gw = if weight.track_op() {
            let cols = if pointwise {
                x.transpose(0, 1)?.contiguous()?.reshape((g.c, n * l))?
            } else {
                x.apply_op1_no_bwd(&Im2ColFolded(g))?
            };
            Some(grad.matmul(&cols.t()?)?.reshape(weight.shape())?)
        } else {
            None
        };
        if !x.track_op() {
            // The image, or the output of a frozen group: nothing upstream needs this gradient.
            return Ok((None, gw));
        }
        let gcols = weight.reshape((o, ckk))?.t()?.matmul(&grad)?;
        let gx = if pointwise {
            gcols
                .reshape((g.c, n, g.h, g.w))?
                .transpose(0, 1)?
                .contiguous()?
        } else {
            gcols.apply_op1_no_bwd(&Col2ImFolded(g))?
        };
        Ok((Some(gx), gw))
    }
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
    use crate::models::layers::test_support::{gradient_gaps, max_abs};
    use candle_core::Var;

    #[test]
    fn im2col_backward_matches_candle_conv2d_for_both_forwards() {
        let dev = Device::Cpu;
        let cases = [
            (3, 4, 9, 9, 7, 3, 2),
            (4, 5, 8, 8, 3, 1, 1),
            (3, 2, 6, 7, 1, 0, 1),
            (4, 6, 8, 8, 1, 0, 2),
        ];
        for forward in [Forward::Candle, Forward::Im2col] {
            for (ci, co, h, w, k, p, s) in cases {
                let x = Var::randn(0f64, 1., (2, ci, h, w), &dev).unwrap();
                let wt = Var::randn(0f64, 1., (co, ci, k, k), &dev).unwrap();
                let ours =
                    conv2d_im2col_backward(x.as_tensor(), wt.as_tensor(), p, s, forward).unwrap();
                let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
                let what = format!("{forward:?} {ci}->{co} {h}x{w} k{k} p{p} s{s}");
                if forward == Forward::Candle {
                    assert_eq!(
                        max_abs(&ours, &theirs),
                        0.0,
                        "{what}: forward is candle's own"
                    );
                } else {
                    assert!(max_abs(&ours, &theirs) < 1e-10, "{what}: forward");
                }
                let probe = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
                for gap in gradient_gaps(&ours, &theirs, &probe, &[&x, &wt]) {
                    assert!(gap < 1e-10, "{what}: gradient");
                }
            }
        }
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
            for gap in gradient_gaps(&ours, &theirs, &probe, &[&x, &wt]) {
                assert!(gap < 1e-10, "gradient {what}");
            }
        }
    }
}

/// Like [`Im2Col`] with the batch folded into the columns: `[N, C, H, W] -> [C * KH * KW, N * OH * OW]`.
struct Im2ColFolded(Geom);

impl Im2ColFolded {
    fn run<T: WithDType>(&self, x: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane_in, l, taps) = (g.h * g.w, oh * ow, g.kh * g.kw);
        let n = x.len() / (g.c * plane_in);
        let nl = n * l;
        let mut cols = vec![T::from_f64(0.); g.c * taps * nl];
        cols.par_chunks_mut(taps * nl)
            .enumerate()
            .for_each(|(ch, dst)| {
                for b in 0..n {
                    let src = &x[(b * g.c + ch) * plane_in..(b * g.c + ch + 1) * plane_in];
                    g.for_each_run(|r| {
                        let at = r.tap * nl + b * l + r.out;
                        let row = &mut dst[at..at + r.len];
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
        (T::to_cpu_storage_owned(cols), Shape::from((g.c * taps, nl)))
    }
}

/// The adjoint of [`Im2ColFolded`]: `[C * KH * KW, N * OH * OW] -> [N, C, H, W]`.
struct Col2ImFolded(Geom);

impl Col2ImFolded {
    fn run<T: WithDType>(&self, cols: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane_in, l, taps) = (g.h * g.w, oh * ow, g.kh * g.kw);
        let nl = cols.len() / (g.c * taps);
        let n = nl / l;
        let mut x = vec![T::from_f64(0.); n * g.c * plane_in];
        x.par_chunks_mut(plane_in).enumerate().for_each(|(p, dst)| {
            let (b, ch) = (p / g.c, p % g.c);
            let base = ch * taps * nl + b * l;
            g.for_each_run(|r| {
                let at = base + r.tap * nl + r.out;
                axpy_scatter(
                    &mut dst[span(r, g.stride)],
                    T::from_f64(1.),
                    &cols[at..at + r.len],
                    g.stride,
                )
            })
        });
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

impl_no_bwd_op1!(Im2ColFolded, "graft-im2col-folded");
impl_no_bwd_op1!(Col2ImFolded, "graft-col2im-folded");
