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
    /// `x * Φ(x) = x / 2 * (1 + erf(x / √2))`: the exact GELU (PyTorch's `nn.GELU()`, ConvNeXt's and the
    /// Vision Transformer's), in f32 through [`erf_f32`] (vectorised).
    Gelu,
}

/// `1 / √2`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / √(2π)`, the standard normal density's constant.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `e^x` in f32 without a call to libm, so that the loops it is inlined into vectorise (libm's `expf` is
/// one scalar call per value: the GELU of a ConvNeXt forward spent ~13% of its time in libm's `erff`).
/// Cephes' `expf`: `x = n ln 2 + r` (ln 2 in two parts), a degree-6 polynomial for `e^r` on
/// `|r| <= ln 2 / 2`, `2^n` from the exponent bits; about 1 ulp. Inputs are clamped to
/// `[-87.3, 88.7]`, where `2^n` stays a normal number (so `e^-100` gives 1.2e-38, not 0); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.722_83);
    // Round to nearest by adding and subtracting 1.5 * 2^23 (plain adds: `floor` is a libm call in the
    // baseline build, which kept the loops scalar).
    const ROUND: f32 = 12_582_912.;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes' 5.0000001e-1, which rounds to 0.5 in f32
    let y = p * r * r + r + 1.;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `erf(x)` in f32, vectorisable: Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), the
/// formula PyTorch's vectorised CPU `erf` (and so its exact GELU) uses.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1. / (1. + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1. - poly * exp_f32(-a * a)).copysign(x)
}

impl Smooth {
    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Smooth::Silu => x / (1. + (-x).exp()),
            Smooth::HardSwish => x * (x + 3.).clamp(0., 6.) * (1. / 6.),
            Smooth::HardSigmoid => (x + 3.).clamp(0., 6.) * (1. / 6.),
            Smooth::Gelu => 0.5 * x * (1. + erf_f32(x * FRAC_1_SQRT_2)),
        }
    }

    /// `d value / dx`, with PyTorch's rules at the kinks: `hardswish_backward` is `x / 3 + 0.5` on
    /// `[-3, 3]` (0 below, 1 above); `hardsigmoid_backward` is `1 / 6` strictly inside `(-3, 3)`.
    #[inline(always)]
    fn slope(self, x: f32) -> f32 {
        match self {
            Smooth::Gelu => {
                0.5 * (1. + erf_f32(x * FRAC_1_SQRT_2))
                    + x * FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x)
            }
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
            Smooth::Gelu => 0.5 * x * (1. + candle_core::cpu::erf::erf_f64(x / 2f64.sqrt())),
        }
    }

    #[inline(always)]
    fn slope64(self, x: f64) -> f64 {
        match self {
            Smooth::Gelu => {
                0.5 * (1. + candle_core::cpu::erf::erf_f64(x / 2f64.sqrt()))
                    + x * (-0.5 * x * x).exp() / (2. * std::f64::consts::PI).sqrt()
            }
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
            Smooth::Gelu => x.gelu_erf(),
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
        par_map(
            a,
            b,
            #[inline(always)]
            move |a, b| T::from_f64(f64_fn(a.to_f64(), b.to_f64())),
        )
    } else {
        par_map(
            a,
            b,
            #[inline(always)]
            move |a, b| T::from_f64(f32_fn(a.to_f64() as f32, b.to_f64() as f32) as f64),
        )
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

/// The exact (erf) GELU, `x * Φ(x)`, differentiable. Runs candle's `gelu_erf` on other devices.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    Smooth::Gelu.apply(x)
}

/// `relu6(x + 3) / 6` (MobileNetV3's squeeze-excite gate), differentiable with PyTorch's rule.
pub fn hard_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    Smooth::HardSigmoid.apply(x)
}

struct SmoothOp(Smooth);

impl SmoothOp {
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape) -> (CpuStorage, Shape) {
        // One loop per kind, its kind a constant, so that each loop inlines and vectorises its formula.
        macro_rules! map {
            ($k:expr) => {
                par_map(
                    x,
                    x,
                    #[inline(always)]
                    move |v, _| $k.value_of(v),
                )
            };
        }
        let y = match self.0 {
            Smooth::Silu => map!(Smooth::Silu),
            Smooth::HardSwish => map!(Smooth::HardSwish),
            Smooth::HardSigmoid => map!(Smooth::HardSigmoid),
            Smooth::Gelu => map!(Smooth::Gelu),
        };
        (T::to_cpu_storage_owned(y), shape.clone())
    }
}

impl CustomOp1 for SmoothOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Smooth::Silu => "graft-silu",
            Smooth::HardSwish => "graft-hard-swish",
            Smooth::HardSigmoid => "graft-hard-sigmoid",
            Smooth::Gelu => "graft-gelu",
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
        // As in [`SmoothOp::run`]: one loop per kind.
        macro_rules! map {
            ($k:expr) => {
                smooth_map(
                    g,
                    x,
                    #[inline(always)]
                    move |g, x| g * $k.slope(x),
                    #[inline(always)]
                    move |g, x| g * $k.slope64(x),
                )
            };
        }
        let gx = match self.kind {
            Smooth::Silu => map!(Smooth::Silu),
            Smooth::HardSwish => map!(Smooth::HardSwish),
            Smooth::HardSigmoid => map!(Smooth::HardSigmoid),
            Smooth::Gelu => map!(Smooth::Gelu),
        };
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
        for k in [
            Smooth::Silu,
            Smooth::HardSwish,
            Smooth::HardSigmoid,
            Smooth::Gelu,
        ] {
            let ours = k.apply(x.as_tensor()).unwrap();
            let theirs = k.composed(x.as_tensor()).unwrap();
            let grad = |t: &Tensor| {
                let g = (t * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                flat(g.get(x.as_tensor()).unwrap())
            };
            for (a, b) in flat(&ours).iter().zip(flat(&theirs)) {
                assert!((a - b).abs() < 1e-12, "{k:?} forward {a} {b}");
            }
            // candle's f64 GELU backward rounds 1/sqrt(2 pi) to 0.398942, ~1e-6 relative (ours is checked against
            // central differences below).
            let tol = if k == Smooth::Gelu { 1e-6 } else { 1e-12 };
            for (a, b) in grad(&ours).iter().zip(grad(&theirs)) {
                assert!((a - b).abs() < tol, "{k:?} gradient {a} {b}");
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

    /// The vectorisable `exp` and `erf` against f64 over their whole useful range.
    #[test]
    fn fast_exp_and_erf_are_accurate() {
        let (mut worst_exp, mut worst_erf) = (0f64, 0f64);
        for i in 0..200_001 {
            // The f32 argument's own value, so that its rounding is not counted.
            let x = (-87. + 175. * i as f64 / 200_000.) as f32 as f64;
            let e = exp_f32(x as f32) as f64;
            worst_exp = worst_exp.max((e - x.exp()).abs() / x.exp());
            let z = -6. + 12. * i as f64 / 200_000.;
            let r = candle_core::cpu::erf::erf_f64(z);
            worst_erf = worst_erf.max((erf_f32(z as f32) as f64 - r).abs());
        }
        assert!(worst_exp < 4e-7, "exp relative error {worst_exp}");
        // 1.5e-7 in exact arithmetic, plus f32's rounding (PyTorch's vectorised erf is the same).
        assert!(worst_erf < 6e-7, "erf absolute error {worst_erf}");
        assert!(exp_f32(f32::NEG_INFINITY) < 1.2e-38);
        assert!(exp_f32(f32::NAN).is_nan() && erf_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(0.), 0.);
        // GELU's slope against a central difference in f64.
        for x in [-4.0f32, -1.3, -0.2, 0., 0.7, 2.5] {
            let h = 1e-6;
            let fd = (Smooth::Gelu.value64(x as f64 + h) - Smooth::Gelu.value64(x as f64 - h))
                / (2. * h);
            assert!((Smooth::Gelu.slope(x) as f64 - fd).abs() < 1e-6, "{x}");
            assert!((Smooth::Gelu.slope64(x as f64) - fd).abs() < 1e-8, "{x}");
        }
    }
}
