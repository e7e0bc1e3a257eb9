//! A study in one SQLite file, shared safely by several processes: WAL journal (readers never block the
//! writer), a busy timeout instead of "database is locked" errors, and `ask` inside `BEGIN IMMEDIATE`, which
//! takes the write lock before reading, so two workers can never number or pick the same trial.

use crate::search::space::Params;
use crate::search::storage::{next_trial, now, Asked, Propose, Storage, TrialRecord, TrialState};
use crate::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The tables (the PostgreSQL storage uses the same layout).
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
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
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

    fn load(&self, conn: &Connection) -> Result<Vec<TrialRecord>> {
        let mut inter: BTreeMap<u64, BTreeMap<usize, f64>> = BTreeMap::new();
        let mut q = conn
            .prepare_cached("SELECT number, epoch, value FROM intermediate WHERE study = ?1")
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map([&self.name], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, f64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (n, e, v) = row.map_err(|e| self.err(e))?;
            inter.entry(n as u64).or_default().insert(e as usize, v);
        }
        let mut q = conn
            .prepare_cached(
                "SELECT number, state, params, value, message, started, finished, heartbeat, worker
                 FROM trials WHERE study = ?1 ORDER BY number",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map([&self.name], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<f64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, f64>(5)?,
                    r.get::<_, Option<f64>>(6)?,
                    r.get::<_, f64>(7)?,
                    r.get::<_, String>(8)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (number, state, params, value, message, started, finished, heartbeat, worker) =
                row.map_err(|e| self.err(e))?;
            let params: Params = serde_json::from_str(&params).map_err(|e| self.err(e))?;
            out.push(TrialRecord {
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
            });
        }
        Ok(out)
    }
}

impl Storage for SqliteStorage {
    fn open_study(&self, spec: &str) -> Result<String> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO studies (name, spec) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
            params![self.name, spec],
        )
        .map_err(|e| self.err(e))?;
        conn.query_row(
            "SELECT spec FROM studies WHERE name = ?1",
            [&self.name],
            |r| r.get(0),
        )
        .map_err(|e| self.err(e))
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
                "INSERT INTO trials (study, number, state, params, started, heartbeat, worker)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (study, number) DO UPDATE SET heartbeat = excluded.heartbeat, worker = excluded.worker",
                params![self.name, t.number as i64, t.state.as_str(), params, t.started, t.heartbeat, t.worker],
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
        self.conn()
            .execute(
                "UPDATE trials SET state = ?1, value = ?2, message = ?3, finished = ?4, heartbeat = ?4
                 WHERE study = ?5 AND number = ?6",
                params![state.as_str(), value, message, now(), self.name, number as i64],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn report(&self, number: u64, epoch: usize, value: f64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO intermediate (study, number, epoch, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (study, number, epoch) DO UPDATE SET value = excluded.value",
            params![self.name, number as i64, epoch as i64, value],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE trials SET heartbeat = ?1 WHERE study = ?2 AND number = ?3",
            params![now(), self.name, number as i64],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn heartbeat(&self, number: u64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE trials SET heartbeat = ?1 WHERE study = ?2 AND number = ?3",
                params![now(), self.name, number as i64],
            )
            .map_err(|e| self.err(e))?;
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
    conn.query_row("SELECT 1 FROM studies WHERE name = ?1", [name], |_| Ok(()))
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
