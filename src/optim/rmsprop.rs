//! RMSProp as `torch.optim.RMSprop` defines it: `eps` outside the square root, the centered variant
//! subtracts the squared running mean of the gradient, and momentum accumulates the already-normalised step
//! (`b <- mu b + g / d`), with the learning rate applied outside the buffer.

use super::kernel::{by_float_dtype, map_cpu, Prologue, Real};
use super::{SlotReader, SlotWriter, UpdateRule};
use crate::Result;
use candle_core::Tensor;

/// Hyperparameters of RMSProp.
#[derive(Debug, Clone, PartialEq)]
pub struct RmsProp {
    pub alpha: f64,
    pub eps: f64,
    pub centered: bool,
    pub momentum: f64,
    pub maximize: bool,
}

/// Per-parameter state. `grad_avg` exists only when centered, `momentum_buffer` only with momentum.
#[derive(Debug, Clone)]
pub struct RmsPropState {
    pub step: u64,
    pub square_avg: Tensor,
    pub grad_avg: Option<Tensor>,
    pub momentum_buffer: Option<Tensor>,
}

/// One RMSProp step on one parameter.
///
/// `g <- g + wd p; v <- alpha v + (1 - alpha) g^2; d = sqrt(v - ga^2) + eps (centered, with
/// ga <- alpha ga + (1 - alpha) g) or sqrt(v) + eps; b <- mu b + g / d, p <- p - lr b (momentum) or
/// p <- p - lr g / d`.
pub fn rmsprop_update(
    hp: &RmsProp,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &RmsPropState,
) -> Result<(Tensor, RmsPropState)> {
    let mut g = if hp.maximize {
        grad.neg()?
    } else {
        grad.clone()
    };
    if weight_decay != 0.0 {
        g = (g + param.affine(weight_decay, 0.0)?)?;
    }
    let square_avg =
        (state.square_avg.affine(hp.alpha, 0.0)? + g.sqr()?.affine(1.0 - hp.alpha, 0.0)?)?;
    let (avg, grad_avg) = if hp.centered {
        let prev = match &state.grad_avg {
            Some(ga) => ga.clone(),
            None => g.zeros_like()?,
        };
        let ga = (&prev + (&g - &prev)?.affine(1.0 - hp.alpha, 0.0)?)?;
        ((&square_avg - ga.sqr()?)?.sqrt()?, Some(ga))
    } else {
        (square_avg.sqrt()?, None)
    };
    let avg = avg.affine(1.0, hp.eps)?;
    let (p, momentum_buffer) = if hp.momentum > 0.0 {
        let step = (g / avg)?;
        let buf = match &state.momentum_buffer {
            Some(b) => (b.affine(hp.momentum, 0.0)? + step)?,
            None => step,
        };
        ((param - buf.affine(lr, 0.0)?)?, Some(buf))
    } else {
        (
            (param - (g / avg)?.affine(lr, 0.0)?)?,
            state.momentum_buffer.clone(),
        )
    };
    Ok((
        p,
        RmsPropState {
            step: state.step + 1,
            square_avg,
            grad_avg,
            momentum_buffer,
        },
    ))
}

/// [`rmsprop_update`] in one fused pass on the CPU; `None` where [`map_cpu`] declines. Absent running
/// means and momentum buffers are zeros, as in PyTorch.
fn rmsprop_fused<T: Real>(
    hp: &RmsProp,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &RmsPropState,
) -> Result<Option<(Tensor, RmsPropState)>> {
    let (lr_t, eps) = (T::of(lr), T::of(hp.eps));
    let (alpha, rest, mu) = (T::of(hp.alpha), T::of(1.0 - hp.alpha), T::of(hp.momentum));
    let (centered, momentum) = (hp.centered, hp.momentum > 0.0);
    let prologue = Prologue::<T>::new(hp.maximize, lr, weight_decay, false);
    // The running mean and the momentum buffer take part only when used; absent ones start at zero.
    let ga0 = match (&state.grad_avg, centered) {
        (_, false) => None,
        (Some(ga), true) => Some(ga.clone()),
        (None, true) => Some(param.zeros_like()?),
    };
    let b0 = match (&state.momentum_buffer, momentum) {
        (_, false) => None,
        (Some(b), true) => Some(b.clone()),
        (None, true) => Some(param.zeros_like()?),
    };
    // One element: (p, g, v, ga, b) -> (p, v, ga, b), without branches so that it vectorises. `ga` and
    // `b` come in as zero and their results are dropped unless centered / momentum. Not centered, the
    // running mean is multiplied by 0 and `v - 0 * 0` is `v`; without momentum, `b = 0 * mu + g / avg`
    // is `g / avg`: both exact, the same values as the two separate expressions.
    let keep_mean = T::of(if centered { 1.0 } else { 0.0 });
    let elem = move |p: T, g: T, v: T, ga: T, b: T| {
        let (p, g) = prologue.apply(p, g);
        let v = v * alpha + g * g * rest;
        let ga = (ga + (g - ga) * rest) * keep_mean;
        let avg = (v - ga * ga).sqrt() + eps;
        let b = b * mu + g / avg;
        (p - b * lr_t, v, ga, b)
    };
    let sq = &state.square_avg;
    let (out, grad_avg, momentum_buffer) = match (&ga0, &b0) {
        (None, None) => {
            let out = map_cpu::<T, _, _>([param, grad, sq], |[p, g, v]| {
                let (p, v, _, _) = elem(p, g, v, T::zero(), T::zero());
                [p, v]
            })?;
            (
                out.map(|[p, v]| (p, v)),
                None,
                state.momentum_buffer.clone(),
            )
        }
        (Some(ga0), None) => match map_cpu::<T, _, _>([param, grad, sq, ga0], |[p, g, v, ga]| {
            let (p, v, ga, _) = elem(p, g, v, ga, T::zero());
            [p, v, ga]
        })? {
            Some([p, v, ga]) => (Some((p, v)), Some(ga), state.momentum_buffer.clone()),
            None => (None, None, None),
        },
        (None, Some(b0)) => match map_cpu::<T, _, _>([param, grad, sq, b0], |[p, g, v, b]| {
            let (p, v, _, b) = elem(p, g, v, T::zero(), b);
            [p, v, b]
        })? {
            Some([p, v, b]) => (Some((p, v)), None, Some(b)),
            None => (None, None, None),
        },
        (Some(ga0), Some(b0)) => {
            match map_cpu::<T, _, _>([param, grad, sq, ga0, b0], |[p, g, v, ga, b]| {
                let (p, v, ga, b) = elem(p, g, v, ga, b);
                [p, v, ga, b]
            })? {
                Some([p, v, ga, b]) => (Some((p, v)), Some(ga), Some(b)),
                None => (None, None, None),
            }
        }
    };
    Ok(out.map(|(p, square_avg)| {
        (
            p,
            RmsPropState {
                step: state.step + 1,
                square_avg,
                grad_avg,
                momentum_buffer,
            },
        )
    }))
}

impl UpdateRule for RmsProp {
    type State = RmsPropState;

    fn family(&self) -> &'static str {
        "rmsprop"
    }

    fn init(&self, param: &Tensor) -> Result<RmsPropState> {
        Ok(RmsPropState {
            step: 0,
            square_avg: param.zeros_like()?,
            grad_avg: None,
            momentum_buffer: None,
        })
    }

    fn update(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &RmsPropState,
    ) -> Result<(Tensor, RmsPropState)> {
        rmsprop_update(self, lr, weight_decay, param, grad, state)
    }

    fn update_fused(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &RmsPropState,
    ) -> Result<Option<(Tensor, RmsPropState)>> {
        by_float_dtype!(
            param,
            rmsprop_fused(self, lr, weight_decay, param, grad, state)
        )
    }

    fn export(&self, state: &RmsPropState, out: &mut SlotWriter) {
        out.scalar("step", state.step as f64);
        out.tensor("square_avg", &state.square_avg);
        if let Some(ga) = &state.grad_avg {
            out.tensor("grad_avg", ga);
        }
        if let Some(b) = &state.momentum_buffer {
            out.tensor("momentum_buffer", b);
        }
    }

    fn import(&self, src: &SlotReader) -> Result<Option<RmsPropState>> {
        let Some(step) = src.step()? else {
            return Ok(None);
        };
        let grad_avg = if self.centered {
            Some(src.required_tensor("grad_avg")?)
        } else {
            None
        };
        Ok(Some(RmsPropState {
            step,
            square_avg: src.required_tensor("square_avg")?,
            grad_avg,
            momentum_buffer: src.tensor("momentum_buffer")?,
        }))
    }

    fn momentum(&self) -> Option<f64> {
        Some(self.momentum)
    }

    fn set_momentum(&mut self, momentum: f64) -> crate::Result<()> {
        self.momentum = momentum;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_plain_step_is_lr_over_sqrt_one_minus_alpha() {
        let hp = RmsProp {
            alpha: 0.99,
            eps: 0.0,
            centered: false,
            momentum: 0.0,
            maximize: false,
        };
        let p0 = Tensor::new(&[0.0f64, 0.0], &Device::Cpu).unwrap();
        let g = Tensor::new(&[3.0f64, -2.0], &Device::Cpu).unwrap();
        let (p1, _) = rmsprop_update(&hp, 0.01, 0.0, &p0, &g, &hp.init(&p0).unwrap()).unwrap();
        let want = 0.01 / 0.01f64.sqrt();
        let got = p1.to_vec1::<f64>().unwrap();
        assert!(
            (got[0] + want).abs() < 1e-12 && (got[1] - want).abs() < 1e-12,
            "{got:?}"
        );
    }
}
