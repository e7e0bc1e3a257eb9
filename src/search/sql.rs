//! The SQL both stored studies run, written once: the tables and statements are valid SQLite and
//! PostgreSQL alike (`$N` placeholders, numbered in order of first use so SQLite binds them by position
//! too), and [`records`] turns their rows into [`TrialRecord`]s. Every row carries its study's name, so one
//! file or database holds any number of studies.

use crate::search::space::Params;
use crate::search::storage::{TrialRecord, TrialState};
use crate::Result;
use std::collections::BTreeMap;

/// The tables.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS studies (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    study TEXT NOT NULL, number BIGINT NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL,
    value DOUBLE PRECISION, message TEXT, started DOUBLE PRECISION NOT NULL, finished DOUBLE PRECISION,
    heartbeat DOUBLE PRECISION NOT NULL, worker TEXT NOT NULL, PRIMARY KEY (study, number));
CREATE TABLE IF NOT EXISTS intermediate (
    study TEXT NOT NULL, number BIGINT NOT NULL, epoch BIGINT NOT NULL, value DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (study, number, epoch));
";

/// `$1` name, `$2` spec: the first spec stored wins.
pub const INSERT_STUDY: &str =
    "INSERT INTO studies (name, spec) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
/// `$1` name.
pub const SELECT_SPEC: &str = "SELECT spec FROM studies WHERE name = $1";
/// `$1` study: rows of (number, epoch, value).
pub const SELECT_INTERMEDIATE: &str =
    "SELECT number, epoch, value FROM intermediate WHERE study = $1";
/// `$1` study: rows in [`TrialRow`]'s order.
pub const SELECT_TRIALS: &str =
    "SELECT number, state, params, value, message, started, finished, heartbeat, worker
     FROM trials WHERE study = $1 ORDER BY number";
/// What `ask` writes: a new trial, or a taken-over one's new worker and heartbeat.
/// `$1` study, `$2` number, `$3` state, `$4` params, `$5` started, `$6` heartbeat, `$7` worker.
pub const UPSERT_ASKED: &str =
    "INSERT INTO trials (study, number, state, params, started, heartbeat, worker)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (study, number) DO UPDATE SET heartbeat = excluded.heartbeat, worker = excluded.worker";
/// `$1` state, `$2` value, `$3` message, `$4` now, `$5` study, `$6` number.
pub const TELL: &str =
    "UPDATE trials SET state = $1, value = $2, message = $3, finished = $4, heartbeat = $4
     WHERE study = $5 AND number = $6";
/// `$1` study, `$2` number, `$3` epoch, `$4` value.
pub const REPORT: &str =
    "INSERT INTO intermediate (study, number, epoch, value) VALUES ($1, $2, $3, $4)
     ON CONFLICT (study, number, epoch) DO UPDATE SET value = excluded.value";
/// `$1` now, `$2` study, `$3` number.
pub const HEARTBEAT: &str = "UPDATE trials SET heartbeat = $1 WHERE study = $2 AND number = $3";

/// One row of [`SELECT_TRIALS`]: number, state, params (JSON), value, message, started, finished,
/// heartbeat, worker.
pub type TrialRow = (
    i64,
    String,
    String,
    Option<f64>,
    Option<String>,
    f64,
    Option<f64>,
    f64,
    String,
);

/// The trials from their rows and the rows of [`SELECT_INTERMEDIATE`]; `err` names the study in errors.
pub fn records(
    trials: Vec<TrialRow>,
    intermediate: Vec<(i64, i64, f64)>,
    err: impl Fn(String) -> crate::Error,
) -> Result<Vec<TrialRecord>> {
    let mut inter: BTreeMap<u64, BTreeMap<usize, f64>> = BTreeMap::new();
    for (n, e, v) in intermediate {
        inter.entry(n as u64).or_default().insert(e as usize, v);
    }
    trials
        .into_iter()
        .map(
            |(number, state, params, value, message, started, finished, heartbeat, worker)| {
                let params: Params = serde_json::from_str(&params)
                    .map_err(|e| err(format!("trial {number}: bad params: {e}")))?;
                Ok(TrialRecord {
                    number: number as u64,
                    state: TrialState::parse(&state)?,
                    params,
                    value,
                    intermediate: inter.remove(&(number as u64)).unwrap_or_default(),
                    message,
                    started,
                    finished,
                    heartbeat,
                    worker,
                })
            },
        )
        .collect()
}
