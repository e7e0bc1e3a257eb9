//! Learning-rate schedules as pure functions of the step, and reduce-on-plateau, the one schedule that keeps
//! state because it decides from the validation loss.
//!
//! `step` counts optimizer steps from 0 (the step about to be taken) and `total_steps` is the length of the
//! run; the training loop calls `opt.step(&grads, schedule.lr_at(step, total))` and, for one-cycle,
//! `opt.set_momentum(m)` with `schedule.momentum_at(step, total)`.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

fn gamma_default() -> f64 {
    0.1
}
fn pct_start_default() -> f64 {
    0.3
}
fn div_factor_default() -> f64 {
    25.0
}
fn final_div_factor_default() -> f64 {
    1e4
}
fn true_default() -> bool {
    true
}
fn base_momentum_default() -> f64 {
    0.85
}
fn max_momentum_default() -> f64 {
    0.95
}

/// How one-cycle moves between its end points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anneal {
    /// Half a cosine: `end + (start - end) (1 + cos(pi pct)) / 2`.
    #[default]
    Cos,
    /// A straight line.
    Linear,
}

/// Where one-cycle's phases lie along the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OneCycleStyle {
    /// `torch.optim.lr_scheduler.OneCycleLR`: phase ends at step `pct_start * total - 1` (and
    /// `2 pct_start total - 2` with three phases) and `total - 1`, so the last step reaches the final value.
    #[default]
    Torch,
    /// fastai's `fit_one_cycle`: the position is `step / total`, phases split at `pct_start` (and `2 pct_start`).
    Fastai,
}

/// A learning-rate schedule as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// `lr` throughout.
    Constant { lr: f64 },
    /// `lr * gamma^floor(step / step_size)` (`StepLR`).
    Step {
        lr: f64,
        step_size: usize,
        #[serde(default = "gamma_default")]
        gamma: f64,
    },
    /// `lr * gamma^step` (`ExponentialLR`).
    Exponential { lr: f64, gamma: f64 },
    /// Linear warmup from 0 to `lr` over `warmup_steps`, then half a cosine from `lr` down to `min_lr` at
    /// `total_steps` (Hugging Face's `get_cosine_schedule_with_warmup`, with a floor).
    Cosine {
        lr: f64,
        #[serde(default)]
        warmup_steps: usize,
        #[serde(default)]
        min_lr: f64,
    },
    /// One-cycle: the learning rate rises from `max_lr / div_factor` to `max_lr` over the first `pct_start` of
    /// the run, then falls to `max_lr / div_factor / final_div_factor`; the momentum moves the opposite way
    /// between `max_momentum` and `base_momentum`. Defaults are `OneCycleLR`'s; see
    /// [`ScheduleConfig::fit_one_cycle`] for fastai's.
    OneCycle {
        max_lr: f64,
        #[serde(default = "pct_start_default")]
        pct_start: f64,
        #[serde(default = "div_factor_default")]
        div_factor: f64,
        #[serde(default = "final_div_factor_default")]
        final_div_factor: f64,
        #[serde(default)]
        anneal: Anneal,
        #[serde(default)]
        three_phase: bool,
        #[serde(default = "true_default")]
        cycle_momentum: bool,
        #[serde(default = "base_momentum_default")]
        base_momentum: f64,
        #[serde(default = "max_momentum_default")]
        max_momentum: f64,
        #[serde(default)]
        style: OneCycleStyle,
    },
    /// `lr` times the factor a [`ReduceOnPlateau`] built by [`ScheduleConfig::plateau`] decides.
    Plateau {
        lr: f64,
        #[serde(default)]
        plateau: PlateauConfig,
    },
}

/// One phase of one-cycle: where it ends and the learning rate and momentum at its two ends.
struct Phase {
    end: f64,
    lr: (f64, f64),
    momentum: (f64, f64),
}

impl ScheduleConfig {
    /// fastai's `fit_one_cycle(lr_max)`: `pct_start` 0.25, `div` 25, `div_final` 1e5, momenta
    /// (0.95, 0.85, 0.95), cosine, positions `step / total`. fastai ends at `lr_max / div_final`, PyTorch at
    /// `lr_max / div_factor / final_div_factor`, hence `final_div_factor = 1e5 / 25`.
    pub fn fit_one_cycle(lr_max: f64) -> Self {
        ScheduleConfig::OneCycle {
            max_lr: lr_max,
            pct_start: 0.25,
            div_factor: 25.0,
            final_div_factor: 1e5 / 25.0,
            anneal: Anneal::Cos,
            three_phase: false,
            cycle_momentum: true,
            base_momentum: 0.85,
            max_momentum: 0.95,
            style: OneCycleStyle::Fastai,
        }
    }

    /// Checks that the schedule can be evaluated (positive rates, factors and sizes).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| {
            Err(Error::config(
                format!("schedule {what}"),
                format!("{v} is out of range"),
            ))
        };
        match *self {
            ScheduleConfig::Constant { lr }
            | ScheduleConfig::Exponential { lr, .. }
            | ScheduleConfig::Plateau { lr, .. }
            | ScheduleConfig::Step { lr, .. }
            | ScheduleConfig::Cosine { lr, .. }
                if !(lr.is_finite() && lr >= 0.0) =>
            {
                bad("lr", lr)
            }
            ScheduleConfig::Step { step_size: 0, .. } => bad("step_size", 0.0),
            ScheduleConfig::OneCycle { max_lr, .. } if !(max_lr.is_finite() && max_lr > 0.0) => {
                bad("max_lr", max_lr)
            }
            ScheduleConfig::OneCycle {
                pct_start,
                three_phase,
                ..
            } if !(pct_start > 0.0 && pct_start < if three_phase { 0.5 } else { 1.0 }) => {
                bad("pct_start", pct_start)
            }
            ScheduleConfig::OneCycle {
                div_factor,
                final_div_factor,
                ..
            } if !(div_factor > 0.0 && final_div_factor > 0.0) => {
                bad("div_factor", div_factor.min(final_div_factor))
            }
            ScheduleConfig::Plateau { ref plateau, .. } => plateau.validate(),
            _ => Ok(()),
        }
    }

    /// The learning rate for step `step` (from 0) of a run of `total_steps` steps. For `Plateau` this is the
    /// base rate; multiply by [`ReduceOnPlateau::factor`].
    pub fn lr_at(&self, step: usize, total_steps: usize) -> f64 {
        match *self {
            ScheduleConfig::Constant { lr } | ScheduleConfig::Plateau { lr, .. } => lr,
            ScheduleConfig::Step {
                lr,
                step_size,
                gamma,
            } => lr * gamma.powi((step / step_size.max(1)) as i32),
            ScheduleConfig::Exponential { lr, gamma } => lr * gamma.powf(step as f64),
            ScheduleConfig::Cosine {
                lr,
                warmup_steps,
                min_lr,
            } => {
                if step < warmup_steps {
                    return lr * step as f64 / warmup_steps as f64;
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                min_lr + (lr - min_lr) * 0.5 * (1.0 + (PI * progress).cos())
            }
            ScheduleConfig::OneCycle { .. } => self.one_cycle_at(step, total_steps).0,
        }
    }

    /// The momentum (SGD momentum, Adam's beta1) for step `step`, for schedules that cycle it (one-cycle with
    /// `cycle_momentum`); `None` means leave the optimizer's momentum alone.
    pub fn momentum_at(&self, step: usize, total_steps: usize) -> Option<f64> {
        match *self {
            ScheduleConfig::OneCycle {
                cycle_momentum: true,
                ..
            } => Some(self.one_cycle_at(step, total_steps).1),
            _ => None,
        }
    }

    /// A fresh reduce-on-plateau decider for `Plateau` schedules.
    pub fn plateau(&self) -> Option<ReduceOnPlateau> {
        match self {
            ScheduleConfig::Plateau { plateau, .. } => Some(ReduceOnPlateau::new(plateau.clone())),
            _ => None,
        }
    }

    /// (learning rate, momentum) of one-cycle at `step`.
    fn one_cycle_at(&self, step: usize, total_steps: usize) -> (f64, f64) {
        let ScheduleConfig::OneCycle {
            max_lr,
            pct_start,
            div_factor,
            final_div_factor,
            anneal,
            three_phase,
            base_momentum,
            max_momentum,
            style,
            ..
        } = *self
        else {
            unreachable!("one_cycle_at is only called on OneCycle")
        };
        let initial_lr = max_lr / div_factor;
        let min_lr = initial_lr / final_div_factor;
        let total = total_steps.max(1) as f64;
        // Phase ends in the style's coordinate: steps for torch, fractions of the run for fastai.
        let (ends, pos): (Vec<f64>, f64) = match style {
            OneCycleStyle::Torch => {
                let ends = if three_phase {
                    vec![
                        pct_start * total - 1.0,
                        2.0 * pct_start * total - 2.0,
                        total - 1.0,
                    ]
                } else {
                    vec![pct_start * total - 1.0, total - 1.0]
                };
                (ends, (step as f64).min(total - 1.0))
            }
            OneCycleStyle::Fastai => {
                let ends = if three_phase {
                    vec![pct_start, 2.0 * pct_start, 1.0]
                } else {
                    vec![pct_start, 1.0]
                };
                (ends, (step as f64 / total).min(1.0))
            }
        };
        let phases: Vec<Phase> = if three_phase {
            vec![
                Phase {
                    end: ends[0],
                    lr: (initial_lr, max_lr),
                    momentum: (max_momentum, base_momentum),
                },
                Phase {
                    end: ends[1],
                    lr: (max_lr, initial_lr),
                    momentum: (base_momentum, max_momentum),
                },
                Phase {
                    end: ends[2],
                    lr: (initial_lr, min_lr),
                    momentum: (max_momentum, max_momentum),
                },
            ]
        } else {
            vec![
                Phase {
                    end: ends[0],
                    lr: (initial_lr, max_lr),
                    momentum: (max_momentum, base_momentum),
                },
                Phase {
                    end: ends[1],
                    lr: (max_lr, min_lr),
                    momentum: (base_momentum, max_momentum),
                },
            ]
        };
        let interpolate = |(start, end): (f64, f64), pct: f64| match anneal {
            Anneal::Cos => end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0),
            Anneal::Linear => (end - start) * pct + start,
        };
        let mut start = 0.0;
        let last = phases.len() - 1;
        for (i, phase) in phases.iter().enumerate() {
            // torch: `step <= end`; fastai: the phase whose interval [start, end) holds the position.
            let inside = match style {
                OneCycleStyle::Torch => pos <= phase.end,
                OneCycleStyle::Fastai => pos < phase.end,
            };
            if inside || i == last {
                let width = phase.end - start;
                let pct = if width > 0.0 {
                    ((pos - start) / width).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                return (interpolate(phase.lr, pct), interpolate(phase.momentum, pct));
            }
            start = phase.end;
        }
        unreachable!("the last phase always matches")
    }
}

/// Whether a lower or a higher metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    /// Lower is better (a loss).
    #[default]
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// Whether `threshold` is relative to the best value or absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMode {
    #[default]
    Rel,
    Abs,
}

/// Settings of reduce-on-plateau, `ReduceLROnPlateau`'s defaults. `min_factor` bounds the learning-rate
/// factor from below (PyTorch's `min_lr` divided by the base rate) and `eps` is the smallest change of the
/// factor worth making.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlateauConfig {
    pub mode: PlateauMode,
    pub factor: f64,
    pub patience: usize,
    pub threshold: f64,
    pub threshold_mode: ThresholdMode,
    pub cooldown: usize,
    pub min_factor: f64,
    pub eps: f64,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        PlateauConfig {
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 0,
            min_factor: 0.0,
            eps: 1e-8,
        }
    }
}

impl PlateauConfig {
    /// Checks `0 < factor < 1` and non-negative thresholds.
    pub fn validate(&self) -> Result<()> {
        if !(self.factor > 0.0 && self.factor < 1.0) {
            return Err(Error::config(
                "plateau factor",
                format!("{} must be in (0, 1)", self.factor),
            ));
        }
        if !(self.threshold >= 0.0 && self.min_factor >= 0.0 && self.eps >= 0.0) {
            return Err(Error::config(
                "plateau threshold/min_factor/eps",
                "must be non-negative".to_string(),
            ));
        }
        Ok(())
    }
}

/// Reduce-on-plateau as `ReduceLROnPlateau` decides it: after more than `patience` evaluations without an
/// improvement beyond `threshold`, the factor is multiplied by `factor` and a `cooldown` of evaluations is
/// observed. The whole struct is the state to checkpoint (serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReduceOnPlateau {
    pub config: PlateauConfig,
    /// The best metric so far, `None` before the first evaluation.
    pub best: Option<f64>,
    pub num_bad_epochs: usize,
    pub cooldown_counter: usize,
    /// The current learning-rate factor, 1 at the start.
    pub factor: f64,
}

impl ReduceOnPlateau {
    /// A decider that has seen nothing yet (factor 1).
    pub fn new(config: PlateauConfig) -> Self {
        ReduceOnPlateau {
            config,
            best: None,
            num_bad_epochs: 0,
            cooldown_counter: 0,
            factor: 1.0,
        }
    }

    /// The current learning-rate factor.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    fn is_better(&self, metric: f64) -> bool {
        let Some(best) = self.best else {
            return !metric.is_nan();
        };
        let c = &self.config;
        match (c.mode, c.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => metric < best * (1.0 - c.threshold),
            (PlateauMode::Min, ThresholdMode::Abs) => metric < best - c.threshold,
            (PlateauMode::Max, ThresholdMode::Rel) => metric > best * (1.0 + c.threshold),
            (PlateauMode::Max, ThresholdMode::Abs) => metric > best + c.threshold,
        }
    }

    /// Takes one validation metric and returns the learning-rate factor to use from now on.
    pub fn observe(&mut self, metric: f64) -> f64 {
        if self.is_better(metric) {
            self.best = Some(metric);
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > self.config.patience {
            let reduced = (self.factor * self.config.factor).max(self.config.min_factor);
            if self.factor - reduced > self.config.eps {
                self.factor = reduced;
            }
            self.cooldown_counter = self.config.cooldown;
            self.num_bad_epochs = 0;
        }
        self.factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn step_decay_drops_by_gamma_every_step_size() {
        let s = ScheduleConfig::Step {
            lr: 0.1,
            step_size: 30,
            gamma: 0.1,
        };
        assert!(close(s.lr_at(0, 100), 0.1));
        assert!(close(s.lr_at(29, 100), 0.1));
        assert!(close(s.lr_at(30, 100), 0.01));
        assert!(close(s.lr_at(95, 100), 1e-4));
    }

    #[test]
    fn exponential_is_gamma_to_the_step() {
        let s = ScheduleConfig::Exponential {
            lr: 2.0,
            gamma: 0.9,
        };
        assert!(close(s.lr_at(10, 100), 2.0 * 0.9f64.powi(10)));
    }

    #[test]
    fn cosine_warms_up_linearly_then_follows_half_a_cosine() {
        let s = ScheduleConfig::Cosine {
            lr: 1.0,
            warmup_steps: 10,
            min_lr: 0.1,
        };
        assert!(close(s.lr_at(0, 110), 0.0));
        assert!(close(s.lr_at(5, 110), 0.5));
        assert!(close(s.lr_at(10, 110), 1.0));
        // halfway through the cosine: (1 + 0.1) / 2
        assert!(close(s.lr_at(60, 110), 0.55));
        // a quarter: 0.1 + 0.9 (1 + cos(pi/4)) / 2
        assert!(close(
            s.lr_at(35, 110),
            0.1 + 0.45 * (1.0 + (PI / 4.0).cos())
        ));
        assert!(close(s.lr_at(110, 110), 0.1));
    }

    #[test]
    fn torch_one_cycle_hits_its_end_points_at_onecyclelr_steps() {
        // OneCycleLR(max_lr=1, total_steps=100): pct_start 0.3, peak at step 29, min_lr = 1/25/1e4 at step 99.
        let s: ScheduleConfig =
            serde_json::from_str(r#"{"kind":"one_cycle","max_lr":1.0}"#).unwrap();
        assert!(close(s.lr_at(0, 100), 0.04));
        assert!(close(s.momentum_at(0, 100).unwrap(), 0.95));
        assert!(close(s.lr_at(29, 100), 1.0));
        assert!(close(s.momentum_at(29, 100).unwrap(), 0.85));
        assert!(close(s.lr_at(99, 100), 0.04 / 1e4));
        assert!(close(s.momentum_at(99, 100).unwrap(), 0.95));
        // step 10 of phase 1 (length 29): 1 + (0.04 - 1)/2 (1 + cos(pi 10/29))
        let want = 1.0 + (0.04 - 1.0) / 2.0 * (1.0 + (PI * 10.0 / 29.0).cos());
        assert!(close(s.lr_at(10, 100), want));
        // step 64 of phase 2 (29..99, length 70, pct 0.5): midpoint of max_lr and min_lr
        assert!(close(s.lr_at(64, 100), (1.0 + 0.04 / 1e4) / 2.0));
    }

    #[test]
    fn torch_three_phase_one_cycle_returns_to_initial_then_anneals() {
        let s: ScheduleConfig = serde_json::from_str(
            r#"{"kind":"one_cycle","max_lr":1.0,"three_phase":true,"anneal":"linear"}"#,
        )
        .unwrap();
        // phase ends: 29, 58, 99
        assert!(close(s.lr_at(29, 100), 1.0));
        assert!(close(s.lr_at(58, 100), 0.04));
        assert!(close(s.lr_at(99, 100), 0.04 / 1e4));
        assert!(close(s.lr_at(43, 100), 1.0 + (0.04 - 1.0) * 14.0 / 29.0));
        assert!(close(s.momentum_at(80, 100).unwrap(), 0.95));
    }

    #[test]
    fn fastai_one_cycle_uses_the_fraction_of_training() {
        let s = ScheduleConfig::fit_one_cycle(1.0);
        // pos 0: lr_max/25, mom 0.95; pos 0.25: lr_max, mom 0.85; pos 0.625: halfway down
        assert!(close(s.lr_at(0, 100), 0.04));
        assert!(close(s.momentum_at(0, 100).unwrap(), 0.95));
        assert!(close(s.lr_at(25, 100), 1.0));
        assert!(close(s.momentum_at(25, 100).unwrap(), 0.85));
        assert!(close(s.lr_at(625, 1000), (1.0 + 1e-5) / 2.0));
        assert!(close(s.momentum_at(625, 1000).unwrap(), 0.9));
        // pos 0.125 in phase 1: 0.04 + (1 + cos(pi (1 - 0.5))) (1 - 0.04) / 2 (fastai's SchedCos)
        assert!(close(
            s.lr_at(125, 1000),
            0.04 + (1.0 + (PI * 0.5).cos()) * 0.96 / 2.0
        ));
    }

    #[test]
    fn constant_schedule_does_not_cycle_momentum() {
        assert_eq!(
            ScheduleConfig::Constant { lr: 0.1 }.momentum_at(3, 10),
            None
        );
    }

    #[test]
    fn plateau_reduces_after_patience_bad_epochs_then_cools_down() {
        let mut p = ReduceOnPlateau::new(PlateauConfig {
            patience: 2,
            cooldown: 1,
            factor: 0.5,
            ..PlateauConfig::default()
        });
        assert_eq!(p.observe(1.0), 1.0); // best = 1
        assert_eq!(p.observe(1.0), 1.0); // bad 1
        assert_eq!(p.observe(0.99995), 1.0); // not better by 1e-4 relative: bad 2
        assert_eq!(p.observe(1.2), 0.5); // bad 3 > 2: reduce, cooldown 1
        assert_eq!(p.observe(1.2), 0.5); // cooldown: bad count reset
        assert_eq!(p.observe(0.5), 0.5); // improvement
        let saved = serde_json::to_string(&p).unwrap();
        let restored: ReduceOnPlateau = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored, p);
    }

    #[test]
    fn plateau_never_goes_below_min_factor() {
        let mut p = ReduceOnPlateau::new(PlateauConfig {
            patience: 0,
            factor: 0.1,
            min_factor: 0.05,
            ..PlateauConfig::default()
        });
        p.observe(1.0);
        assert!(close(p.observe(2.0), 0.1));
        assert!(close(p.observe(2.0), 0.05));
        assert!(close(p.observe(2.0), 0.05));
    }

    #[test]
    fn schedule_config_is_plain_json() {
        let s: ScheduleConfig =
            serde_json::from_str(r#"{"kind":"plateau","lr":0.01,"plateau":{"patience":3}}"#)
                .unwrap();
        s.validate().unwrap();
        assert_eq!(s.plateau().unwrap().config.patience, 3);
        assert!(serde_json::from_str::<ScheduleConfig>(r#"{"kind":"step","lr":0.1}"#).is_err());
    }
}
