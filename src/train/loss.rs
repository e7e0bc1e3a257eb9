//! Classification loss: cross-entropy with optional label smoothing and class weights, defined exactly as
//! `torch.nn.functional.cross_entropy(logits, y, weight=w, label_smoothing=eps)` with mean reduction.

use crate::Result;
use candle_core::{DType, Tensor, D};

/// Mean cross-entropy of `logits` `[N, C]` against `targets` `[N]` (u32).
///
/// With weights `w` (`[C]`), PyTorch's definition: the NLL term is `sum_i w[y_i] nll_i / sum_i w[y_i]`, the
/// smoothing term `sum_i sum_c w[c] (-log p_ic) / C / sum_i w[y_i]`, and the loss
/// `(1 - eps) * nll + eps * smooth`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    label_smoothing: f64,
    class_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, c) = logits.dims2()?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = targets.to_dtype(DType::U32)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?; // [N]
    let (nll, smooth) = match class_weights {
        None => {
            let nll = picked.neg()?.mean_all()?;
            let smooth = (logp.sum(D::Minus1)?.neg()?.mean_all()? / c as f64)?;
            (nll, smooth)
        }
        Some(w) => {
            let w = w.to_dtype(logits.dtype())?;
            let wy = w.index_select(&targets, 0)?; // [N]
            let denom = wy.sum_all()?;
            let nll = picked.neg()?.mul(&wy)?.sum_all()?.div(&denom)?;
            let smooth = logp
                .broadcast_mul(&w.unsqueeze(0)?)?
                .sum_all()?
                .neg()?
                .div(&denom)?;
            let smooth = (smooth / c as f64)?;
            (nll, smooth)
        }
    };
    if label_smoothing == 0.0 {
        return Ok(nll);
    }
    Ok(((nll * (1.0 - label_smoothing))? + (smooth * label_smoothing)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn case() -> (Tensor, Tensor) {
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.1, -1.0, 3.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        (logits, y)
    }

    fn scalar(t: Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    // Expected values computed in float64 with Python from PyTorch's documented definition of
    // cross_entropy(weight=, label_smoothing=) (torch is not installed here).
    #[test]
    fn plain_cross_entropy_matches_torch() {
        let (l, y) = case();
        let v = scalar(cross_entropy(&l, &y, 0.0, None).unwrap());
        assert!((v - 1.717_572).abs() < 1e-3, "{v}");
    }

    #[test]
    fn label_smoothing_matches_torch() {
        let (l, y) = case();
        let v = scalar(cross_entropy(&l, &y, 0.1, None).unwrap());
        assert!((v - 1.729_238).abs() < 1e-3, "{v}");
    }

    #[test]
    fn class_weights_match_torch() {
        let (l, y) = case();
        let w = Tensor::new(&[2.0f32, 1.0, 0.5], &Device::Cpu).unwrap();
        let v = scalar(cross_entropy(&l, &y, 0.1, Some(&w)).unwrap());
        assert!((v - 2.082_031).abs() < 1e-3, "{v}");
    }
}
