//! A linear layer's product `x [M, K] x w [N, K]^T` under `autocast(Bf16)`: forward and both gradients on
//! the bf16 GEMM, as PyTorch's autocast runs `nn.Linear` (ConvNeXt's MLPs, the ViT's attention
//! projections and MLPs, classifier heads). Outside bf16 the layers keep candle's f32 matmul.

use super::common::{gemm_into, impl_forward_only_op2, View};
use super::precision::{current, Precision};
use crate::device::custom_kernels_on;
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

/// `x [M, K] x w [N, K]^T` multiplied in bf16 when the autocast scope is bf16 and both are f32: on graft's
/// bf16 GEMM where its kernels run and the CPU has bf16 products, elsewhere as candle's own bf16 matmul
/// (cuBLAS on a GPU); `None` otherwise (the caller multiplies in f32).
/// Differentiable in both arguments.
pub fn linear_product_autocast(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !custom_kernels_on(x.device()) {
        // Another device (or the generic path): candle's own bf16 product, widened back.
        return Ok(match super::precision::autocast_dtype(x.dtype()) {
            Some(dt) => Some(
                x.to_dtype(dt)?
                    .matmul(&w.to_dtype(dt)?.t()?)?
                    .to_dtype(x.dtype())?,
            ),
            None => None,
        });
    }
    if current() != Precision::Bf16
        || !super::bf16::available()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !custom_kernels_on(x.device())
    {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: x.shape().clone(),
            rhs: w.shape().clone(),
            op: "linear_product",
        }
        .into());
    }
    Ok(Some(
        x.contiguous()?
            .apply_op2(&w.contiguous()?, LinearProduct { m, n, k })?,
    ))
}

/// `(x [M, K], w [N, K]) -> x w^T [M, N]` in bf16.
struct LinearProduct {
    m: usize,
    n: usize,
    k: usize,
}

/// Threads for one product of the op: the op runs on its own, so the GEMM parallelises itself.
fn threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
}

impl LinearProduct {
    fn run<T: WithDType>(&self, x: &[T], w: &[T]) -> (CpuStorage, Shape) {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut y = vec![T::zero(); m * n];
        gemm_into(
            (m, n, k),
            (&mut y, View::strided(0, n, 1)),
            false,
            (x, View::strided(0, k, 1)),
            (w, View::strided(0, 1, k)),
            (Precision::Bf16, threads()),
        );
        (T::to_cpu_storage_owned(y), Shape::from((m, n)))
    }
}

impl CustomOp2 for LinearProduct {
    fn name(&self) -> &'static str {
        "graft-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        super::common::dispatch2!(self, s1, l1, s2, l2)
    }

    /// `dx = dy w` and `dw = dy^T x`, each only when its input tracks a gradient.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &Gradient::input(self.m, self.n, self.k))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(grad.apply_op2_no_bwd(x, &Gradient::weight(self.m, self.n, self.k))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// One gradient of [`LinearProduct`] as a bf16 product `lhs [m, k] x rhs [k, n]` of the two inputs laid
/// out as the views say: `dx = dy w` and `dw = dy^T x`.
struct Gradient {
    dims: (usize, usize, usize),
    lhs: View,
    rhs: View,
}

impl Gradient {
    /// `(dy [M, N], w [N, K]) -> dy w [M, K]`.
    fn input(m: usize, n: usize, k: usize) -> Self {
        Gradient {
            dims: (m, k, n),
            lhs: View::strided(0, n, 1),
            rhs: View::strided(0, k, 1),
        }
    }

    /// `(dy [M, N], x [M, K]) -> dy^T x [N, K]`.
    fn weight(m: usize, n: usize, k: usize) -> Self {
        Gradient {
            dims: (n, k, m),
            lhs: View::strided(0, 1, n),
            rhs: View::strided(0, k, 1),
        }
    }

    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> (CpuStorage, Shape) {
        let (rows, cols, _) = self.dims;
        let mut out = vec![T::zero(); rows * cols];
        gemm_into(
            self.dims,
            (&mut out, View::strided(0, cols, 1)),
            false,
            (a, self.lhs),
            (b, self.rhs),
            (Precision::Bf16, threads()),
        );
        (T::to_cpu_storage_owned(out), Shape::from((rows, cols)))
    }
}

impl_forward_only_op2!(Gradient, "graft-linear-bf16-grad");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::precision::autocast;
    use candle_core::{Device, Var};

    fn relative_l2(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() as f64 / n.to_scalar::<f32>().unwrap() as f64).sqrt()
    }

    #[test]
    fn bf16_product_and_gradients_are_within_bf16_rounding_of_f32() {
        assert!(linear_product_autocast(
            &Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap()
        )
        .unwrap()
        .is_none());
        if !super::super::bf16::available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16");
            return;
        }
        let dev = Device::Cpu;
        // Tile edges in every direction.
        let x = Var::randn(0f32, 1., (37, 70), &dev).unwrap();
        let w = Var::randn(0f32, 1., (45, 70), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1., (37, 45), &dev).unwrap();
        let want = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let want_g = (&want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = autocast(Precision::Bf16, || {
            linear_product_autocast(x.as_tensor(), w.as_tensor()).unwrap()
        })
        .expect("bf16 runs here");
        let got_g = (&got * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // Off graft's kernels (a GPU; here the generic path): candle's own bf16 product.
        let generic = crate::device::with_generic_ops(|| {
            autocast(Precision::Bf16, || {
                linear_product_autocast(x.as_tensor(), w.as_tensor()).unwrap()
            })
        })
        .expect("bf16 off graft's kernels too");
        let err = relative_l2(&generic, &want);
        assert!(
            err < 2e-2 && err > 1e-5,
            "generic path: relative error {err}"
        );
        for (what, ours, theirs) in [
            ("forward", got.clone(), want.clone()),
            (
                "dx",
                got_g.get(&x).unwrap().clone(),
                want_g.get(&x).unwrap().clone(),
            ),
            (
                "dw",
                got_g.get(&w).unwrap().clone(),
                want_g.get(&w).unwrap().clone(),
            ),
        ] {
            let err = relative_l2(&ours, &theirs);
            assert!(err < 2e-2 && err > 1e-5, "{what}: relative error {err}");
        }
    }
}
