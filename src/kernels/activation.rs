//! ReLU and ReLU6 on the CPU with a one-pass backward, and the smooth activations of the EfficientNet and
//! MobileNet families (SiLU, hard-swish, hard-sigmoid) likewise.
//!
//! candle 0.11 differentiates `relu` as `grad * (x >= 0).to_dtype()` (three passes and two temporaries per
//! activation) and `clamp(0, 6)` as a maximum and a minimum, each with masks, a division and a sum (about
//! ten passes). Here the forward is one pass and the backward is one pass over the gradient and the saved
//! output, with PyTorch's rule: the gradient flows where the output lies strictly inside `(0, max)`.

use super::common::{dispatch1, dispatch2};
use super::simd::par_map;
use crate::device::custom_kernels_on;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};

/// `max(x, 0)`, differentiable (PyTorch's rule: zero gradient where the output is 0). Runs candle's
/// `relu` on other devices.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !custom_kernels_on(x.device()) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Clamp(f64::INFINITY))
}

/// `min(max(x, 0), 6)`, differentiable (PyTorch's `hardtanh` rule: the gradient flows where
/// `0 < x < 6`). Runs candle's `clamp` on other devices.
pub fn relu6(x: &Tensor) -> candle_core::Result<Tensor> {
    if !custom_kernels_on(x.device()) {
        return x.clamp(0f32, 6f32);
    }
    x.contiguous()?.apply_op1(Clamp(6.))
}

/// `max(a + b, 0)` in one pass, differentiable: a residual block's sum and ReLU. The backward is one
/// masked pass, and both inputs receive that same gradient tensor. Runs candle's ops on other devices.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !custom_kernels_on(a.device()) || a.shape() != b.shape() {
        return (a + b)?.relu();
    }
    a.contiguous()?
        .apply_op2(&b.contiguous()?, AddRelu(a.shape().clone()))
}

/// `(a, b) -> max(a + b, 0)` of shape `.0`.
struct AddRelu(Shape);

impl AddRelu {
    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> (CpuStorage, Shape) {
        let zero = T::from_f64(0.);
        // The sum rounds as candle's `add` does; then the same comparison as `Clamp`.
        let y = par_map(a, b, move |a, b| {
            let v = a + b;
            if v > zero {
                v
            } else {
                zero
            }
        });
        (T::to_cpu_storage_owned(y), self.0.clone())
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "graft-add-relu"
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
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?.apply_op2_no_bwd(
            y,
            &ClampGrad {
                max: f64::INFINITY,
                shape: y.shape().clone(),
            },
        )?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// Clamps to `[0, .0]`.
struct Clamp(f64);

impl Clamp {
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        let (zero, max) = (T::from_f64(0.), T::from_f64(self.0));
        let y = par_map(x, x, move |v, _| {
            if v > zero {
                if v < max {
                    v
                } else {
                    max
                }
            } else {
                zero
            }
        });
        (T::to_cpu_storage_owned(y), shape.clone())
    }
}

impl CustomOp1 for Clamp {
    fn name(&self) -> &'static str {
        "graft-clamp-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l.shape();
        dispatch1!(self, s, l, shape)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(
            y,
            &ClampGrad {
                max: self.0,
                shape: y.shape().clone(),
            },
        )?))
    }
}

/// `(grad_output, output) -> grad_input` of shape `shape`: `grad` where `0 < output < max`, else 0.
struct ClampGrad {
    max: f64,
    shape: Shape,
}

impl ClampGrad {
    fn run<T: WithDType>(&self, g: &[T], y: &[T]) -> (CpuStorage, Shape) {
        let (zero, max) = (T::from_f64(0.), T::from_f64(self.max));
        let gx = par_map(g, y, move |g, y| if y > zero && y < max { g } else { zero });
        (T::to_cpu_storage_owned(gx), self.shape.clone())
    }
}

/// The gradient ops take `(grad, saved)` of one shape, the shape recorded at the forward pass.
fn same_shapes(op: &str, l1: &Layout, l2: &Layout, shape: &Shape) -> candle_core::Result<()> {
    if l1.shape() != l2.shape() || l1.shape() != shape {
        candle_core::bail!("{op}: shapes differ, {:?} and {:?}", l1.shape(), l2.shape());
    }
    Ok(())
}

impl CustomOp2 for ClampGrad {
    fn name(&self) -> &'static str {
        "graft-clamp-activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shapes(self.name(), l1, l2, &self.shape)?;
        dispatch2!(self, s1, l1, s2, l2)
    }
}

/// The smooth (non-clamp) activations, each one pass forward and one pass backward over the saved input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Smooth {
    /// `x * sigmoid(x)` (swish).
    Silu,
    /// `x * relu6(x + 3) / 6`.
    HardSwish,
    /// `relu6(x + 3) / 6`.
    HardSigmoid,
}

impl Smooth {
    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Smooth::Silu => x / (1. + (-x).exp()),
            Smooth::HardSwish => x * (x + 3.).clamp(0., 6.) * (1. / 6.),
            Smooth::HardSigmoid => (x + 3.).clamp(0., 6.) * (1. / 6.),
        }
    }

    /// `d value / dx`, with PyTorch's rules at the kinks: `hardswish_backward` is `x / 3 + 0.5` on
    /// `[-3, 3]` (0 below, 1 above); `hardsigmoid_backward` is `1 / 6` strictly inside `(-3, 3)`.
    #[inline(always)]
    fn slope(self, x: f32) -> f32 {
        match self {
            Smooth::Silu => {
                let s = 1. / (1. + (-x).exp());
                s * (1. + x * (1. - s))
            }
            Smooth::HardSwish => {
                if x < -3. {
                    0.
                } else if x <= 3. {
                    x / 3. + 0.5
                } else {
                    1.
                }
            }
            Smooth::HardSigmoid => {
                if x > -3. && x < 3. {
                    1. / 6.
                } else {
                    0.
                }
            }
        }
    }

    /// The same in f64, for the f64 golden cases (f32 arithmetic would cap their precision).
    #[inline(always)]
    fn value64(self, x: f64) -> f64 {
        match self {
            Smooth::Silu => x / (1. + (-x).exp()),
            Smooth::HardSwish => x * (x + 3.).clamp(0., 6.) / 6.,
            Smooth::HardSigmoid => (x + 3.).clamp(0., 6.) / 6.,
        }
    }

    #[inline(always)]
    fn slope64(self, x: f64) -> f64 {
        match self {
            Smooth::Silu => {
                let s = 1. / (1. + (-x).exp());
                s * (1. + x * (1. - s))
            }
            Smooth::HardSwish => {
                if x < -3. {
                    0.
                } else if x <= 3. {
                    x / 3. + 0.5
                } else {
                    1.
                }
            }
            Smooth::HardSigmoid => {
                if x > -3. && x < 3. {
                    1. / 6.
                } else {
                    0.
                }
            }
        }
    }

    /// The value in `T`'s best precision: f64 stays f64, the others go through f32 (as [`smooth_map`]).
    #[inline(always)]
    pub(crate) fn value_of<T: WithDType>(self, x: T) -> T {
        if T::DTYPE == candle_core::DType::F64 {
            T::from_f64(self.value64(x.to_f64()))
        } else {
            T::from_f64(self.value(x.to_f64() as f32) as f64)
        }
    }

    /// The same composed of candle ops, for devices without our kernels.
    pub(crate) fn composed(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Smooth::Silu => x.silu(),
            Smooth::HardSwish => x * ((x + 3.)?.clamp(0f32, 6f32)? / 6.)?,
            Smooth::HardSigmoid => (x + 3.)?.clamp(0f32, 6f32)? / 6.,
        }
    }

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !custom_kernels_on(x.device()) {
            return self.composed(x);
        }
        x.contiguous()?.apply_op1(SmoothOp(self))
    }
}

/// Applies `f` elementwise in the dtype's best precision: f64 stays f64, the others go through f32.
fn smooth_map<T: WithDType>(
    a: &[T],
    b: &[T],
    f32_fn: impl Fn(f32, f32) -> f32 + Sync + Copy,
    f64_fn: impl Fn(f64, f64) -> f64 + Sync + Copy,
) -> Vec<T> {
    if T::DTYPE == candle_core::DType::F64 {
        par_map(a, b, move |a, b| {
            T::from_f64(f64_fn(a.to_f64(), b.to_f64()))
        })
    } else {
        par_map(a, b, move |a, b| {
            T::from_f64(f32_fn(a.to_f64() as f32, b.to_f64() as f32) as f64)
        })
    }
}

/// `x * sigmoid(x)`, differentiable. Runs candle's `silu` on other devices.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    Smooth::Silu.apply(x)
}

/// `x * relu6(x + 3) / 6` (MobileNetV3's hard-swish), differentiable with PyTorch's gradient rule.
pub fn hard_swish(x: &Tensor) -> candle_core::Result<Tensor> {
    Smooth::HardSwish.apply(x)
}

/// `relu6(x + 3) / 6` (MobileNetV3's squeeze-excite gate), differentiable with PyTorch's rule.
pub fn hard_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    Smooth::HardSigmoid.apply(x)
}

struct SmoothOp(Smooth);

impl SmoothOp {
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        let k = self.0;
        let y = par_map(x, x, move |v, _| k.value_of(v));
        (T::to_cpu_storage_owned(y), shape.clone())
    }
}

impl CustomOp1 for SmoothOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Smooth::Silu => "graft-silu",
            Smooth::HardSwish => "graft-hard-swish",
            Smooth::HardSigmoid => "graft-hard-sigmoid",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l.shape();
        dispatch1!(self, s, l, shape)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(
            &x.contiguous()?,
            &SmoothGrad {
                kind: self.0,
                shape: x.shape().clone(),
            },
        )?))
    }
}

/// `(grad_output, input) -> grad_output * slope(input)`.
struct SmoothGrad {
    kind: Smooth,
    shape: Shape,
}

impl SmoothGrad {
    fn run<T: WithDType>(&self, g: &[T], x: &[T]) -> (CpuStorage, Shape) {
        let k = self.kind;
        let gx = smooth_map(
            g,
            x,
            move |g, x| g * k.slope(x),
            move |g, x| g * k.slope64(x),
        );
        (T::to_cpu_storage_owned(gx), self.shape.clone())
    }
}

impl CustomOp2 for SmoothGrad {
    fn name(&self) -> &'static str {
        "graft-smooth-activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shapes(self.name(), l1, l2, &self.shape)?;
        dispatch2!(self, s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values away from the kinks (0 and 6), where every rule agrees, plus the kinks themselves.
    fn input() -> Var {
        let v: Vec<f64> = (0..40).map(|i| (i as f64 - 12.) * 0.75).collect();
        Var::from_vec(v, (2, 4, 5), &Device::Cpu).unwrap()
    }

    #[test]
    fn relu_and_relu6_match_candle_forward_and_pytorch_gradients() {
        let x = input();
        let probe = Tensor::randn(0f64, 1., (2, 4, 5), &Device::Cpu).unwrap();
        for (max, ours) in [
            (f64::INFINITY, relu(x.as_tensor()).unwrap()),
            (6., relu6(x.as_tensor()).unwrap()),
        ] {
            let theirs = x.as_tensor().clamp(0., max).unwrap();
            let (a, b): (Vec<f64>, Vec<f64>) = (
                ours.flatten_all().unwrap().to_vec1().unwrap(),
                theirs.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "forward, max {max}");
            let grads = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g: Vec<f64> = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let ps: Vec<f64> = probe.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..xs.len() {
                // torch: threshold_backward / hardtanh_backward, zero at the kinks.
                let expected = if xs[i] > 0. && xs[i] < max { ps[i] } else { 0. };
                assert_eq!(g[i], expected, "gradient at x = {}, max {max}", xs[i]);
            }
        }
    }

    #[test]
    fn add_relu_matches_the_separate_ops_with_gradients() {
        let a = input();
        let b = Var::randn(0f64, 2., (2, 4, 5), &Device::Cpu).unwrap();
        let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        let theirs = relu(&(a.as_tensor() + b.as_tensor()).unwrap()).unwrap();
        let probe = Tensor::randn(0f64, 1., (2, 4, 5), &Device::Cpu).unwrap();
        let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(flat(&ours), flat(&theirs));
        let grads = |t: &Tensor| (t * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(&ours), grads(&theirs));
        for v in [&a, &b] {
            assert_eq!(
                flat(g1.get(v.as_tensor()).unwrap()),
                flat(g2.get(v.as_tensor()).unwrap())
            );
        }
    }

    #[test]
    fn f32_relu_on_a_strided_input_matches_candle() {
        let x = Tensor::randn(0f32, 3., (3, 50, 70), &Device::Cpu).unwrap();
        let xt = x.transpose(1, 2).unwrap();
        let ours: Vec<f32> = relu(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let theirs: Vec<f32> = xt.relu().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn smooth_activations_match_composed_candle_ops_and_their_gradients() {
        // Away from the kinks of the hard ones (-3, 3), where every rule agrees.
        let v: Vec<f64> = (0..40).map(|i| (i as f64 - 19.5) * 0.37).collect();
        let x = Var::from_vec(v, (2, 4, 5), &Device::Cpu).unwrap();
        let probe = Tensor::randn(0f64, 1., (2, 4, 5), &Device::Cpu).unwrap();
        let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        for k in [Smooth::Silu, Smooth::HardSwish, Smooth::HardSigmoid] {
            let ours = k.apply(x.as_tensor()).unwrap();
            let theirs = k.composed(x.as_tensor()).unwrap();
            let grad = |t: &Tensor| {
                let g = (t * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                flat(g.get(x.as_tensor()).unwrap())
            };
            for (a, b) in flat(&ours).iter().zip(flat(&theirs)) {
                assert!((a - b).abs() < 1e-12, "{k:?} forward {a} {b}");
            }
            for (a, b) in grad(&ours).iter().zip(grad(&theirs)) {
                assert!((a - b).abs() < 1e-12, "{k:?} gradient {a} {b}");
            }
            // f32 goes through the same formulas in f32.
            let x32 = x.as_tensor().to_dtype(candle_core::DType::F32).unwrap();
            let y32: Vec<f32> = k
                .apply(&x32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in y32.iter().zip(flat(&theirs)) {
                assert!((*a as f64 - b).abs() < 1e-5, "{k:?} f32 {a} {b}");
            }
        }
        // PyTorch's rules at the kinks.
        assert_eq!(Smooth::HardSwish.slope(3.), 1.5);
        assert_eq!(Smooth::HardSwish.slope(-3.), -0.5);
        assert_eq!(Smooth::HardSigmoid.slope(3.), 0.);
    }
}
