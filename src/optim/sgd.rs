//! Stochastic gradient descent: plain, with momentum (and dampening), and Nesterov, as `torch.optim.SGD`
//! defines them.
//!
//! PyTorch's momentum differs from the textbook `v <- mu v - lr g` in two ways that change the numbers: the
//! learning rate multiplies the buffer at the update, not inside it (so a learning-rate change takes effect at
//! once), and the first step copies the gradient into the buffer without dampening.

use super::kernel::{by_float_dtype, map_cpu, Real};
use super::{SlotReader, SlotWriter, UpdateRule};
use crate::Result;
use candle_core::Tensor;

/// Hyperparameters of SGD. `momentum == 0` is plain SGD.
#[derive(Debug, Clone, PartialEq)]
pub struct Sgd {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

/// Per-parameter state: the momentum buffer, absent until the first step with momentum.
#[derive(Debug, Clone, Default)]
pub struct SgdState {
    pub momentum_buffer: Option<Tensor>,
}

/// One SGD step on one parameter: returns the new parameter and state.
///
/// `g <- g + wd p; b <- g (first step) or mu b + (1 - dampening) g; g <- g + mu b (Nesterov) or b;
/// p <- p - lr g`.
pub fn sgd_update(
    hp: &Sgd,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &SgdState,
) -> Result<(Tensor, SgdState)> {
    let mut g = if hp.maximize {
        grad.neg()?
    } else {
        grad.clone()
    };
    if weight_decay != 0.0 {
        g = (g + param.affine(weight_decay, 0.0)?)?;
    }
    let mut next = state.clone();
    if hp.momentum != 0.0 {
        let buf = match &state.momentum_buffer {
            None => g.clone(),
            Some(b) => (b.affine(hp.momentum, 0.0)? + g.affine(1.0 - hp.dampening, 0.0)?)?,
        };
        g = if hp.nesterov {
            (g + buf.affine(hp.momentum, 0.0)?)?
        } else {
            buf.clone()
        };
        next.momentum_buffer = Some(buf);
    }
    Ok(((param - g.affine(lr, 0.0)?)?, next))
}

/// [`sgd_update`] in one fused pass on the CPU; `None` where [`map_cpu`] declines.
fn sgd_fused<T: Real>(
    hp: &Sgd,
    lr: f64,
    weight_decay: f64,
    param: &Tensor,
    grad: &Tensor,
    state: &SgdState,
) -> Result<Option<(Tensor, SgdState)>> {
    let (lr, wd, mu, keep) = (
        T::of(lr),
        T::of(weight_decay),
        T::of(hp.momentum),
        T::of(1.0 - hp.dampening),
    );
    let (maximize, decay, nesterov) = (hp.maximize, weight_decay != 0.0, hp.nesterov);
    let effective = move |p: T, g: T| {
        let g = if maximize { -g } else { g };
        if decay {
            g + p * wd
        } else {
            g
        }
    };
    let direction = move |g: T, b: T| if nesterov { g + b * mu } else { b };
    if hp.momentum == 0.0 {
        let out = map_cpu::<T, _, _>([param, grad], |[p, g]| [p - effective(p, g) * lr])?;
        return Ok(out.map(|[p]| (p, state.clone())));
    }
    let out = match &state.momentum_buffer {
        None => map_cpu::<T, _, _>([param, grad], |[p, g]| {
            let g = effective(p, g);
            [p - direction(g, g) * lr, g]
        })?,
        Some(buf) => map_cpu::<T, _, _>([param, grad, buf], |[p, g, b]| {
            let g = effective(p, g);
            let b = b * mu + g * keep;
            [p - direction(g, b) * lr, b]
        })?,
    };
    Ok(out.map(|[p, b]| {
        (
            p,
            SgdState {
                momentum_buffer: Some(b),
            },
        )
    }))
}

impl UpdateRule for Sgd {
    type State = SgdState;

    fn family(&self) -> &'static str {
        "sgd"
    }

    fn init(&self, _param: &Tensor) -> Result<SgdState> {
        Ok(SgdState::default())
    }

    fn update(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &SgdState,
    ) -> Result<(Tensor, SgdState)> {
        sgd_update(self, lr, weight_decay, param, grad, state)
    }

    fn update_fused(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &SgdState,
    ) -> Result<Option<(Tensor, SgdState)>> {
        by_float_dtype!(param, sgd_fused(self, lr, weight_decay, param, grad, state))
    }

    fn export(&self, state: &SgdState, out: &mut SlotWriter) {
        if let Some(b) = &state.momentum_buffer {
            out.tensor("momentum_buffer", b);
        }
    }

    fn import(&self, src: &SlotReader) -> Result<Option<SgdState>> {
        Ok(src.tensor("momentum_buffer")?.map(|b| SgdState {
            momentum_buffer: Some(b),
        }))
    }

    fn momentum(&self) -> Option<f64> {
        Some(self.momentum)
    }

    fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        self.momentum = momentum;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_vec1().unwrap()
    }

    #[test]
    fn plain_sgd_moves_against_the_gradient() {
        let hp = Sgd {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            maximize: false,
        };
        let (p, s) = sgd_update(
            &hp,
            0.5,
            0.0,
            &t(&[1.0, 2.0]),
            &t(&[2.0, -4.0]),
            &SgdState::default(),
        )
        .unwrap();
        assert_eq!(vals(&p), vec![0.0, 4.0]);
        assert!(s.momentum_buffer.is_none());
    }

    #[test]
    fn first_momentum_step_copies_the_gradient_without_dampening() {
        let hp = Sgd {
            momentum: 0.9,
            dampening: 0.5,
            nesterov: false,
            maximize: false,
        };
        let (p, s) =
            sgd_update(&hp, 1.0, 0.0, &t(&[0.0]), &t(&[1.0]), &SgdState::default()).unwrap();
        assert_eq!(vals(&p), vec![-1.0]);
        assert_eq!(vals(s.momentum_buffer.as_ref().unwrap()), vec![1.0]);
        // second step: b = 0.9 * 1 + 0.5 * 1
        let (p, s) = sgd_update(&hp, 1.0, 0.0, &p, &t(&[1.0]), &s).unwrap();
        assert!((vals(s.momentum_buffer.as_ref().unwrap())[0] - 1.4).abs() < 1e-15);
        assert!((vals(&p)[0] + 2.4).abs() < 1e-15);
    }

    #[test]
    fn maximize_climbs_the_gradient() {
        let hp = Sgd {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            maximize: true,
        };
        let (p, _) =
            sgd_update(&hp, 0.1, 0.0, &t(&[0.0]), &t(&[1.0]), &SgdState::default()).unwrap();
        assert!((vals(&p)[0] - 0.1).abs() < 1e-15);
    }
}
