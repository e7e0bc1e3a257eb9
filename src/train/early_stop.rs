//! Early stopping as a policy: it watches one validation number per epoch and *decides*; the training loop acts
//! on the [`Decision`] (saves the best checkpoint when `improved`, stops and restores the best weights on `Stop`).
//!
//! Semantics follow Keras's `EarlyStopping`: an epoch improves when it beats the best value so far by more than
//! `min_delta` (absolute); after `patience` epochs in a row without improvement training stops. Its state is plain
//! serde data that goes into the checkpoint, so a resumed run keeps counting where it stopped.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The validation number to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// Lower is better.
    #[value(name = "val_loss")]
    ValLoss,
    /// Higher is better.
    #[value(name = "val_acc")]
    ValAcc,
}

impl Monitor {
    /// True when `value` beats `best` by more than `min_delta`.
    fn improves(self, value: f64, best: f64, min_delta: f64) -> bool {
        match self {
            Monitor::ValLoss => value < best - min_delta,
            Monitor::ValAcc => value > best + min_delta,
        }
    }

    /// The watched number of an epoch's record.
    pub fn value(self, m: &crate::train::metrics::EpochMetrics) -> f64 {
        match self {
            Monitor::ValLoss => m.val_loss,
            Monitor::ValAcc => m.val_acc,
        }
    }
}

impl fmt::Display for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAcc => "val_acc",
        })
    }
}

impl FromStr for Monitor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "val_loss" => Ok(Monitor::ValLoss),
            "val_acc" => Ok(Monitor::ValAcc),
            _ => Err(Error::config(
                "--monitor",
                format!("`{s}` cannot be monitored; use val_loss or val_acc"),
            )),
        }
    }
}

/// What the loop should do after an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    /// Keep training; `improved` means this epoch is the new best and its weights should be saved as such.
    Continue { improved: bool },
    /// Stop now and restore the weights of `best_epoch`.
    Stop { reason: String, best_epoch: usize },
}

/// Everything early stopping remembers between epochs; saved in the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopState {
    /// Best value seen and the epoch that reached it.
    pub best: Option<(usize, f64)>,
    /// Epochs in a row without improvement.
    pub epochs_without_improvement: usize,
}

/// The early-stopping policy. With `patience: None` it never stops but still reports improvements, so the loop
/// keeps a best checkpoint either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub monitor: Monitor,
    pub patience: Option<usize>,
    pub min_delta: f64,
    pub state: EarlyStopState,
}

impl EarlyStopping {
    /// A fresh policy; `min_delta` must be finite and non-negative.
    pub fn new(monitor: Monitor, patience: Option<usize>, min_delta: f64) -> Result<Self> {
        if !(min_delta.is_finite() && min_delta >= 0.0) {
            return Err(Error::config(
                "--min-delta",
                format!("{min_delta} must be a non-negative number"),
            ));
        }
        Ok(EarlyStopping {
            monitor,
            patience,
            min_delta,
            state: EarlyStopState::default(),
        })
    }

    /// The best epoch and its value so far.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.state.best
    }

    /// Takes the watched value of `epoch` and decides.
    ///
    /// A non-finite value (a diverged loss) stops at once: no later epoch can be trusted to recover, and the best
    /// weights are still on disk. If that happens before any finite value, `best_epoch` is 0 (nothing to restore).
    pub fn observe(&mut self, epoch: usize, value: f64) -> Decision {
        if !value.is_finite() {
            return Decision::Stop {
                reason: format!(
                    "{} is {value} at epoch {epoch}: training diverged",
                    self.monitor
                ),
                best_epoch: self.state.best.map_or(0, |(e, _)| e),
            };
        }
        let improved = match self.state.best {
            None => true,
            Some((_, best)) => self.monitor.improves(value, best, self.min_delta),
        };
        if improved {
            self.state.best = Some((epoch, value));
            self.state.epochs_without_improvement = 0;
            return Decision::Continue { improved: true };
        }
        self.state.epochs_without_improvement += 1;
        match self.patience {
            Some(p) if self.state.epochs_without_improvement >= p.max(1) => {
                let (best_epoch, best) = self.state.best.expect("set on the first observation");
                Decision::Stop {
                    reason: format!(
                        "{} did not improve by more than {} for {} epochs (best {best:.4} at epoch {best_epoch})",
                        self.monitor, self.min_delta, self.state.epochs_without_improvement
                    ),
                    best_epoch,
                }
            }
            _ => Decision::Continue { improved: false },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopper(monitor: Monitor, patience: usize, min_delta: f64) -> EarlyStopping {
        EarlyStopping::new(monitor, Some(patience), min_delta).unwrap()
    }

    const IMPROVED: Decision = Decision::Continue { improved: true };
    const FLAT: Decision = Decision::Continue { improved: false };

    #[test]
    fn the_first_epoch_is_always_an_improvement() {
        let mut es = stopper(Monitor::ValLoss, 2, 0.0);
        assert_eq!(es.observe(1, 5.0), IMPROVED);
        assert_eq!(es.best(), Some((1, 5.0)));
    }

    #[test]
    fn a_falling_loss_keeps_improving() {
        let mut es = stopper(Monitor::ValLoss, 1, 0.0);
        for (epoch, loss) in [(1, 1.0), (2, 0.9), (3, 0.5)] {
            assert_eq!(es.observe(epoch, loss), IMPROVED);
        }
    }

    #[test]
    fn training_stops_after_patience_epochs_without_improvement_and_names_the_best_epoch() {
        let mut es = stopper(Monitor::ValLoss, 2, 0.0);
        es.observe(1, 1.0);
        es.observe(2, 0.8);
        assert_eq!(es.observe(3, 0.85), FLAT);
        match es.observe(4, 0.9) {
            Decision::Stop { reason, best_epoch } => {
                assert_eq!(best_epoch, 2);
                assert!(
                    reason.contains("val_loss") && reason.contains("2 epochs"),
                    "{reason}"
                );
            }
            other => panic!("expected a stop, got {other:?}"),
        }
    }

    #[test]
    fn an_improvement_smaller_than_min_delta_does_not_count() {
        let mut es = stopper(Monitor::ValLoss, 3, 0.01);
        es.observe(1, 1.0);
        assert_eq!(es.observe(2, 0.995), FLAT);
        assert_eq!(es.best(), Some((1, 1.0)));
        assert_eq!(es.observe(3, 0.98), IMPROVED);
    }

    #[test]
    fn an_improvement_resets_the_patience_count() {
        let mut es = stopper(Monitor::ValLoss, 2, 0.0);
        es.observe(1, 1.0);
        assert_eq!(es.observe(2, 1.1), FLAT);
        assert_eq!(es.observe(3, 0.7), IMPROVED);
        assert_eq!(es.observe(4, 0.8), FLAT);
        assert!(matches!(
            es.observe(5, 0.8),
            Decision::Stop { best_epoch: 3, .. }
        ));
    }

    #[test]
    fn accuracy_improves_upwards() {
        let mut es = stopper(Monitor::ValAcc, 1, 0.0);
        es.observe(1, 0.5);
        assert_eq!(es.observe(2, 0.6), IMPROVED);
        assert!(matches!(
            es.observe(3, 0.55),
            Decision::Stop { best_epoch: 2, .. }
        ));
    }

    #[test]
    fn without_patience_training_never_stops_but_improvements_are_reported() {
        let mut es = EarlyStopping::new(Monitor::ValLoss, None, 0.0).unwrap();
        es.observe(1, 1.0);
        for epoch in 2..50 {
            assert_eq!(es.observe(epoch, 2.0), FLAT);
        }
        assert_eq!(es.observe(50, 0.5), IMPROVED);
    }

    #[test]
    fn a_diverged_loss_stops_at_once() {
        let mut es = stopper(Monitor::ValLoss, 10, 0.0);
        es.observe(1, 1.0);
        match es.observe(2, f64::NAN) {
            Decision::Stop { reason, best_epoch } => {
                assert_eq!(best_epoch, 1);
                assert!(reason.contains("diverged"), "{reason}");
            }
            other => panic!("expected a stop, got {other:?}"),
        }
    }

    #[test]
    fn a_resumed_policy_keeps_counting_where_it_stopped() {
        let mut es = stopper(Monitor::ValLoss, 2, 0.0);
        es.observe(1, 1.0);
        es.observe(2, 1.2);
        let json = serde_json::to_string(&es).unwrap();
        let mut resumed: EarlyStopping = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed, es);
        assert!(matches!(
            resumed.observe(3, 1.3),
            Decision::Stop { best_epoch: 1, .. }
        ));
    }

    #[test]
    fn monitors_parse_from_their_flag_names_only() {
        assert_eq!("val_acc".parse::<Monitor>().unwrap(), Monitor::ValAcc);
        assert_eq!(
            serde_json::to_string(&Monitor::ValLoss).unwrap(),
            "\"val_loss\""
        );
        let err = "accuracy".parse::<Monitor>().unwrap_err().to_string();
        assert!(err.contains("--monitor"), "{err}");
        assert!(EarlyStopping::new(Monitor::ValLoss, Some(1), -0.1).is_err());
    }
}
