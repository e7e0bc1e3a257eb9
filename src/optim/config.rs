//! [`OptimizerConfig`]: an optimizer as data, a `kind` plus hyperparameters with PyTorch's defaults, so the CLI,
//! checkpoints and hyperparameter search construct optimizers by name. The learning rate is not part of it: it
//! comes from the schedule at every step.

use super::adagrad::Adagrad;
use super::adam::Adam;
use super::nadam::NAdam;
use super::rmsprop::RmsProp;
use super::sgd::Sgd;
use super::{boxed_engine, Engine, Optimizer, ParamGroup};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}
fn momentum_default() -> f64 {
    0.9
}
fn alpha_default() -> f64 {
    0.99
}
fn eps_adagrad() -> f64 {
    1e-10
}
fn eps_default() -> f64 {
    1e-8
}
fn betas_default() -> [f64; 2] {
    [0.9, 0.999]
}
fn adamw_weight_decay() -> f64 {
    1e-2
}
fn momentum_decay_default() -> f64 {
    4e-3
}

/// An optimizer and its hyperparameters. Every field has PyTorch's default, except the momentum of the
/// `momentum` and `nesterov` kinds (0.9; PyTorch's SGD defaults to no momentum, which is kind `sgd`).
/// `weight_decay` is the default of groups that set none. `maximize` ascends instead of descending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Plain SGD: `p <- p - lr (g + wd p)`.
    Sgd {
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
    /// SGD with PyTorch's momentum and dampening.
    Momentum {
        #[serde(default = "momentum_default")]
        momentum: f64,
        #[serde(default)]
        dampening: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
    /// SGD with Nesterov momentum (no dampening, as PyTorch requires).
    Nesterov {
        #[serde(default = "momentum_default")]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
    /// AdaGrad.
    Adagrad {
        #[serde(default)]
        lr_decay: f64,
        #[serde(default)]
        initial_accumulator_value: f64,
        #[serde(default = "eps_adagrad")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
    /// RMSProp, optionally centered and with momentum.
    Rmsprop {
        #[serde(default = "alpha_default")]
        alpha: f64,
        #[serde(default = "eps_default")]
        eps: f64,
        #[serde(default)]
        centered: bool,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
    /// Adam with L2 weight decay, optionally AMSGrad.
    Adam {
        #[serde(default = "betas_default")]
        betas: [f64; 2],
        #[serde(default = "eps_default")]
        eps: f64,
        #[serde(default)]
        amsgrad: bool,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
    /// Adam with decoupled weight decay (PyTorch's default decay 0.01).
    Adamw {
        #[serde(default = "betas_default")]
        betas: [f64; 2],
        #[serde(default = "eps_default")]
        eps: f64,
        #[serde(default)]
        amsgrad: bool,
        #[serde(default = "adamw_weight_decay")]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
    /// NAdam with PyTorch's momentum schedule; `decoupled_weight_decay` makes it NAdamW.
    Nadam {
        #[serde(default = "betas_default")]
        betas: [f64; 2],
        #[serde(default = "eps_default")]
        eps: f64,
        #[serde(default = "momentum_decay_default")]
        momentum_decay: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default)]
        decoupled_weight_decay: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        maximize: bool,
    },
}

/// The kinds, in the order of the rules from simplest to most elaborate.
pub const KINDS: [&str; 8] = [
    "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam",
];

/// `torch.optim` keyword arguments that choose an implementation, not the numbers it computes.
const TORCH_IMPLEMENTATION_FLAGS: [&str; 4] = ["foreach", "fused", "differentiable", "capturable"];

impl OptimizerConfig {
    /// The configuration of kind `kind` with every hyperparameter at its default.
    pub fn from_kind(kind: &str) -> Result<Self> {
        serde_json::from_value(serde_json::json!({ "kind": kind })).map_err(|_| {
            Error::config(
                "optimizer",
                format!("unknown kind `{kind}`; known: {}", KINDS.join("|")),
            )
        })
    }

    /// The kind's name, as in [`KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "sgd",
            OptimizerConfig::Momentum { .. } => "momentum",
            OptimizerConfig::Nesterov { .. } => "nesterov",
            OptimizerConfig::Adagrad { .. } => "adagrad",
            OptimizerConfig::Rmsprop { .. } => "rmsprop",
            OptimizerConfig::Adam { .. } => "adam",
            OptimizerConfig::Adamw { .. } => "adamw",
            OptimizerConfig::Nadam { .. } => "nadam",
        }
    }

    /// The weight decay of groups that set none.
    pub fn weight_decay(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::Momentum { weight_decay, .. }
            | OptimizerConfig::Nesterov { weight_decay, .. }
            | OptimizerConfig::Adagrad { weight_decay, .. }
            | OptimizerConfig::Rmsprop { weight_decay, .. }
            | OptimizerConfig::Adam { weight_decay, .. }
            | OptimizerConfig::Adamw { weight_decay, .. }
            | OptimizerConfig::Nadam { weight_decay, .. } => weight_decay,
        }
    }

    /// PyTorch's default learning rate for this kind (1e-2 for AdaGrad and RMSProp, 2e-3 for NAdam, 1e-3
    /// otherwise), for callers that were given none.
    pub fn default_lr(&self) -> f64 {
        match self {
            OptimizerConfig::Adagrad { .. } | OptimizerConfig::Rmsprop { .. } => 1e-2,
            OptimizerConfig::Nadam { .. } => 2e-3,
            _ => 1e-3,
        }
    }

    /// Builds the runtime optimizer over `groups`.
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<Optimizer> {
        Optimizer::new(self.clone(), groups)
    }

    /// Checks ranges PyTorch checks (non-negative rates, betas in [0, 1), ...).
    pub fn validate(&self) -> Result<()> {
        let kind = self.kind();
        let check = |ok: bool, what: &str, v: f64| {
            if ok && v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(
                    format!("{kind} {what}"),
                    format!("{v} is out of range"),
                ))
            }
        };
        check(
            self.weight_decay() >= 0.0,
            "weight_decay",
            self.weight_decay(),
        )?;
        match *self {
            OptimizerConfig::Sgd { .. } => {}
            OptimizerConfig::Momentum {
                momentum,
                dampening,
                ..
            } => {
                check(momentum >= 0.0, "momentum", momentum)?;
                check(dampening.abs() <= 1.0, "dampening", dampening)?;
            }
            OptimizerConfig::Nesterov { momentum, .. } => check(
                momentum > 0.0,
                "momentum (Nesterov needs momentum > 0)",
                momentum,
            )?,
            OptimizerConfig::Adagrad {
                lr_decay,
                initial_accumulator_value,
                eps,
                ..
            } => {
                check(lr_decay >= 0.0, "lr_decay", lr_decay)?;
                check(
                    initial_accumulator_value >= 0.0,
                    "initial_accumulator_value",
                    initial_accumulator_value,
                )?;
                check(eps >= 0.0, "eps", eps)?;
            }
            OptimizerConfig::Rmsprop {
                alpha,
                eps,
                momentum,
                ..
            } => {
                check(alpha >= 0.0, "alpha", alpha)?;
                check(eps >= 0.0, "eps", eps)?;
                check(momentum >= 0.0, "momentum", momentum)?;
            }
            OptimizerConfig::Adam { betas, eps, .. }
            | OptimizerConfig::Adamw { betas, eps, .. }
            | OptimizerConfig::Nadam { betas, eps, .. } => {
                check((0.0..1.0).contains(&betas[0]), "betas[0]", betas[0])?;
                check((0.0..1.0).contains(&betas[1]), "betas[1]", betas[1])?;
                check(eps >= 0.0, "eps", eps)?;
            }
        }
        if let OptimizerConfig::Nadam { momentum_decay, .. } = *self {
            check(momentum_decay >= 0.0, "momentum_decay", momentum_decay)?;
        }
        Ok(())
    }

    /// The update rule, wrapped with an empty state table.
    pub(super) fn engine(&self) -> Result<Box<dyn Engine>> {
        self.validate()?;
        let sgd = |momentum, dampening, nesterov, maximize| Sgd {
            momentum,
            dampening,
            nesterov,
            maximize,
        };
        let adam = |betas: [f64; 2], eps, amsgrad, decoupled_weight_decay, maximize| Adam {
            beta1: betas[0],
            beta2: betas[1],
            eps,
            amsgrad,
            decoupled_weight_decay,
            maximize,
        };
        Ok(match *self {
            OptimizerConfig::Sgd { maximize, .. } => boxed_engine(sgd(0.0, 0.0, false, maximize)),
            OptimizerConfig::Momentum {
                momentum,
                dampening,
                maximize,
                ..
            } => boxed_engine(sgd(momentum, dampening, false, maximize)),
            OptimizerConfig::Nesterov {
                momentum, maximize, ..
            } => boxed_engine(sgd(momentum, 0.0, true, maximize)),
            OptimizerConfig::Adagrad {
                lr_decay,
                initial_accumulator_value,
                eps,
                maximize,
                ..
            } => boxed_engine(Adagrad {
                lr_decay,
                initial_accumulator_value,
                eps,
                maximize,
            }),
            OptimizerConfig::Rmsprop {
                alpha,
                eps,
                centered,
                momentum,
                maximize,
                ..
            } => boxed_engine(RmsProp {
                alpha,
                eps,
                centered,
                momentum,
                maximize,
            }),
            OptimizerConfig::Adam {
                betas,
                eps,
                amsgrad,
                maximize,
                ..
            } => boxed_engine(adam(betas, eps, amsgrad, false, maximize)),
            OptimizerConfig::Adamw {
                betas,
                eps,
                amsgrad,
                maximize,
                ..
            } => boxed_engine(adam(betas, eps, amsgrad, true, maximize)),
            OptimizerConfig::Nadam {
                betas,
                eps,
                momentum_decay,
                decoupled_weight_decay,
                maximize,
                ..
            } => boxed_engine(NAdam {
                beta1: betas[0],
                beta2: betas[1],
                eps,
                momentum_decay,
                decoupled_weight_decay,
                maximize,
            }),
        })
    }

    /// The configuration equivalent to a `torch.optim` optimizer: its class (`torch.optim.SGD`, `Adagrad`,
    /// `RMSprop`, `Adam`, `AdamW`, `NAdam`, with or without the module path) and its keyword arguments (the
    /// `defaults` of a param group). Returns the configuration and the `lr`, if given.
    ///
    /// Keyword arguments that only choose an implementation (`foreach`, `fused`, `differentiable`,
    /// `capturable`) are ignored; any other argument graft does not know is an error, so no setting is dropped
    /// silently.
    pub fn from_torch(
        class: &str,
        hyperparams: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(Self, Option<f64>)> {
        let class_name = class.rsplit('.').next().unwrap_or(class);
        let what = format!("torch optimizer {class}");
        let known: &[&str] = match class_name {
            "SGD" => &[
                "momentum",
                "dampening",
                "weight_decay",
                "nesterov",
                "maximize",
            ],
            "Adagrad" => &[
                "lr_decay",
                "initial_accumulator_value",
                "eps",
                "weight_decay",
                "maximize",
            ],
            "RMSprop" => &[
                "alpha",
                "eps",
                "centered",
                "momentum",
                "weight_decay",
                "maximize",
            ],
            "Adam" | "AdamW" => &[
                "betas",
                "eps",
                "amsgrad",
                "weight_decay",
                "maximize",
                "decoupled_weight_decay",
            ],
            "NAdam" => &[
                "betas",
                "eps",
                "momentum_decay",
                "weight_decay",
                "maximize",
                "decoupled_weight_decay",
            ],
            _ => {
                return Err(Error::config(
                    what,
                    "unsupported class; graft has SGD, Adagrad, RMSprop, Adam, AdamW, NAdam",
                ))
            }
        };
        let mut lr = None;
        for (k, v) in hyperparams {
            if k == "lr" {
                lr = Some(v.as_f64().ok_or_else(|| {
                    Error::config(what.clone(), format!("lr {v} is not a number"))
                })?);
            } else if !known.contains(&k.as_str())
                && !TORCH_IMPLEMENTATION_FLAGS.contains(&k.as_str())
            {
                return Err(Error::config(
                    what,
                    format!("unknown hyperparameter `{k}` = {v}"),
                ));
            }
        }
        let num = |k: &str, default: f64| -> Result<f64> {
            match hyperparams.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| {
                    Error::config(what.clone(), format!("`{k}` = {v} is not a number"))
                }),
            }
        };
        let flag = |k: &str, default: bool| -> Result<bool> {
            match hyperparams.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::config(what.clone(), format!("`{k}` = {v} is not a boolean"))
                }),
            }
        };
        let betas = || -> Result<[f64; 2]> {
            match hyperparams.get("betas") {
                None | Some(serde_json::Value::Null) => Ok(betas_default()),
                Some(v) => serde_json::from_value::<[f64; 2]>(v.clone()).map_err(|_| {
                    Error::config(what.clone(), format!("betas {v} are not two numbers"))
                }),
            }
        };
        let maximize = flag("maximize", false)?;
        let config = match class_name {
            "SGD" => {
                let momentum = num("momentum", 0.0)?;
                let dampening = num("dampening", 0.0)?;
                let weight_decay = num("weight_decay", 0.0)?;
                let nesterov = flag("nesterov", false)?;
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(Error::config(
                        what,
                        "Nesterov momentum requires a momentum and zero dampening",
                    ));
                }
                if nesterov {
                    OptimizerConfig::Nesterov {
                        momentum,
                        weight_decay,
                        maximize,
                    }
                } else if momentum != 0.0 {
                    OptimizerConfig::Momentum {
                        momentum,
                        dampening,
                        weight_decay,
                        maximize,
                    }
                } else {
                    OptimizerConfig::Sgd {
                        weight_decay,
                        maximize,
                    }
                }
            }
            "Adagrad" => OptimizerConfig::Adagrad {
                lr_decay: num("lr_decay", 0.0)?,
                initial_accumulator_value: num("initial_accumulator_value", 0.0)?,
                eps: num("eps", eps_adagrad())?,
                weight_decay: num("weight_decay", 0.0)?,
                maximize,
            },
            "RMSprop" => OptimizerConfig::Rmsprop {
                alpha: num("alpha", alpha_default())?,
                eps: num("eps", eps_default())?,
                centered: flag("centered", false)?,
                momentum: num("momentum", 0.0)?,
                weight_decay: num("weight_decay", 0.0)?,
                maximize,
            },
            "Adam" | "AdamW" => {
                let decoupled = class_name == "AdamW" || flag("decoupled_weight_decay", false)?;
                let default_wd = if class_name == "AdamW" {
                    adamw_weight_decay()
                } else {
                    0.0
                };
                let (betas, eps, amsgrad) = (
                    betas()?,
                    num("eps", eps_default())?,
                    flag("amsgrad", false)?,
                );
                let weight_decay = num("weight_decay", default_wd)?;
                if decoupled {
                    OptimizerConfig::Adamw {
                        betas,
                        eps,
                        amsgrad,
                        weight_decay,
                        maximize,
                    }
                } else {
                    OptimizerConfig::Adam {
                        betas,
                        eps,
                        amsgrad,
                        weight_decay,
                        maximize,
                    }
                }
            }
            _ => OptimizerConfig::Nadam {
                betas: betas()?,
                eps: num("eps", eps_default())?,
                momentum_decay: num("momentum_decay", momentum_decay_default())?,
                weight_decay: num("weight_decay", 0.0)?,
                decoupled_weight_decay: flag("decoupled_weight_decay", false)?,
                maximize,
            },
        };
        config.validate()?;
        Ok((config, lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_from_its_name_with_defaults() {
        for kind in KINDS {
            let cfg = OptimizerConfig::from_kind(kind).unwrap();
            assert_eq!(cfg.kind(), kind);
            cfg.build(vec![]).unwrap();
        }
    }

    #[test]
    fn defaults_are_pytorchs() {
        let adamw = OptimizerConfig::from_kind("adamw").unwrap();
        assert_eq!(
            adamw,
            OptimizerConfig::Adamw {
                betas: [0.9, 0.999],
                eps: 1e-8,
                amsgrad: false,
                weight_decay: 0.01,
                maximize: false
            }
        );
        let adagrad = OptimizerConfig::from_kind("adagrad").unwrap();
        assert!(matches!(adagrad, OptimizerConfig::Adagrad { eps, .. } if eps == 1e-10));
    }

    #[test]
    fn config_round_trips_through_json() {
        let cfg: OptimizerConfig =
            serde_json::from_str(r#"{"kind":"rmsprop","centered":true,"momentum":0.5}"#).unwrap();
        let back: OptimizerConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(cfg, back);
    }

    #[test]
    fn unknown_kind_and_unknown_field_are_rejected() {
        let err = OptimizerConfig::from_kind("lion").unwrap_err().to_string();
        assert!(err.contains("lion") && err.contains("nadam"), "{err}");
        assert!(serde_json::from_str::<OptimizerConfig>(r#"{"kind":"adam","beta":0.9}"#).is_err());
    }

    #[test]
    fn torch_sgd_becomes_the_matching_kind() {
        let hp = |s: &str| serde_json::from_str::<serde_json::Map<_, _>>(s).unwrap();
        let (c, lr) =
            OptimizerConfig::from_torch("torch.optim.SGD", &hp(r#"{"lr":0.1,"foreach":null}"#))
                .unwrap();
        assert_eq!(c.kind(), "sgd");
        assert_eq!(lr, Some(0.1));
        let (c, _) =
            OptimizerConfig::from_torch("SGD", &hp(r#"{"momentum":0.9,"nesterov":true}"#)).unwrap();
        assert_eq!(c.kind(), "nesterov");
        let (c, _) =
            OptimizerConfig::from_torch("Adam", &hp(r#"{"decoupled_weight_decay":true}"#)).unwrap();
        assert_eq!(c.kind(), "adamw");
        let err = OptimizerConfig::from_torch("SGD", &hp(r#"{"lookahead":3}"#)).unwrap_err();
        assert!(err.to_string().contains("lookahead"), "{err}");
        assert!(OptimizerConfig::from_torch("torch.optim.LBFGS", &hp("{}")).is_err());
    }

    #[test]
    fn nesterov_without_momentum_is_rejected() {
        let cfg = OptimizerConfig::Nesterov {
            momentum: 0.0,
            weight_decay: 0.0,
            maximize: false,
        };
        assert!(cfg.build(vec![]).is_err());
    }
}
