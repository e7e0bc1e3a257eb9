//! AdaGrad as `torch.optim.Adagrad` defines it: the accumulator starts at `initial_accumulator_value`,
//! `eps` is added outside the square root, and `lr_decay` shrinks the step as `lr / (1 + (t - 1) lr_decay)`.

use super::kernel::{by_float_dtype, map_cpu, Real};
use super::{SlotReader, SlotWriter, UpdateRule};
use crate::{Error, Result};
use candle_core::Tensor;

/// Hyperparameters of AdaGrad.
#[derive(Debug, Clone, PartialEq)]
pub struct Adagrad {
    pub lr_decay: f64,
    pub initial_accumulator_value: f64,
    pub eps: f64,
    pub maximize: bool,
}

/// Per-parameter state: the step count and the running sum of squared gradients.
#[derive(Debug, Clone)]
pub struct AdagradState {
    pub step: u64,
    pub sum: Tensor,
}

/// One AdaGrad step on one parameter.
///
/// `g <- g + wd p; clr = lr / (1 + (t - 1) lr_decay); s <- s + g^2; p <- p - clr g / (sqrt(s) + eps)`.
pub fn adagrad_update(
    hp: &Adagrad,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &AdagradState,
) -> Result<(Tensor, AdagradState)> {
    let mut g = if hp.maximize {
        grad.neg()?
    } else {
        grad.clone()
    };
    if weight_decay != 0.0 {
        g = (g + param.affine(weight_decay, 0.0)?)?;
    }
    let step = state.step + 1;
    let clr = lr / (1.0 + (step - 1) as f64 * hp.lr_decay);
    let sum = (&state.sum + g.sqr()?)?;
    let std = sum.sqrt()?.affine(1.0, hp.eps)?;
    let p = (param - (g / std)?.affine(clr, 0.0)?)?;
    Ok((p, AdagradState { step, sum }))
}

/// [`adagrad_update`] in one fused pass on the CPU; `None` where [`map_cpu`] declines.
fn adagrad_fused<T: Real>(
    hp: &Adagrad,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &AdagradState,
) -> Result<Option<(Tensor, AdagradState)>> {
    let step = state.step + 1;
    let clr = T::of(lr / (1.0 + (step - 1) as f64 * hp.lr_decay));
    let (wd, eps, maximize, decay) = (
        T::of(weight_decay),
        T::of(hp.eps),
        hp.maximize,
        weight_decay != 0.0,
    );
    let out = map_cpu::<T, _, _>([param, grad, &state.sum], |[p, g, s]| {
        let g = if maximize { -g } else { g };
        let g = if decay { g + p * wd } else { g };
        let s = s + g * g;
        [p - g / (s.sqrt() + eps) * clr, s]
    })?;
    Ok(out.map(|[p, sum]| (p, AdagradState { step, sum })))
}

impl UpdateRule for Adagrad {
    type State = AdagradState;

    fn family(&self) -> &'static str {
        "adagrad"
    }

    fn init(&self, param: &Tensor) -> Result<AdagradState> {
        Ok(AdagradState {
            step: 0,
            sum: param
                .ones_like()?
                .affine(self.initial_accumulator_value, 0.0)?,
        })
    }

    fn update(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &AdagradState,
    ) -> Result<(Tensor, AdagradState)> {
        adagrad_update(self, lr, weight_decay, param, grad, state)
    }

    fn update_fused(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &AdagradState,
    ) -> Result<Option<(Tensor, AdagradState)>> {
        by_float_dtype!(
            param,
            adagrad_fused(self, lr, weight_decay, param, grad, state)
        )
    }

    fn export(&self, state: &AdagradState, out: &mut SlotWriter) {
        out.scalar("step", state.step as f64);
        out.tensor("sum", &state.sum);
    }

    fn import(&self, src: &SlotReader) -> Result<Option<AdagradState>> {
        let Some(step) = src.step()? else {
            return Ok(None);
        };
        Ok(Some(AdagradState {
            step,
            sum: src.required_tensor("sum")?,
        }))
    }

    fn momentum(&self) -> Option<f64> {
        None
    }

    fn set_momentum(&mut self, _momentum: f64) -> Result<()> {
        Err(Error::config(
            "momentum",
            "AdaGrad has no momentum to schedule",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn lr_decay_shrinks_the_second_step() {
        let hp = Adagrad {
            lr_decay: 1.0,
            initial_accumulator_value: 0.0,
            eps: 0.0,
            maximize: false,
        };
        let p0 = Tensor::new(&[0.0f64], &Device::Cpu).unwrap();
        let g = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        let s0 = hp.init(&p0).unwrap();
        let (p1, s1) = adagrad_update(&hp, 1.0, 0.0, &p0, &g, &s0).unwrap();
        // step 1: clr = 1, s = 1, p = -1
        assert_eq!(p1.to_vec1::<f64>().unwrap(), vec![-1.0]);
        let (p2, s2) = adagrad_update(&hp, 1.0, 0.0, &p1, &g, &s1).unwrap();
        // step 2: clr = 1/2, s = 2, p = -1 - 0.5/sqrt(2)
        let want = -1.0 - 0.5 / 2f64.sqrt();
        assert!((p2.to_vec1::<f64>().unwrap()[0] - want).abs() < 1e-15);
        assert_eq!(s2.step, 2);
    }
}
