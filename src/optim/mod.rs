//! graft's optimizers, on candle tensors, matching `torch.optim` step for step.
//!
//! * One file per update rule, simplest first: [`sgd`] (plain, momentum, Nesterov), [`adagrad`], [`rmsprop`],
//!   [`adam`] (Adam, AdamW, AMSGrad), [`nadam`]. Each rule is a pure function
//!   `(hyperparameters, lr, weight decay, param, grad, state) -> (param, state)` over device tensors; PyTorch's
//!   definitions are the ones matched where textbooks differ (see `../shared/golden/optim/vectors.json`).
//!   On the CPU each rule also has the same arithmetic fused into one multi-threaded pass ([`kernel`]), used by
//!   default because a dozen single-threaded tensor ops per step cost several times more.
//! * [`groups`]: parameter groups by name, each with its own learning-rate multiplier and weight decay; a
//!   frozen parameter is simply in no group.
//! * [`config`]: [`OptimizerConfig`], the serde description (`kind` plus hyperparameters, PyTorch's defaults)
//!   that builds an [`Optimizer`].
//! * [`state`]: [`OptimState`], the optimizer's state as named tensors and scalars, saved to safetensors.
//! * [`schedule`]: learning-rate (and momentum) schedules as pure functions of the step, and the one stateful
//!   schedule, reduce-on-plateau. [`clip`]: gradient clipping.
//!
//! ```no_run
//! # fn main() -> graft::Result<()> {
//! use graft::optim::{groups, OptimizerConfig, ScheduleConfig};
//! # let varmap = candle_nn::VarMap::new();
//! # let loss: candle_core::Tensor = todo!();
//! // Stem frozen; layer1..layer3 at 1/100..1/10 of the rate, layer4 and the head at the full rate;
//! // no weight decay on biases and BatchNorm.
//! let stages = ["layer1.", "layer2.", "layer3.", "layer4.", "fc."];
//! let group_of = |name: &str| stages.iter().position(|s| name.starts_with(s)).map(|g| g.min(3));
//! let mults = groups::even_mults(0.01, 1.0, 4);
//! let groups = groups::discriminative_groups(groups::trainable_params(&varmap), group_of, &mults, true)?;
//! let mut opt = OptimizerConfig::from_kind("adamw")?.build(groups)?;
//! let schedule = ScheduleConfig::fit_one_cycle(1e-3);
//! let (step, total) = (0, 1000);
//! let mut grads = loss.backward()?;
//! graft::optim::clip_grad_norm(&mut grads, &opt.vars(), 1.0)?;
//! if let Some(m) = schedule.momentum_at(step, total) {
//!     opt.set_momentum(m)?;
//! }
//! opt.step(&grads, schedule.lr_at(step, total))?;
//! # Ok(()) }
//! ```

pub mod adagrad;
pub mod adam;
pub mod clip;
pub mod config;
pub mod groups;
pub mod kernel;
pub mod nadam;
pub mod rmsprop;
pub mod schedule;
pub mod sgd;
pub mod state;

pub use clip::{clip_grad_norm, clip_grad_value};
pub use config::OptimizerConfig;
pub use groups::{GroupSpec, ParamGroup};
pub use schedule::{PlateauConfig, ReduceOnPlateau, ScheduleConfig};
pub use state::{OptimState, SlotReader, SlotWriter};

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::{HashMap, HashSet};

/// How one step changes one parameter, and how that rule's per-parameter state is named.
///
/// The [`Optimizer`] does the bookkeeping (groups, learning-rate multipliers, skipping parameters without a
/// gradient, storing states); a rule only says how one step changes a parameter.
pub trait UpdateRule: std::fmt::Debug + Send + Sync + 'static {
    /// Per-parameter state (moments, accumulators, step count).
    type State: Clone + Send + Sync;

    /// The rule family, written into saved states so one family's state is never loaded into another.
    fn family(&self) -> &'static str;

    /// The state before the first step.
    fn init(&self, param: &Tensor) -> Result<Self::State>;

    /// One step: the new parameter and state. `lr` and `weight_decay` are the parameter's group values.
    fn update(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Tensor,
        grad: &Tensor,
        state: &Self::State,
    ) -> Result<(Tensor, Self::State)>;

    /// The same step as [`UpdateRule::update`] fused into one parallel pass ([`kernel::map_cpu`]), where the
    /// tensors allow it (contiguous f32/f64 on the CPU); `None` otherwise. The default has no fused form.
    fn update_fused(
        &self,
        _lr: f64,
        _weight_decay: f64,
        _param: &Tensor,
        _grad: &Tensor,
        _state: &Self::State,
    ) -> Result<Option<(Tensor, Self::State)>> {
        Ok(None)
    }

    /// Writes a state's tensors and scalars under their slot names.
    fn export(&self, state: &Self::State, out: &mut SlotWriter);

    /// Reads a state back; `Ok(None)` when nothing is stored for this parameter (it starts fresh), an error
    /// when what is stored is incomplete for this rule.
    fn import(&self, src: &SlotReader) -> Result<Option<Self::State>>;

    /// The momentum a one-cycle schedule cycles (SGD/RMSProp momentum, Adam's beta1), if the rule has one.
    fn momentum(&self) -> Option<f64>;

    /// Sets that momentum; an error for rules without one.
    fn set_momentum(&mut self, momentum: f64) -> Result<()>;
}

/// A rule together with the states of the parameters it has stepped; the object-safe face of [`UpdateRule`].
trait Engine: std::fmt::Debug + Send + Sync {
    fn family(&self) -> &'static str;
    fn set_fused(&mut self, fused: bool);
    fn step_param(
        &mut self,
        name: &str,
        var: &Var,
        grad: &Tensor,
        lr: f64,
        weight_decay: f64,
    ) -> Result<()>;
    fn export(&self, names: &[&str], out: &mut OptimState);
    fn import(&mut self, params: &[(&str, &Var)], src: &OptimState) -> Result<()>;
    fn momentum(&self) -> Option<f64>;
    fn set_momentum(&mut self, momentum: f64) -> Result<()>;
}

struct RuleEngine<R: UpdateRule> {
    rule: R,
    fused: bool,
    states: HashMap<String, R::State>,
}

impl<R: UpdateRule> std::fmt::Debug for RuleEngine<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleEngine")
            .field("rule", &self.rule)
            .field("fused", &self.fused)
            .field("params_with_state", &self.states.len())
            .finish()
    }
}

impl<R: UpdateRule> Engine for RuleEngine<R> {
    fn family(&self) -> &'static str {
        self.rule.family()
    }

    fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    fn step_param(
        &mut self,
        name: &str,
        var: &Var,
        grad: &Tensor,
        lr: f64,
        weight_decay: f64,
    ) -> Result<()> {
        // Detached: the update must not record a gradient graph through the parameter.
        let param = var.as_detached_tensor();
        let grad = grad.detach();
        let state = match self.states.get(name) {
            Some(s) => s.clone(),
            None => self.rule.init(&param)?,
        };
        let fused = if self.fused {
            self.rule
                .update_fused(lr, weight_decay, &param, &grad, &state)?
        } else {
            None
        };
        let (new_param, new_state) = match fused {
            Some(done) => done,
            None => self.rule.update(lr, weight_decay, &param, &grad, &state)?,
        };
        var.set_from(new_param)?;
        self.states.insert(name.to_string(), new_state);
        Ok(())
    }

    fn export(&self, names: &[&str], out: &mut OptimState) {
        for name in names {
            if let Some(s) = self.states.get(*name) {
                self.rule.export(
                    s,
                    &mut SlotWriter {
                        param: name,
                        state: out,
                    },
                );
            }
        }
    }

    fn import(&mut self, params: &[(&str, &Var)], src: &OptimState) -> Result<()> {
        let mut states = HashMap::new();
        for (name, var) in params {
            let reader = SlotReader {
                param: name,
                like: var.as_tensor(),
                state: src,
            };
            if let Some(s) = self.rule.import(&reader)? {
                states.insert(name.to_string(), s);
            }
        }
        self.states = states;
        Ok(())
    }

    fn momentum(&self) -> Option<f64> {
        self.rule.momentum()
    }

    fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        self.rule.set_momentum(momentum)
    }
}

/// An optimizer: an update rule, its parameter groups and the per-parameter state.
///
/// Built from an [`OptimizerConfig`]. Each [`Optimizer::step`] updates every grouped parameter that has a
/// gradient in the store, in place (`Var::set`), with all arithmetic on the parameter's device.
#[derive(Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    groups: Vec<ParamGroup>,
    engine: Box<dyn Engine>,
}

impl Optimizer {
    /// An optimizer following `config` over `groups`. A parameter may be in one group only.
    pub fn new(config: OptimizerConfig, groups: Vec<ParamGroup>) -> Result<Self> {
        let mut seen = HashSet::new();
        for g in &groups {
            if !(g.lr_mult.is_finite() && g.lr_mult >= 0.0) {
                return Err(Error::config(
                    format!("parameter group `{}`", g.name),
                    format!("lr_mult {} must be finite and non-negative", g.lr_mult),
                ));
            }
            for (name, _) in &g.params {
                if !seen.insert(name.as_str()) {
                    return Err(Error::config(
                        format!("parameter group `{}`", g.name),
                        format!("`{name}` is in more than one group"),
                    ));
                }
            }
        }
        let engine = config.engine()?;
        Ok(Optimizer {
            config,
            groups,
            engine,
        })
    }

    /// One step with base learning rate `lr` (each group uses `lr * lr_mult`). Parameters without a
    /// gradient in `grads` are left as they are, and so is their state.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let default_wd = self.config.weight_decay();
        for g in &self.groups {
            let group_lr = lr * g.lr_mult;
            let wd = g.weight_decay.unwrap_or(default_wd);
            for (name, var) in &g.params {
                if let Some(grad) = grads.get(var.as_tensor()) {
                    self.engine.step_param(name, var, grad, group_lr, wd)?;
                }
            }
        }
        Ok(())
    }

    /// Chooses the implementation, not the numbers (like PyTorch's `foreach`/`fused` flags): with `true`, the
    /// default, contiguous f32/f64 parameters on the CPU are updated in one fused multi-threaded pass
    /// ([`kernel::map_cpu`]); with `false`, or on other devices, by candle tensor ops. The two agree to
    /// rounding.
    pub fn set_fused(&mut self, fused: bool) {
        self.engine.set_fused(fused);
    }

    /// The configuration this optimizer was built from.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Every parameter this optimizer updates, in group order (e.g. for [`clip_grad_norm`]).
    pub fn vars(&self) -> Vec<Var> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(_, v)| v.clone()))
            .collect()
    }

    /// The current momentum (SGD/RMSProp momentum, Adam/NAdam beta1), `None` for AdaGrad.
    pub fn momentum(&self) -> Option<f64> {
        self.engine.momentum()
    }

    /// Sets the momentum for the following steps (one-cycle schedules); an error for AdaGrad.
    pub fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        self.engine.set_momentum(momentum)
    }

    /// Follows a schedule's momentum (`ScheduleConfig::momentum_at`) where this optimizer has momentum to cycle,
    /// as fastai's one-cycle does: SGD/RMSProp with momentum, the Adam family's beta1. AdaGrad, plain SGD and
    /// RMSProp without momentum keep theirs (cycling would turn on a momentum the user did not choose).
    pub fn follow_momentum(&mut self, momentum: Option<f64>) -> Result<()> {
        match (momentum, self.momentum()) {
            (Some(m), Some(current)) if current > 0.0 => self.set_momentum(m),
            _ => Ok(()),
        }
    }

    /// The state of every grouped parameter that has taken a step, named `<param>.<slot>`.
    pub fn state(&self) -> OptimState {
        let names: Vec<&str> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(n, _)| n.as_str()))
            .collect();
        let mut out = OptimState {
            rule: self.engine.family().to_string(),
            ..OptimState::default()
        };
        self.engine.export(&names, &mut out);
        out
    }

    /// Replaces the state with `state`: each grouped parameter takes its stored state, or starts fresh when
    /// `state` has none for it (it was frozen when the state was saved); stored states of parameters not in
    /// any group are ignored. An empty `OptimState::default()` resets every parameter to fresh state. On
    /// error the optimizer's state is unchanged.
    pub fn load_state(&mut self, state: &OptimState) -> Result<()> {
        let empty = state.tensors.is_empty() && state.scalars.is_empty();
        if state.rule != self.engine.family() && !(empty && state.rule.is_empty()) {
            return Err(Error::config(
                "optimizer state",
                format!(
                    "was saved by a `{}` optimizer, this one is `{}`",
                    state.rule,
                    self.engine.family()
                ),
            ));
        }
        let params: Vec<(&str, &Var)> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(n, v)| (n.as_str(), v)))
            .collect();
        self.engine.import(&params, state)
    }
}

fn boxed_engine<R: UpdateRule>(rule: R) -> Box<dyn Engine> {
    Box::new(RuleEngine {
        rule,
        fused: true,
        states: HashMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: f64) -> Var {
        Var::new(&[v], &Device::Cpu).unwrap()
    }

    fn value(v: &Var) -> f64 {
        v.as_tensor().to_vec1::<f64>().unwrap()[0]
    }

    #[test]
    fn each_group_uses_its_lr_multiplier_and_weight_decay() {
        let (a, b, c) = (var(1.0), var(1.0), var(1.0));
        let groups = vec![
            ParamGroup::new("inherits", vec![("a".into(), a.clone())]),
            ParamGroup::new("slow", vec![("b".into(), b.clone())]).with_lr_mult(0.5),
            ParamGroup::new("no_decay", vec![("c".into(), c.clone())]).with_weight_decay(0.0),
        ];
        let config = OptimizerConfig::Sgd {
            weight_decay: 0.1,
            maximize: false,
        };
        for fused in [true, false] {
            for v in [&a, &b, &c] {
                v.set(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap())
                    .unwrap();
            }
            let mut opt = config.build(groups.clone()).unwrap();
            opt.set_fused(fused);
            let mut grads = GradStore::default();
            for v in [&a, &b, &c] {
                grads.insert(v.as_tensor(), Tensor::new(&[1.0f64], &Device::Cpu).unwrap());
            }
            opt.step(&grads, 0.1).unwrap();
            // a: 1 - 0.1 (1 + 0.1); b: 1 - 0.05 (1 + 0.1); c: 1 - 0.1
            assert!(
                (value(&a) - 0.89).abs() < 1e-15,
                "fused {fused}: {}",
                value(&a)
            );
            assert!(
                (value(&b) - 0.945).abs() < 1e-15,
                "fused {fused}: {}",
                value(&b)
            );
            assert!(
                (value(&c) - 0.9).abs() < 1e-15,
                "fused {fused}: {}",
                value(&c)
            );
        }
    }

    #[test]
    fn a_parameter_in_two_groups_is_rejected() {
        let a = var(0.0);
        let groups = vec![
            ParamGroup::new("one", vec![("a".into(), a.clone())]),
            ParamGroup::new("two", vec![("a".into(), a)]),
        ];
        let err = OptimizerConfig::from_kind("adam")
            .unwrap()
            .build(groups)
            .unwrap_err();
        assert!(err.to_string().contains("`a`"), "{err}");
    }

    #[test]
    fn momentum_is_settable_except_for_adagrad() {
        let mut adam = OptimizerConfig::from_kind("adam")
            .unwrap()
            .build(vec![])
            .unwrap();
        assert_eq!(adam.momentum(), Some(0.9));
        adam.set_momentum(0.85).unwrap();
        assert_eq!(adam.momentum(), Some(0.85));
        let mut adagrad = OptimizerConfig::from_kind("adagrad")
            .unwrap()
            .build(vec![])
            .unwrap();
        assert_eq!(adagrad.momentum(), None);
        assert!(adagrad.set_momentum(0.9).is_err());
    }
}
