//! The ask/tell interface: a [`Study`] joins a space, a sampler and a storage. A worker loops
//! `ask` -> run the trial (reporting per-epoch values) -> `tell`; any number of workers may share one
//! stored study.
//!
//! ```
//! use graft::search::{Space, Study, StudySpec, MemoryStorage, TrialState, SamplerConfig};
//! let space = Space::from_toml("[x]\nfloat = [-2.0, 2.0]", &[]).unwrap();
//! let spec = StudySpec { space, sampler: SamplerConfig::Random, ..StudySpec::default() };
//! let study = Study::open(Box::new(MemoryStorage::default()), spec).unwrap();
//! while let Some(trial) = study.ask(Some(10)).unwrap() {
//!     let x = trial.params["x"].as_f64().unwrap();
//!     study.tell(trial.number, TrialState::Complete, Some((x - 1.0).powi(2))).unwrap();
//! }
//! assert!(study.best().unwrap().unwrap().value.unwrap() < 0.5);
//! ```

use crate::search::sampler::{Sampler, SamplerConfig};
use crate::search::space::{Params, Space};
use crate::search::storage::{this_worker, Storage, TrialRecord, TrialState};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Whether lower or higher values are better.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Minimize,
    Maximize,
}

impl Direction {
    /// `value` turned so that lower is better.
    pub fn to_min(self, value: f64) -> f64 {
        match self {
            Direction::Minimize => value,
            Direction::Maximize => -value,
        }
    }
}

/// What defines a study; stored with it on creation, and the stored one is used from then on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StudySpec {
    pub space: Space,
    pub sampler: SamplerConfig,
    pub direction: Direction,
    pub seed: u64,
    /// Anything the caller wants kept with the study (the CLI: the fixed finetune flags and the metric).
    pub extra: serde_json::Value,
}

/// A trial handed out by [`Study::ask`].
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub number: u64,
    pub params: Params,
    /// A dead worker's trial taken over: continue it (e.g. from its last checkpoint).
    pub resumed: bool,
}

/// A study: see the module doc.
pub struct Study {
    storage: Box<dyn Storage>,
    spec: StudySpec,
    sampler: Box<dyn Sampler>,
    worker: String,
    /// A running trial whose heartbeat is older than this is taken over.
    pub stale_after: Duration,
}

impl Study {
    /// Creates the study in `storage`, or joins it: an existing study keeps its stored spec, and it is an
    /// error to join it with a different space.
    pub fn open(storage: Box<dyn Storage>, spec: StudySpec) -> Result<Study> {
        let json = serde_json::to_string(&spec).map_err(|e| Error::study("(spec)", e))?;
        let stored: StudySpec = serde_json::from_str(&storage.open_study(&json)?)
            .map_err(|e| Error::study("(stored spec)", e))?;
        if stored.space != spec.space {
            return Err(Error::study(
                "(spec)",
                "the study exists with a different search space; use a new study or the same space file",
            ));
        }
        Ok(Study {
            sampler: stored.sampler.build(),
            spec: stored,
            storage,
            worker: this_worker(),
            stale_after: Duration::from_secs(120),
        })
    }

    pub fn spec(&self) -> &StudySpec {
        &self.spec
    }

    /// The next trial: a dead worker's, or a new one from the sampler; `None` once `max_trials` trials
    /// exist (of any state) or the sampler is exhausted.
    pub fn ask(&self, max_trials: Option<usize>) -> Result<Option<Trial>> {
        let spec = &self.spec;
        let sampler = &self.sampler;
        let mut propose = |trials: &[TrialRecord], number: u64| -> Result<Option<Params>> {
            if max_trials.is_some_and(|n| trials.len() >= n) {
                return Ok(None);
            }
            let for_min: Vec<TrialRecord> = trials
                .iter()
                .map(|t| TrialRecord {
                    value: t.value.map(|v| spec.direction.to_min(v)),
                    ..t.clone()
                })
                .collect();
            sampler.sample(&spec.space, spec.seed, number, &for_min)
        };
        Ok(self
            .storage
            .ask(&self.worker, self.stale_after, &mut propose)?
            .map(|a| Trial {
                number: a.trial.number,
                params: a.trial.params,
                resumed: a.taken_over,
            }))
    }

    /// Finishes trial `number` with `state` and its value.
    pub fn tell(&self, number: u64, state: TrialState, value: Option<f64>) -> Result<()> {
        self.storage.tell(number, state, value, None)
    }

    /// Marks trial `number` failed with `message`.
    pub fn fail(&self, number: u64, message: &str) -> Result<()> {
        self.storage
            .tell(number, TrialState::Failed, None, Some(message))
    }

    /// Records trial `number`'s value after `epoch` (1-based).
    pub fn report(&self, number: u64, epoch: usize, value: f64) -> Result<()> {
        self.storage.report(number, epoch, value)
    }

    pub fn heartbeat(&self, number: u64) -> Result<()> {
        self.storage.heartbeat(number)
    }

    pub fn trials(&self) -> Result<Vec<TrialRecord>> {
        self.storage.trials()
    }

    /// The best complete trial.
    pub fn best(&self) -> Result<Option<TrialRecord>> {
        let d = self.spec.direction;
        Ok(self
            .trials()?
            .into_iter()
            .filter(|t| t.state == TrialState::Complete && t.value.is_some_and(f64::is_finite))
            .min_by(|a, b| {
                d.to_min(a.value.unwrap_or(0.0))
                    .total_cmp(&d.to_min(b.value.unwrap_or(0.0)))
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::storage::MemoryStorage;

    #[test]
    fn ask_hands_out_numbered_trials_until_the_budget_and_tell_records_them() {
        let space = Space::from_toml("[x]\nint = [0, 9]", &[]).unwrap();
        let spec = StudySpec {
            space,
            sampler: SamplerConfig::Grid,
            direction: Direction::Maximize,
            ..Default::default()
        };
        let study = Study::open(Box::new(MemoryStorage::default()), spec).unwrap();
        let mut seen = Vec::new();
        while let Some(t) = study.ask(Some(20)).unwrap() {
            let x = t.params["x"].as_i64().unwrap();
            study.report(t.number, 1, x as f64).unwrap();
            study
                .tell(t.number, TrialState::Complete, Some(x as f64))
                .unwrap();
            seen.push(x);
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..10).collect::<Vec<_>>(),
            "the grid ends the study after its 10 points"
        );
        assert_eq!(study.best().unwrap().unwrap().value, Some(9.0));
        assert_eq!(study.trials().unwrap()[3].intermediate.len(), 1);
    }
}
