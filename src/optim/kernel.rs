//! A fused elementwise pass for the CPU: reads N tensors and writes M new ones in one parallel sweep.
//!
//! On the CPU, candle runs each tensor op as its own single-threaded pass over memory, so an Adam step made of
//! a dozen ops costs a dozen sweeps over every parameter. The rules use [`map_cpu`] there instead: the same
//! arithmetic, per element, in one multi-threaded sweep, still returning new tensors (the rules stay pure).
//! Anything that is not contiguous f32/f64 on the CPU returns `None` and takes the tensor-op path, which runs
//! on any device.

use crate::Result;
use candle_core::{Storage, Tensor, WithDType};

/// The float types the fused pass handles.
pub trait Real:
    WithDType
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + PartialOrd
{
    fn sqrt(self) -> Self;
    fn maximum(self, other: Self) -> Self;
    /// `x` rounded to this type, as candle's `affine` rounds its scalars.
    fn of(x: f64) -> Self;
}

impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn maximum(self, other: Self) -> Self {
        if self >= other {
            self
        } else {
            other
        }
    }
    fn of(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn maximum(self, other: Self) -> Self {
        if self >= other {
            self
        } else {
            other
        }
    }
    fn of(x: f64) -> Self {
        x
    }
}

/// Elements per parallel work item: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 15;

/// Values per block of [`map_cpu`]'s inner loop (a multiple of every SIMD width; divides [`CHUNK`]).
const LANES: usize = 16;

/// Applies `f` to every element position of `inputs` (same shape, contiguous, dtype `T`, on the CPU) and
/// returns the `M` outputs as new tensors of that shape; `None` when the inputs do not qualify.
pub fn map_cpu<T: Real, const N: usize, const M: usize>(
    inputs: [&Tensor; N],
    f: impl Fn([T; N]) -> [T; M] + Sync,
) -> Result<Option<[Tensor; M]>> {
    let first = inputs[0];
    if !crate::device::custom_kernels_on(first.device()) || first.dtype() != T::DTYPE {
        return Ok(None);
    }
    let n = first.elem_count();
    let guards: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[T]> = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let (Some((start, end)), true) =
            (layout.contiguous_offsets(), layout.shape() == first.shape())
        else {
            return Ok(None);
        };
        let Ok(all) = cpu.as_slice::<T>() else {
            return Ok(None);
        };
        slices.push(&all[start..end]);
    }
    // One work item per chunk, holding that chunk of every output.
    let outs = crate::kernels::par::par_zeroed_n::<T, M>(n, CHUNK, |i, mut outs| {
        crate::kernels::simd::vectorized! {
            let base = i * CHUNK;
            let len = outs.first().map_or(0, |c| c.len());
            // Every operand cut to the chunk's length up front, so that the loop below indexes
            // fixed-length slices (no bounds checks; the compiler can vectorise it).
            let ins: [&[T]; N] = std::array::from_fn(|k| &slices[k][base..base + len]);
            // Blocks of LANES values copied into fixed-size arrays: the loop over a block's lanes has
            // no bounds checks left, so the compiler unrolls and vectorises `f` across it.
            let full = len - len % LANES;
            for j in (0..full).step_by(LANES) {
                let xs: [[T; LANES]; N] = std::array::from_fn(|k| {
                    let mut a = [T::zero(); LANES];
                    a.copy_from_slice(&ins[k][j..j + LANES]);
                    a
                });
                let mut ys = [[T::zero(); LANES]; M];
                for l in 0..LANES {
                    let y = f(std::array::from_fn(|k| xs[k][l]));
                    for (out, v) in ys.iter_mut().zip(y) {
                        out[l] = v;
                    }
                }
                for (out, y) in outs.iter_mut().zip(&ys) {
                    out[j..j + LANES].copy_from_slice(y);
                }
            }
            for j in full..len {
                let y = f(std::array::from_fn(|k| ins[k][j]));
                for (out, v) in outs.iter_mut().zip(y) {
                    out[j] = v;
                }
            }
        }
    });
    drop(guards);
    let shape = first.shape().clone();
    let mut tensors = Vec::with_capacity(M);
    for out in outs {
        tensors.push(Tensor::from_vec(out, shape.clone(), first.device())?);
    }
    Ok(Some(
        tensors
            .try_into()
            .unwrap_or_else(|_| unreachable!("M outputs")),
    ))
}

/// The per-element start shared by the fused adaptive rules, as factors instead of branches so that
/// the element function vectorises: the gradient's sign (`maximize`), L2 decay added to the gradient,
/// or decoupled decay (AdamW's) shrinking the parameter. A factor that does not apply is exact: a
/// multiplication by 1, or a term `p * 0`, which adds nothing for every finite `p`.
#[derive(Debug, Clone, Copy)]
pub struct Prologue<T> {
    sign: T,
    coupled: T,
    shrink: T,
}

impl<T: Real> Prologue<T> {
    pub fn new(maximize: bool, lr: f64, weight_decay: f64, decoupled: bool) -> Self {
        let decay = weight_decay != 0.0;
        Self {
            sign: T::of(if maximize { -1.0 } else { 1.0 }),
            coupled: T::of(if decay && !decoupled {
                weight_decay
            } else {
                0.0
            }),
            shrink: T::of(if decay && decoupled {
                1.0 - lr * weight_decay
            } else {
                1.0
            }),
        }
    }

    /// `(p, g)` -> the parameter after decoupled decay and the gradient the moments see.
    #[inline]
    pub fn apply(self, p: T, g: T) -> (T, T) {
        (p * self.shrink, g * self.sign + p * self.coupled)
    }
}

/// Runs `$body::<f32>` or `$body::<f64>` by the dtype of `$t`; other dtypes give `Ok(None)`.
macro_rules! by_float_dtype {
    ($t:expr, $body:ident ( $($arg:expr),* )) => {
        match $t.dtype() {
            candle_core::DType::F32 => $body::<f32>($($arg),*),
            candle_core::DType::F64 => $body::<f64>($($arg),*),
            _ => Ok(None),
        }
    };
}
pub(crate) use by_float_dtype;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn fused_map_matches_the_elementwise_definition_across_chunks() {
        let n = CHUNK * 2 + 17;
        let a = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        let b = a.affine(0.5, 1.0).unwrap();
        let [s, d] = map_cpu::<f32, 2, 2>([&a, &b], |[x, y]| [x + y, x - y])
            .unwrap()
            .unwrap();
        assert_eq!(
            s.to_vec1::<f32>().unwrap(),
            (&a + &b).unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            d.to_vec1::<f32>().unwrap(),
            (&a - &b).unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn non_contiguous_or_other_dtypes_decline() {
        let a = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let t = a.t().unwrap();
        assert!(map_cpu::<f32, 1, 1>([&t], |[x]| [x]).unwrap().is_none());
        assert!(map_cpu::<f64, 1, 1>([&a], |[x]| [x]).unwrap().is_none());
    }

    #[test]
    fn the_generic_path_declines_as_on_a_gpu() {
        let a = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        let declined = crate::device::with_generic_ops(|| {
            map_cpu::<f32, 1, 1>([&a], |[x]| [x]).unwrap().is_none()
        });
        assert!(declined);
    }
}
