//! Adam and AdamW as `torch.optim.Adam` / `torch.optim.AdamW` define them.
//!
//! Adam's weight decay is L2 (added to the gradient, so it passes through the moments); AdamW's is decoupled:
//! the parameter shrinks by `lr * wd` before the Adam step. AMSGrad keeps the running maximum of the second
//! moment and divides by it. `eps` is added after the bias-corrected square root, as PyTorch does.

use super::kernel::{by_float_dtype, map_cpu, Prologue, Real};
use super::{SlotReader, SlotWriter, UpdateRule};
use crate::Result;
use candle_core::Tensor;

/// Hyperparameters of Adam; `decoupled_weight_decay` makes it AdamW.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub amsgrad: bool,
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
}

/// Per-parameter state: step count, first and second moments, and (AMSGrad) the second moment's maximum.
#[derive(Debug, Clone)]
pub struct AdamState {
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub max_exp_avg_sq: Option<Tensor>,
}

/// One Adam step on one parameter.
///
/// `p <- p (1 - lr wd)` (decoupled) or `g <- g + wd p` (L2); `m <- b1 m + (1 - b1) g;
/// v <- b2 v + (1 - b2) g^2; v^ = max(v^, v)` (AMSGrad) `or v;
/// p <- p - (lr / (1 - b1^t)) m / (sqrt(v^) / sqrt(1 - b2^t) + eps)`.
pub fn adam_update(
    hp: &Adam,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &AdamState,
) -> Result<(Tensor, AdamState)> {
    let mut g = if hp.maximize {
        grad.neg()?
    } else {
        grad.clone()
    };
    let mut p = param.clone();
    if weight_decay != 0.0 {
        if hp.decoupled_weight_decay {
            p = p.affine(1.0 - lr * weight_decay, 0.0)?;
        } else {
            g = (g + p.affine(weight_decay, 0.0)?)?;
        }
    }
    let step = state.step + 1;
    let exp_avg = (state.exp_avg.affine(hp.beta1, 0.0)? + g.affine(1.0 - hp.beta1, 0.0)?)?;
    let exp_avg_sq =
        (state.exp_avg_sq.affine(hp.beta2, 0.0)? + g.sqr()?.affine(1.0 - hp.beta2, 0.0)?)?;
    let bias_correction1 = 1.0 - hp.beta1.powf(step as f64);
    let bias_correction2_sqrt = (1.0 - hp.beta2.powf(step as f64)).sqrt();
    let step_size = lr / bias_correction1;
    let max_exp_avg_sq = if hp.amsgrad {
        Some(match &state.max_exp_avg_sq {
            Some(prev) => prev.maximum(&exp_avg_sq)?,
            None => exp_avg_sq.clone(),
        })
    } else {
        None
    };
    let second = max_exp_avg_sq.as_ref().unwrap_or(&exp_avg_sq);
    let denom = second.sqrt()?.affine(1.0 / bias_correction2_sqrt, hp.eps)?;
    let p = (p - (&exp_avg / denom)?.affine(step_size, 0.0)?)?;
    Ok((
        p,
        AdamState {
            step,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
        },
    ))
}

/// [`adam_update`] in one fused pass on the CPU; `None` where [`map_cpu`] declines.
fn adam_fused<T: Real>(
    hp: &Adam,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &AdamState,
) -> Result<Option<(Tensor, AdamState)>> {
    let step = state.step + 1;
    let bias_correction2_sqrt = (1.0 - hp.beta2.powf(step as f64)).sqrt();
    let step_size = T::of(lr / (1.0 - hp.beta1.powf(step as f64)));
    let inv_bc2 = T::of(1.0 / bias_correction2_sqrt);
    let (b1, rest1, b2, rest2) = (
        T::of(hp.beta1),
        T::of(1.0 - hp.beta1),
        T::of(hp.beta2),
        T::of(1.0 - hp.beta2),
    );
    let eps = T::of(hp.eps);
    let prologue = Prologue::<T>::new(hp.maximize, lr, weight_decay, hp.decoupled_weight_decay);
    // One element: (p, g, m, v) -> (p with decay applied, m, v); the caller divides by the chosen second moment.
    let moments = move |p: T, g: T, m: T, v: T| {
        let (p, g) = prologue.apply(p, g);
        (p, m * b1 + g * rest1, v * b2 + g * g * rest2)
    };
    let apply = move |p: T, m: T, second: T| p - m / (second.sqrt() * inv_bc2 + eps) * step_size;
    let (m0, v0) = (&state.exp_avg, &state.exp_avg_sq);
    let out = match (&state.max_exp_avg_sq, hp.amsgrad) {
        (_, false) => map_cpu::<T, _, _>([param, grad, m0, v0], |[p, g, m, v]| {
            let (p, m, v) = moments(p, g, m, v);
            [apply(p, m, v), m, v]
        })?
        .map(|[p, m, v]| (p, m, v, None)),
        (None, true) => map_cpu::<T, _, _>([param, grad, m0, v0], |[p, g, m, v]| {
            let (p, m, v) = moments(p, g, m, v);
            [apply(p, m, v), m, v]
        })?
        .map(|[p, m, v]| (p, m, v.clone(), Some(v))),
        (Some(vmax0), true) => {
            map_cpu::<T, _, _>([param, grad, m0, v0, vmax0], |[p, g, m, v, vmax]| {
                let (p, m, v) = moments(p, g, m, v);
                let vmax = vmax.maximum(v);
                [apply(p, m, vmax), m, v, vmax]
            })?
            .map(|[p, m, v, vmax]| (p, m, v, Some(vmax)))
        }
    };
    Ok(out.map(|(p, exp_avg, exp_avg_sq, max_exp_avg_sq)| {
        (
            p,
            AdamState {
                step,
                exp_avg,
                exp_avg_sq,
                max_exp_avg_sq,
            },
        )
    }))
}

impl UpdateRule for Adam {
    type State = AdamState;

    fn family(&self) -> &'static str {
        "adam"
    }

    fn init(&self, param: &Tensor) -> Result<AdamState> {
        Ok(AdamState {
            step: 0,
            exp_avg: param.zeros_like()?,
            exp_avg_sq: param.zeros_like()?,
            max_exp_avg_sq: None,
        })
    }

    fn update(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &AdamState,
    ) -> Result<(Tensor, AdamState)> {
        adam_update(self, lr, weight_decay, param, grad, state)
    }

    fn update_fused(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &AdamState,
    ) -> Result<Option<(Tensor, AdamState)>> {
        by_float_dtype!(
            param,
            adam_fused(self, lr, weight_decay, param, grad, state)
        )
    }

    fn export(&self, state: &AdamState, out: &mut SlotWriter) {
        out.scalar("step", state.step as f64);
        out.tensor("exp_avg", &state.exp_avg);
        out.tensor("exp_avg_sq", &state.exp_avg_sq);
        if let Some(m) = &state.max_exp_avg_sq {
            out.tensor("max_exp_avg_sq", m);
        }
    }

    fn import(&self, src: &SlotReader) -> Result<Option<AdamState>> {
        let Some(step) = src.step()? else {
            return Ok(None);
        };
        let max_exp_avg_sq = if self.amsgrad && step > 0 {
            Some(src.required_tensor("max_exp_avg_sq")?)
        } else {
            None
        };
        Ok(Some(AdamState {
            step,
            exp_avg: src.required_tensor("exp_avg")?,
            exp_avg_sq: src.required_tensor("exp_avg_sq")?,
            max_exp_avg_sq,
        }))
    }

    fn momentum(&self) -> Option<f64> {
        Some(self.beta1)
    }

    fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        self.beta1 = momentum;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn adam(decoupled: bool) -> Adam {
        Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 0.0,
            amsgrad: false,
            decoupled_weight_decay: decoupled,
            maximize: false,
        }
    }

    #[test]
    fn first_step_moves_each_coordinate_by_lr() {
        let hp = adam(false);
        let p0 = Tensor::new(&[1.0f64, -1.0], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.3f64, -7.0], &Device::Cpu).unwrap();
        let (p1, s1) = adam_update(&hp, 0.1, 0.0, &p0, &g, &hp.init(&p0).unwrap()).unwrap();
        let got = p1.to_vec1::<f64>().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-12 && (got[1] + 0.9).abs() < 1e-12,
            "{got:?}"
        );
        assert_eq!(s1.step, 1);
    }

    #[test]
    fn adamw_decay_shrinks_the_parameter_before_the_step() {
        let hp = adam(true);
        let p0 = Tensor::new(&[2.0f64], &Device::Cpu).unwrap();
        let g = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        let (p1, _) = adam_update(&hp, 0.1, 0.5, &p0, &g, &hp.init(&p0).unwrap()).unwrap();
        // 2 * (1 - 0.05) - 0.1
        assert!((p1.to_vec1::<f64>().unwrap()[0] - 1.8).abs() < 1e-12);
    }
}
