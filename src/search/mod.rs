//! Hyperparameter search: spaces read from TOML ([`space`]), samplers that propose trials (grid, random,
//! and Bayesian optimisation over a Gaussian process, [`sampler`], [`gp`]), pruners that stop poor trials
//! early ([`pruner`]), and the ask/tell [`study::Study`] over a [`storage::Storage`] (in memory, SQLite, or
//! PostgreSQL) that several workers can share. `graft search` (src/cli/search.rs) runs each trial as an
//! ordinary fine-tuning run.

pub mod gp;
pub mod plots;
pub mod postgres;
pub mod pruner;
pub mod sampler;
pub mod space;
pub mod sql;
pub mod sqlite;
pub mod storage;
pub mod study;

pub use pruner::PrunerConfig;
pub use sampler::{BayesConfig, SamplerConfig};
pub use space::{Params, Space, Value};
pub use storage::{MemoryStorage, Storage, TrialRecord, TrialState};
pub use study::{Direction, Study, StudySpec, Trial};
