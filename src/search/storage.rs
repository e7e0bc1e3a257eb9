//! Where a study's trials live: [`Storage`] is the one interface; [`MemoryStorage`] keeps them in this
//! process, [`crate::search::sqlite::SqliteStorage`] in a file several processes share, and (with a
//! `postgres://` URL) [`crate::search::postgres::PostgresStorage`] on a server.
//!
//! The contract every storage keeps: [`Storage::ask`] is atomic across all workers of a study: it sees
//! every trial, may take over one whose worker died (heartbeat older than `stale_after`, or a worker on
//! this host whose process is gone), and otherwise inserts the new trial the proposal gives, numbered
//! one past the highest, all in one transaction.

use crate::search::space::Params;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A trial's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialState {
    Running,
    Complete,
    Pruned,
    Failed,
}

impl TrialState {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Running => "running",
            TrialState::Complete => "complete",
            TrialState::Pruned => "pruned",
            TrialState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<TrialState> {
        Ok(match s {
            "running" => TrialState::Running,
            "complete" => TrialState::Complete,
            "pruned" => TrialState::Pruned,
            "failed" => TrialState::Failed,
            _ => {
                return Err(Error::study(
                    "(storage)",
                    format!("unknown trial state `{s}`"),
                ))
            }
        })
    }
}

/// Everything stored about one trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub number: u64,
    pub state: TrialState,
    pub params: Params,
    /// The final objective value (complete trials; a pruned trial keeps its last reported value).
    pub value: Option<f64>,
    /// Values reported after each epoch (1-based epoch -> value).
    pub intermediate: BTreeMap<usize, f64>,
    /// Why a trial failed.
    pub message: Option<String>,
    /// Unix seconds.
    pub started: f64,
    pub finished: Option<f64>,
    pub heartbeat: f64,
    /// `host:pid` of the worker running it.
    pub worker: String,
}

/// What [`Storage::ask`] hands back.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    pub trial: TrialRecord,
    /// True when this is a dead worker's trial taken over (resume it rather than start afresh).
    pub taken_over: bool,
}

/// The proposal callback of [`Storage::ask`]: given all trials, the parameters of the new trial (whose
/// number is one past the highest), or `None` to end the study.
pub type Propose<'a> = dyn FnMut(&[TrialRecord], u64) -> Result<Option<Params>> + 'a;

/// A study's trials, shared by its workers. See the module doc for the atomicity contract.
pub trait Storage: Send + Sync {
    /// Creates the study with `spec` (JSON: space, sampler, direction, seed) or, if it exists, returns
    /// the spec stored first, which wins.
    fn open_study(&self, spec: &str) -> Result<String>;
    /// Takes over a dead worker's trial, or inserts the one `propose` gives; `None` when it gives none.
    fn ask(
        &self,
        worker: &str,
        stale_after: Duration,
        propose: &mut Propose<'_>,
    ) -> Result<Option<Asked>>;
    /// Finishes a trial.
    fn tell(
        &self,
        number: u64,
        state: TrialState,
        value: Option<f64>,
        message: Option<&str>,
    ) -> Result<()>;
    /// Records a value after `epoch` (and refreshes the heartbeat).
    fn report(&self, number: u64, epoch: usize, value: f64) -> Result<()>;
    /// Says the trial's worker is alive.
    fn heartbeat(&self, number: u64) -> Result<()>;
    /// All trials, by number.
    fn trials(&self) -> Result<Vec<TrialRecord>>;
}

/// Unix seconds now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This process as a worker name, `host:pid`.
pub fn this_worker() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Whether a running trial's worker is gone: its heartbeat is older than `stale_after`, or it ran on this
/// host (by name) in a process that no longer exists (checked through /proc, so on Linux only).
pub fn is_abandoned(t: &TrialRecord, me: &str, stale_after: Duration) -> bool {
    if t.state != TrialState::Running {
        return false;
    }
    if now() - t.heartbeat > stale_after.as_secs_f64() {
        return true;
    }
    let (Some((host, pid)), Some((my_host, _))) = (t.worker.rsplit_once(':'), me.rsplit_once(':'))
    else {
        return false;
    };
    host == my_host
        && t.worker != me
        && std::path::Path::new("/proc/self").exists()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The step shared by the storages inside their transaction: a trial to take over, or a new one.
pub fn next_trial(
    trials: &[TrialRecord],
    worker: &str,
    stale_after: Duration,
    propose: &mut Propose<'_>,
) -> Result<Option<Asked>> {
    if let Some(t) = trials.iter().find(|t| is_abandoned(t, worker, stale_after)) {
        let mut t = t.clone();
        t.heartbeat = now();
        t.worker = worker.to_string();
        return Ok(Some(Asked {
            trial: t,
            taken_over: true,
        }));
    }
    let number = trials.iter().map(|t| t.number + 1).max().unwrap_or(0);
    let Some(params) = propose(trials, number)? else {
        return Ok(None);
    };
    let t = now();
    Ok(Some(Asked {
        trial: TrialRecord {
            number,
            state: TrialState::Running,
            params,
            value: None,
            intermediate: BTreeMap::new(),
            message: None,
            started: t,
            finished: None,
            heartbeat: t,
            worker: worker.to_string(),
        },
        taken_over: false,
    }))
}

/// A study kept in this process (benchmarks, tests, single-process searches that need no rerun).
#[derive(Debug, Default)]
pub struct MemoryStorage {
    inner: Mutex<(Option<String>, Vec<TrialRecord>)>,
}

impl MemoryStorage {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<String>, Vec<TrialRecord>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_trial<T>(&self, number: u64, f: impl FnOnce(&mut TrialRecord) -> T) -> Result<T> {
        let mut g = self.lock();
        let t =
            g.1.iter_mut()
                .find(|t| t.number == number)
                .ok_or_else(|| Error::study("(memory)", format!("no trial {number}")))?;
        Ok(f(t))
    }
}

impl Storage for MemoryStorage {
    fn open_study(&self, spec: &str) -> Result<String> {
        let mut g = self.lock();
        Ok(g.0.get_or_insert_with(|| spec.to_string()).clone())
    }

    fn ask(
        &self,
        worker: &str,
        stale_after: Duration,
        propose: &mut Propose<'_>,
    ) -> Result<Option<Asked>> {
        let mut g = self.lock();
        let asked = next_trial(&g.1, worker, stale_after, propose)?;
        if let Some(a) = &asked {
            match g.1.iter_mut().find(|t| t.number == a.trial.number) {
                Some(t) => *t = a.trial.clone(),
                None => g.1.push(a.trial.clone()),
            }
        }
        Ok(asked)
    }

    fn tell(
        &self,
        number: u64,
        state: TrialState,
        value: Option<f64>,
        message: Option<&str>,
    ) -> Result<()> {
        self.with_trial(number, |t| {
            t.state = state;
            t.value = value;
            t.message = message.map(str::to_string);
            t.finished = Some(now());
        })
    }

    fn report(&self, number: u64, epoch: usize, value: f64) -> Result<()> {
        self.with_trial(number, |t| {
            t.intermediate.insert(epoch, value);
            t.heartbeat = now();
        })
    }

    fn heartbeat(&self, number: u64) -> Result<()> {
        self.with_trial(number, |t| t.heartbeat = now())
    }

    fn trials(&self) -> Result<Vec<TrialRecord>> {
        Ok(self.lock().1.clone())
    }
}
