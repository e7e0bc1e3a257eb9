//! Finiteness checks: a weight or an output holding NaN or an infinity is refused where it is read or
//! computed, instead of flowing into scores that look like numbers (some kernels, ReLU and max-pool among
//! them, turn NaN into ordinary values, so a damaged file can even give plausible probabilities).

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Whether every element of `t` is finite (integer tensors always are). One pass over the tensor: `x * 0`
/// is 0 for every finite `x` and NaN for NaN and both infinities, so the sum of `t * 0` is finite exactly
/// when every element is (a plain sum could overflow on large finite values and refuse a good tensor).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(true);
    }
    let probe = t
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(probe.is_finite())
}

/// The rows of a `[N, ...]` float tensor (a batch of logits) that hold NaN or an infinity, in order; one pass,
/// as in [`all_finite`].
pub fn non_finite_rows(t: &Tensor) -> Result<Vec<usize>> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(Vec::new());
    }
    let probe: Vec<f64> = t
        .flatten_from(1)?
        .affine(0.0, 0.0)?
        .sum(1)?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    Ok(probe
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.is_finite())
        .map(|(i, _)| i)
        .collect())
}

/// Refuses a float tensor that holds NaN or an infinity, with an [`Error::NonFiniteTensor`] naming `name` and
/// `file`; integer tensors always pass ([`all_finite`]). Called on every tensor of the weights files
/// (safetensors and PyTorch) and deployment files graft reads, and on a run's weights before they are
/// exported.
pub fn ensure_finite(name: &str, t: &Tensor, file: &Path) -> Result<()> {
    if all_finite(t)? {
        Ok(())
    } else {
        Err(Error::NonFiniteTensor {
            name: name.to_string(),
            file: file.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_rows_holding_nan_or_infinities_are_found() {
        let t = Tensor::new(
            &[
                [1f32, 2.0],
                [f32::NAN, 0.0],
                [3e38, 3e38],
                [0.0, f32::NEG_INFINITY],
            ],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(non_finite_rows(&t).unwrap(), vec![1, 3]);
    }

    #[test]
    fn nan_and_infinities_are_refused_but_huge_finite_values_are_not() {
        let file = Path::new("w.safetensors");
        let huge = Tensor::new(&[3e38f32, 3e38, 3e38], &Device::Cpu).unwrap();
        ensure_finite("huge", &huge, file).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[1f32, bad, 2.0], &Device::Cpu).unwrap();
            let err = ensure_finite("conv.weight", &t, file)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("conv.weight") && err.contains("w.safetensors"),
                "{err}"
            );
        }
        let half = Tensor::new(&[1f32, f32::NAN], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert!(ensure_finite("h", &half, file).is_err());
        let ints = Tensor::new(&[i64::MAX, -1], &Device::Cpu).unwrap();
        ensure_finite("n", &ints, file).unwrap();
    }
}
