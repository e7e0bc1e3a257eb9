//! A study in one SQLite file, shared safely by several processes: WAL journal (readers never block the
//! writer), a busy timeout instead of "database is locked" errors, and every write inside `BEGIN IMMEDIATE`,
//! which takes the write lock before reading, so two workers can never number or pick the same trial.
//!
//! Why every write, not only `ask`: in WAL mode a transaction that starts by reading (a deferred `BEGIN`,
//! or `CREATE TABLE IF NOT EXISTS`, which reads the schema first) and then wants to write fails at once
//! with SQLITE_BUSY when another connection committed in between: its snapshot is stale and the busy
//! handler is not consulted. Two workers opening one new study hit exactly that ("database is locked").
//! `BEGIN IMMEDIATE` waits for the write lock under the busy timeout instead.

use crate::search::sql;
use crate::search::storage::{next_trial, now, Asked, Propose, Storage, TrialRecord, TrialState};
use crate::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How long a worker waits for another one's write lock before "database is locked" is an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// See the module doc. One connection per `SqliteStorage`; open one per worker.
pub struct SqliteStorage {
    path: PathBuf,
    name: String,
    conn: Mutex<Connection>,
}

impl SqliteStorage {
    /// Opens (creating if needed) the study `name` in the file at `path`.
    pub fn open(path: impl AsRef<Path>, name: &str) -> Result<SqliteStorage> {
        let path = path.as_ref().to_path_buf();
        let err = |e: rusqlite::Error| Error::study(path.display().to_string(), e);
        let mut conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        // Switching to WAL needs a moment alone with the file; a worker opening it at the same time can
        // get SQLITE_BUSY without the busy handler, so retry for as long as the busy timeout.
        let start = std::time::Instant::now();
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Ok(()) => break,
                Err(e) if is_busy(&e) && start.elapsed() < BUSY_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(err(e)),
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(sql::SCHEMA).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(SqliteStorage {
            path,
            name: name.to_string(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, e: impl ToString) -> Error {
        Error::study(self.path.display().to_string(), e)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction (see the module doc) and commits it.
    fn write<R>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<R>,
    ) -> Result<R> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let r = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(r)
    }

    fn load(&self, conn: &Connection) -> Result<Vec<TrialRecord>> {
        let err = |e: rusqlite::Error| self.err(e);
        let intermediate = conn
            .prepare_cached(sql::SELECT_INTERMEDIATE)
            .map_err(err)?
            .query_map([&self.name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        let trials = conn
            .prepare_cached(sql::SELECT_TRIALS)
            .map_err(err)?
            .query_map([&self.name], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        sql::records(trials, intermediate, |e| self.err(e))
    }
}

impl Storage for SqliteStorage {
    fn open_study(&self, spec: &str) -> Result<String> {
        self.write(|tx| {
            tx.execute(sql::INSERT_STUDY, params![self.name, spec])?;
            tx.query_row(sql::SELECT_SPEC, [&self.name], |r| r.get(0))
        })
    }

    fn ask(
        &self,
        worker: &str,
        stale_after: Duration,
        propose: &mut Propose<'_>,
    ) -> Result<Option<Asked>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let trials = self.load(&tx)?;
        let asked = next_trial(&trials, worker, stale_after, propose)?;
        if let Some(a) = &asked {
            let t = &a.trial;
            let params = serde_json::to_string(&t.params).map_err(|e| self.err(e))?;
            tx.execute(
                sql::UPSERT_ASKED,
                params![
                    self.name,
                    t.number as i64,
                    t.state.as_str(),
                    params,
                    t.started,
                    t.heartbeat,
                    t.worker
                ],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(asked)
    }

    fn tell(
        &self,
        number: u64,
        state: TrialState,
        value: Option<f64>,
        message: Option<&str>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                sql::TELL,
                params![
                    state.as_str(),
                    value,
                    message,
                    now(),
                    self.name,
                    number as i64
                ],
            )
        })?;
        Ok(())
    }

    fn report(&self, number: u64, epoch: usize, value: f64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                sql::REPORT,
                params![self.name, number as i64, epoch as i64, value],
            )?;
            tx.execute(sql::HEARTBEAT, params![now(), self.name, number as i64])
        })?;
        Ok(())
    }

    fn heartbeat(&self, number: u64) -> Result<()> {
        self.write(|tx| tx.execute(sql::HEARTBEAT, params![now(), self.name, number as i64]))?;
        Ok(())
    }

    fn trials(&self) -> Result<Vec<TrialRecord>> {
        let conn = self.conn();
        self.load(&conn)
    }
}

/// Whether `path` holds a study named `name` (without creating anything).
pub fn exists(path: &Path, name: &str) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let conn = Connection::open(path).map_err(|e| Error::study(path.display().to_string(), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| Error::study(path.display().to_string(), e))?;
    conn.query_row(sql::SELECT_SPEC, [name], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
        .map_err(|e| Error::study(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::sampler::SamplerConfig;
    use crate::search::space::Space;
    use crate::search::study::{Study, StudySpec};

    /// Workers that open one new study file at the same instant (each creating the schema, switching to
    /// WAL and registering the study) all get in: none sees "database is locked".
    #[test]
    fn workers_opening_one_new_study_at_once_never_see_a_locked_database() {
        let spec = StudySpec {
            space: Space::from_toml("[x]\nfloat = [0.0, 1.0]", &[]).unwrap(),
            sampler: SamplerConfig::Random,
            ..Default::default()
        };
        for _ in 0..25 {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("study.sqlite");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let (file, spec, barrier) = (file.clone(), spec.clone(), barrier.clone());
                    std::thread::spawn(move || -> Result<()> {
                        barrier.wait();
                        let study = Study::open(Box::new(SqliteStorage::open(&file, "s")?), spec)?;
                        if let Some(t) = study.ask(Some(8))? {
                            study.report(t.number, 1, 0.5)?;
                            study.tell(t.number, TrialState::Complete, Some(0.5))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap().unwrap();
            }
        }
    }

    #[test]
    fn workers_with_their_own_connections_share_one_study_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("study.sqlite");
        let space = Space::from_toml("[x]\nfloat = [0.0, 1.0]\n[y]\nint = [0, 100]", &[]).unwrap();
        let spec = StudySpec {
            space,
            sampler: SamplerConfig::Random,
            seed: 5,
            ..Default::default()
        };
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (file, spec) = (file.clone(), spec.clone());
                std::thread::spawn(move || {
                    let study =
                        Study::open(Box::new(SqliteStorage::open(&file, "s").unwrap()), spec)
                            .unwrap();
                    let mut mine = Vec::new();
                    while let Some(t) = study.ask(Some(40)).unwrap() {
                        study.report(t.number, 1, 0.5).unwrap();
                        study
                            .tell(
                                t.number,
                                TrialState::Complete,
                                Some(t.params["x"].as_f64().unwrap()),
                            )
                            .unwrap();
                        mine.push(t.number);
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<u64> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        all.sort();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
        let trials = SqliteStorage::open(&file, "s").unwrap().trials().unwrap();
        assert!(trials
            .iter()
            .all(|t| t.state == TrialState::Complete && t.intermediate.len() == 1));
        // Trial k's parameters depend on (seed, k) only, not on which worker drew it.
        let again = crate::search::sampler::random_params(&spec.space, 5, 17);
        assert_eq!(trials[17].params, again);
    }

    #[test]
    fn a_running_trial_with_a_stale_heartbeat_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("study.sqlite");
        let space = Space::from_toml("[x]\nfloat = [0.0, 1.0]", &[]).unwrap();
        let spec = StudySpec {
            space,
            sampler: SamplerConfig::Random,
            ..Default::default()
        };
        let mut a = Study::open(
            Box::new(SqliteStorage::open(&file, "s").unwrap()),
            spec.clone(),
        )
        .unwrap();
        let first = a.ask(Some(3)).unwrap().unwrap();
        assert!(!first.resumed);
        a.stale_after = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(20));
        let again = a.ask(Some(3)).unwrap().unwrap();
        assert_eq!((again.number, again.resumed), (first.number, true));
        assert_eq!(again.params, first.params);
    }
}
