//! NAdam as `torch.optim.NAdam` defines it (Dozat 2016 with PyTorch's momentum schedule
//! `mu_t = b1 (1 - 0.5 * 0.96^(t psi))`, psi = `momentum_decay`), whose running product of `mu` is part of the
//! state and must be saved to resume exactly.

use super::kernel::{by_float_dtype, map_cpu, Prologue, Real};
use super::{SlotReader, SlotWriter, UpdateRule};
use crate::Result;
use candle_core::Tensor;

/// Hyperparameters of NAdam; `decoupled_weight_decay` makes it NAdamW.
#[derive(Debug, Clone, PartialEq)]
pub struct NAdam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub momentum_decay: f64,
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
}

/// Per-parameter state: step count, product of the momentum schedule so far, first and second moments.
#[derive(Debug, Clone)]
pub struct NAdamState {
    pub step: u64,
    pub mu_product: f64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// One NAdam step on one parameter.
///
/// `mu_t = b1 (1 - 0.5 * 0.96^(t psi)); P_t = prod mu_i; m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
/// d = sqrt(v / (1 - b2^t)) + eps; p <- p - lr (1 - mu_t) / (1 - P_t) g / d
/// - lr mu_{t+1} / (1 - P_t mu_{t+1}) m / d`.
pub fn nadam_update(
    hp: &NAdam,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &NAdamState,
) -> Result<(Tensor, NAdamState)> {
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
    let t = step as f64;
    let bias_correction2 = 1.0 - hp.beta2.powf(t);
    let mu = hp.beta1 * (1.0 - 0.5 * 0.96f64.powf(t * hp.momentum_decay));
    let mu_next = hp.beta1 * (1.0 - 0.5 * 0.96f64.powf((t + 1.0) * hp.momentum_decay));
    let mu_product = state.mu_product * mu;
    let mu_product_next = mu_product * mu_next;
    let exp_avg = (state.exp_avg.affine(hp.beta1, 0.0)? + g.affine(1.0 - hp.beta1, 0.0)?)?;
    let exp_avg_sq =
        (state.exp_avg_sq.affine(hp.beta2, 0.0)? + g.sqr()?.affine(1.0 - hp.beta2, 0.0)?)?;
    let denom = exp_avg_sq
        .affine(1.0 / bias_correction2, 0.0)?
        .sqrt()?
        .affine(1.0, hp.eps)?;
    let grad_coef = lr * (1.0 - mu) / (1.0 - mu_product);
    let avg_coef = lr * mu_next / (1.0 - mu_product_next);
    let num = (g.affine(grad_coef, 0.0)? + exp_avg.affine(avg_coef, 0.0)?)?;
    let p = (p - (num / denom)?)?;
    Ok((
        p,
        NAdamState {
            step,
            mu_product,
            exp_avg,
            exp_avg_sq,
        },
    ))
}

/// [`nadam_update`] in one fused pass on the CPU; `None` where [`map_cpu`] declines.
fn nadam_fused<T: Real>(
    hp: &NAdam,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &NAdamState,
) -> Result<Option<(Tensor, NAdamState)>> {
    let step = state.step + 1;
    let t = step as f64;
    let bias_correction2 = 1.0 - hp.beta2.powf(t);
    let mu = hp.beta1 * (1.0 - 0.5 * 0.96f64.powf(t * hp.momentum_decay));
    let mu_next = hp.beta1 * (1.0 - 0.5 * 0.96f64.powf((t + 1.0) * hp.momentum_decay));
    let mu_product = state.mu_product * mu;
    let grad_coef = T::of(lr * (1.0 - mu) / (1.0 - mu_product));
    let avg_coef = T::of(lr * mu_next / (1.0 - mu_product * mu_next));
    let inv_bc2 = T::of(1.0 / bias_correction2);
    let (b1, rest1, b2, rest2) = (
        T::of(hp.beta1),
        T::of(1.0 - hp.beta1),
        T::of(hp.beta2),
        T::of(1.0 - hp.beta2),
    );
    let eps = T::of(hp.eps);
    let prologue = Prologue::<T>::new(hp.maximize, lr, weight_decay, hp.decoupled_weight_decay);
    let out = map_cpu::<T, _, _>(
        [param, grad, &state.exp_avg, &state.exp_avg_sq],
        |[p, g, m, v]| {
            let (p, g) = prologue.apply(p, g);
            let m = m * b1 + g * rest1;
            let v = v * b2 + g * g * rest2;
            let denom = (v * inv_bc2).sqrt() + eps;
            [p - (g * grad_coef + m * avg_coef) / denom, m, v]
        },
    )?;
    Ok(out.map(|[p, exp_avg, exp_avg_sq]| {
        (
            p,
            NAdamState {
                step,
                mu_product,
                exp_avg,
                exp_avg_sq,
            },
        )
    }))
}

impl UpdateRule for NAdam {
    type State = NAdamState;

    fn family(&self) -> &'static str {
        "nadam"
    }

    fn init(&self, param: &Tensor) -> Result<NAdamState> {
        Ok(NAdamState {
            step: 0,
            mu_product: 1.0,
            exp_avg: param.zeros_like()?,
            exp_avg_sq: param.zeros_like()?,
        })
    }

    fn update(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &NAdamState,
    ) -> Result<(Tensor, NAdamState)> {
        nadam_update(self, lr, weight_decay, param, grad, state)
    }

    fn update_fused(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &NAdamState,
    ) -> Result<Option<(Tensor, NAdamState)>> {
        by_float_dtype!(
            param,
            nadam_fused(self, lr, weight_decay, param, grad, state)
        )
    }

    fn export(&self, state: &NAdamState, out: &mut SlotWriter) {
        out.scalar("step", state.step as f64);
        out.scalar("mu_product", state.mu_product);
        out.tensor("exp_avg", &state.exp_avg);
        out.tensor("exp_avg_sq", &state.exp_avg_sq);
    }

    fn import(&self, src: &SlotReader) -> Result<Option<NAdamState>> {
        let Some(step) = src.step()? else {
            return Ok(None);
        };
        Ok(Some(NAdamState {
            step,
            mu_product: src.required_scalar("mu_product")?,
            exp_avg: src.required_tensor("exp_avg")?,
            exp_avg_sq: src.required_tensor("exp_avg_sq")?,
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
