//! Pruners decide from the per-epoch values stored in the study whether a running trial should stop early.
//! They only decide; the training loop acts (through `RunOptions::on_epoch`, the same door early stopping
//! uses).

use crate::search::storage::{TrialRecord, TrialState};
use crate::search::study::Direction;
use serde::{Deserialize, Serialize};

/// Which pruner a search uses, with its settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PrunerConfig {
    #[default]
    None,
    /// Optuna's MedianPruner: prune when the trial's value at this epoch is worse than the median of the
    /// other trials' values at the same epoch, once `startup_trials` trials have finished and after
    /// `warmup_epochs` epochs.
    Median {
        startup_trials: usize,
        warmup_epochs: usize,
    },
    /// Asynchronous successive halving (Li et al. 2020): rungs at epochs `min_epochs * eta^k`; at a rung a
    /// trial goes on only if its value is in the best `1/eta` of all values recorded at that rung so far.
    Asha { min_epochs: usize, eta: usize },
}

impl PrunerConfig {
    /// `none`, `median` or `asha` with their default settings.
    pub fn from_name(name: &str) -> crate::Result<PrunerConfig> {
        Ok(match name {
            "none" => PrunerConfig::None,
            "median" => PrunerConfig::Median {
                startup_trials: 3,
                warmup_epochs: 1,
            },
            "asha" => PrunerConfig::Asha {
                min_epochs: 1,
                eta: 3,
            },
            _ => {
                return Err(crate::Error::config(
                    "--pruner",
                    format!("`{name}` is not none|median|asha"),
                ))
            }
        })
    }

    /// Whether `trial` should stop after `epoch` (1-based; its value for `epoch` is already in
    /// `trial.intermediate`), given all the study's trials.
    pub fn should_prune(
        &self,
        trials: &[TrialRecord],
        trial: &TrialRecord,
        epoch: usize,
        dir: Direction,
    ) -> bool {
        let Some(&mine) = trial.intermediate.get(&epoch) else {
            return false;
        };
        let mine = dir.to_min(mine);
        let others = |filter: &dyn Fn(&TrialRecord) -> bool| -> Vec<f64> {
            trials
                .iter()
                .filter(|t| t.number != trial.number && filter(t))
                .filter_map(|t| t.intermediate.get(&epoch).map(|v| dir.to_min(*v)))
                .filter(|v| v.is_finite())
                .collect()
        };
        match *self {
            PrunerConfig::None => false,
            PrunerConfig::Median {
                startup_trials,
                warmup_epochs,
            } => {
                let finished = trials
                    .iter()
                    .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
                    .count();
                if finished < startup_trials || epoch <= warmup_epochs {
                    return false;
                }
                let mut v = others(&|t| t.state != TrialState::Failed);
                if v.is_empty() {
                    return false;
                }
                v.sort_by(f64::total_cmp);
                let n = v.len();
                let median = if n % 2 == 1 {
                    v[n / 2]
                } else {
                    0.5 * (v[n / 2 - 1] + v[n / 2])
                };
                mine > median
            }
            PrunerConfig::Asha { min_epochs, eta } => {
                let eta = eta.max(2);
                let min_epochs = min_epochs.max(1);
                // Is `epoch` a rung?
                let mut rung = min_epochs;
                while rung < epoch {
                    rung *= eta;
                }
                if rung != epoch {
                    return false;
                }
                let mut v = others(&|t| t.state != TrialState::Failed);
                v.push(mine);
                v.sort_by(f64::total_cmp);
                // The best floor(n / eta) go on (at least the best one).
                let keep = (v.len() / eta).max(1);
                mine > v[keep - 1]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn trial(number: u64, state: TrialState, values: &[f64]) -> TrialRecord {
        TrialRecord {
            number,
            state,
            params: BTreeMap::new(),
            value: values.last().copied(),
            intermediate: values
                .iter()
                .enumerate()
                .map(|(i, v)| (i + 1, *v))
                .collect(),
            message: None,
            started: 0.0,
            finished: None,
            heartbeat: 0.0,
            worker: String::new(),
        }
    }

    #[test]
    fn median_prunes_a_trial_worse_than_the_median_at_the_same_epoch() {
        let c = TrialState::Complete;
        let past = vec![
            trial(0, c, &[1.0, 0.5]),
            trial(1, c, &[1.0, 0.7]),
            trial(2, c, &[1.0, 0.9]),
        ];
        let pruner = PrunerConfig::from_name("median").unwrap();
        let bad = trial(3, TrialState::Running, &[1.0, 0.8]);
        let good = trial(4, TrialState::Running, &[1.0, 0.6]);
        assert!(pruner.should_prune(&past, &bad, 2, Direction::Minimize));
        assert!(!pruner.should_prune(&past, &good, 2, Direction::Minimize));
        assert!(
            !pruner.should_prune(&past, &bad, 1, Direction::Minimize),
            "warm-up epoch"
        );
        assert!(
            !pruner.should_prune(&past[..2], &bad, 2, Direction::Minimize),
            "too few finished trials"
        );
        // Maximising accuracy instead: 0.8 beats the median 0.7.
        assert!(!pruner.should_prune(&past, &bad, 2, Direction::Maximize));
    }

    #[test]
    fn asha_keeps_the_best_third_at_each_rung_and_never_prunes_between_rungs() {
        let c = TrialState::Complete;
        let past: Vec<_> = (0..5)
            .map(|i| trial(i, c, &[i as f64, 0.0, 0.0, i as f64]))
            .collect();
        let asha = PrunerConfig::Asha {
            min_epochs: 1,
            eta: 3,
        };
        let t = trial(9, TrialState::Running, &[0.5, 9.0, 9.0, 0.5]);
        // Epoch 1 values: 0,1,2,3,4 and 0.5 -> keep the best 2: 0 and 0.5.
        assert!(!asha.should_prune(&past, &t, 1, Direction::Minimize));
        assert!(
            !asha.should_prune(&past, &t, 2, Direction::Minimize),
            "epoch 2 is no rung"
        );
        let worse = trial(10, TrialState::Running, &[1.5]);
        assert!(asha.should_prune(&past, &worse, 1, Direction::Minimize));
        // Rung 3: values 0 (x5) and 9 -> 9 is out.
        assert!(asha.should_prune(&past, &t, 3, Direction::Minimize));
    }
}
