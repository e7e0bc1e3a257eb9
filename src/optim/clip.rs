//! Gradient clipping, by global norm (`torch.nn.utils.clip_grad_norm_`) and by value
//! (`clip_grad_value_`), on the gradients of a `GradStore` before the optimizer step.

use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Scales the gradients of `vars` so that their joint L2 norm is at most `max_norm`, as PyTorch does
/// (`coef = max_norm / (norm + 1e-6)`, applied when below 1), and returns the norm before clipping.
///
/// The norm is reduced on the device (accumulated in f64); only that one scalar goes to the host. Variables
/// without a gradient are ignored; list each variable once. A non-finite norm leaves the gradients as they
/// are and is returned, so the caller can skip the step.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<f64> {
    let mut with_grad: Vec<&Tensor> = Vec::new();
    let mut sum_sq: Option<Tensor> = None;
    for var in vars {
        let t = var.as_tensor();
        if let Some(g) = grads.get(t) {
            let s = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
            sum_sq = Some(match sum_sq {
                None => s,
                Some(acc) => (acc + s)?,
            });
            with_grad.push(t);
        }
    }
    let Some(sum_sq) = sum_sq else {
        return Ok(0.0);
    };
    let total = sum_sq.to_scalar::<f64>()?.sqrt();
    let coef = max_norm / (total + 1e-6);
    if total.is_finite() && coef < 1.0 {
        for t in with_grad {
            if let Some(g) = grads.remove(t) {
                grads.insert(t, g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(total)
}

/// Clamps every gradient of `vars` to `[-clip_value, clip_value]`.
pub fn clip_grad_value<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    clip_value: f64,
) -> Result<()> {
    for var in vars {
        let t = var.as_tensor();
        if let Some(g) = grads.remove(t) {
            grads.insert(t, g.clamp(-clip_value, clip_value)?);
        }
    }
    Ok(())
}

/// Checks a `--clip-grad-norm` value: a positive, finite norm (a negative one would reverse every gradient, 0
/// would stop learning); `None` does not clip.
pub fn validate_max_norm(max: Option<f64>) -> Result<()> {
    match max {
        Some(c) if !(c > 0.0 && c.is_finite()) => Err(crate::Error::config(
            "--clip-grad-norm",
            format!("must be a positive norm, got {c} (leave the flag out to not clip)"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup() -> (Var, Var, GradStore) {
        let a = Var::new(&[0.0f32, 0.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let mut grads = GradStore::default();
        grads.insert(
            a.as_tensor(),
            Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap(),
        );
        grads.insert(
            b.as_tensor(),
            Tensor::new(&[-4.0f32], &Device::Cpu).unwrap(),
        );
        (a, b, grads)
    }

    #[test]
    fn global_norm_is_reported_and_gradients_scaled_to_max_norm() {
        let (a, b, mut grads) = setup();
        let norm = clip_grad_norm(&mut grads, [&a, &b], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let ga: Vec<f32> = grads.get(a.as_tensor()).unwrap().to_vec1().unwrap();
        let gb: Vec<f32> = grads.get(b.as_tensor()).unwrap().to_vec1().unwrap();
        let coef = 1.0 / (5.0 + 1e-6);
        assert!(
            (ga[0] as f64 - 3.0 * coef).abs() < 1e-6 && (gb[0] as f64 + 4.0 * coef).abs() < 1e-6
        );
    }

    #[test]
    fn norm_below_the_limit_leaves_gradients_alone() {
        let (a, b, mut grads) = setup();
        clip_grad_norm(&mut grads, [&a, &b], 10.0).unwrap();
        assert_eq!(
            grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 0.0]
        );
    }

    #[test]
    fn clip_by_value_clamps_each_entry() {
        let (a, b, mut grads) = setup();
        clip_grad_value(&mut grads, [&a, &b], 2.0).unwrap();
        assert_eq!(
            grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0, 0.0]
        );
        assert_eq!(
            grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![-2.0]
        );
    }
}
