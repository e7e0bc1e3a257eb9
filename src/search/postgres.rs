//! A study on a PostgreSQL server, so workers on many machines share it: the same tables and statements as
//! the SQLite study ([`crate::search::sql`]), every row keyed by the study's name, so one database holds
//! many studies.
//!
//! Atomicity: [`Storage::ask`] runs in one transaction that first locks the study's row in `studies`
//! (`SELECT ... FOR UPDATE`). Workers of one study therefore ask one at a time (workers of other studies
//! are not held up); under PostgreSQL's default READ COMMITTED isolation each statement after the lock sees
//! every trial committed before it was granted, so the next number is always one past the true highest and
//! a dead worker's trial is taken over by one worker only. The primary key `(study, number)` backs this up.
//! Creating the tables takes a transaction-scoped advisory lock, because concurrent `CREATE TABLE IF NOT
//! EXISTS` can fail in PostgreSQL.
//!
//! The URL is `postgres://user[:password]@host[:port]/db[?study=NAME]` (or `postgresql://`); `study`
//! names the study (default `default`), every other query parameter goes to the client. Connections are
//! unencrypted (`NoTls`): use it on a trusted network or through a tunnel. Errors name the URL without
//! its password.

use crate::search::sql;
use crate::search::storage::{next_trial, now, Asked, Propose, Storage, TrialRecord, TrialState};
use crate::{Error, Result};
use postgres::{Client, GenericClient, NoTls};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

/// The advisory lock key held while the tables are created ("graft" in ASCII).
const SCHEMA_LOCK: i64 = 0x67_72_61_66_74;

/// Whether `study` names a PostgreSQL study rather than a folder.
pub fn is_url(study: &str) -> bool {
    study.starts_with("postgres://") || study.starts_with("postgresql://")
}

/// A study URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyUrl {
    /// What the client connects to: the URL less the `study` parameter.
    pub connect: String,
    /// The study's name.
    pub study: String,
    /// The URL for messages: no password, with the study's name.
    pub shown: String,
}

impl StudyUrl {
    pub fn parse(url: &str) -> Result<StudyUrl> {
        if !is_url(url) {
            return Err(Error::study(
                redact(url),
                "not a postgres:// or postgresql:// URL",
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut study = None;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.strip_prefix("study=") {
                Some(name) => study = Some(name.to_string()),
                None => rest.push(pair),
            }
        }
        let study = study.unwrap_or_else(|| "default".into());
        if study.is_empty() {
            return Err(Error::study(redact(url), "`?study=` needs a name"));
        }
        let connect = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        Ok(StudyUrl {
            shown: format!("{}?study={study}", redact(base)),
            connect,
            study,
        })
    }
}

/// `url` without the password of its user, if it has one.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// The client's error with its causes (its own message is only the kind, e.g. "db error").
fn describe(e: &postgres::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        s.push_str(&format!(": {c}"));
        source = c.source();
    }
    s
}

/// A connection to the server of `url` (10 s to connect unless the URL says otherwise).
fn connect(url: &StudyUrl) -> Result<Client> {
    let err = |e: postgres::Error| Error::study(url.shown.clone(), describe(&e));
    let mut config = postgres::Config::from_str(&url.connect).map_err(err)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.connect(NoTls).map_err(err)
}

/// See the module doc. One connection per `PostgresStorage`; open one per worker.
pub struct PostgresStorage {
    url: StudyUrl,
    client: Mutex<Client>,
}

impl PostgresStorage {
    /// Connects to the server of `url` and creates the tables if they are missing.
    pub fn open(url: &str) -> Result<PostgresStorage> {
        let url = StudyUrl::parse(url)?;
        let err = |e: postgres::Error| Error::study(url.shown.clone(), describe(&e));
        let mut client = connect(&url)?;
        let mut tx = client.transaction().map_err(err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(err)?;
        tx.batch_execute(sql::SCHEMA).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(PostgresStorage {
            url,
            client: Mutex::new(client),
        })
    }

    /// The study's name (from the URL's `?study=`).
    pub fn study_name(&self) -> &str {
        &self.url.study
    }

    /// The URL for messages (no password).
    pub fn shown_url(&self) -> &str {
        &self.url.shown
    }

    fn err(&self, e: postgres::Error) -> Error {
        Error::study(self.url.shown.clone(), describe(&e))
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load(&self, c: &mut impl GenericClient) -> Result<Vec<TrialRecord>> {
        let name = &self.url.study;
        let intermediate = c
            .query(sql::SELECT_INTERMEDIATE, &[name])
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<std::result::Result<Vec<_>, postgres::Error>>()
            .map_err(|e| self.err(e))?;
        let trials = c
            .query(sql::SELECT_TRIALS, &[name])
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                    r.try_get(7)?,
                    r.try_get(8)?,
                ))
            })
            .collect::<std::result::Result<Vec<_>, postgres::Error>>()
            .map_err(|e| self.err(e))?;
        sql::records(trials, intermediate, |e| {
            Error::study(self.url.shown.clone(), e)
        })
    }
}

impl Storage for PostgresStorage {
    fn open_study(&self, spec: &str) -> Result<String> {
        let mut c = self.client();
        c.execute(sql::INSERT_STUDY, &[&self.url.study, &spec])
            .map_err(|e| self.err(e))?;
        c.query_one(sql::SELECT_SPEC, &[&self.url.study])
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.err(e))
    }

    fn ask(
        &self,
        worker: &str,
        stale_after: Duration,
        propose: &mut Propose<'_>,
    ) -> Result<Option<Asked>> {
        let mut c = self.client();
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        let locked = tx
            .query_opt(
                "SELECT 1 FROM studies WHERE name = $1 FOR UPDATE",
                &[&self.url.study],
            )
            .map_err(|e| self.err(e))?;
        if locked.is_none() {
            return Err(Error::study(
                self.url.shown.clone(),
                "no such study (open_study creates it)",
            ));
        }
        let trials = self.load(&mut tx)?;
        let asked = next_trial(&trials, worker, stale_after, propose)?;
        if let Some(a) = &asked {
            let t = &a.trial;
            let params =
                serde_json::to_string(&t.params).map_err(|e| Error::study(self.shown_url(), e))?;
            tx.execute(
                sql::UPSERT_ASKED,
                &[
                    &self.url.study,
                    &(t.number as i64),
                    &t.state.as_str(),
                    &params,
                    &t.started,
                    &t.heartbeat,
                    &t.worker,
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
        self.client()
            .execute(
                sql::TELL,
                &[
                    &state.as_str(),
                    &value,
                    &message,
                    &now(),
                    &self.url.study,
                    &(number as i64),
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn report(&self, number: u64, epoch: usize, value: f64) -> Result<()> {
        let mut c = self.client();
        let mut tx = c.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            sql::REPORT,
            &[&self.url.study, &(number as i64), &(epoch as i64), &value],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(sql::HEARTBEAT, &[&now(), &self.url.study, &(number as i64)])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn heartbeat(&self, number: u64) -> Result<()> {
        self.client()
            .execute(sql::HEARTBEAT, &[&now(), &self.url.study, &(number as i64)])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn trials(&self) -> Result<Vec<TrialRecord>> {
        let mut c = self.client();
        self.load(&mut *c)
    }
}

/// Whether the server of `url` holds its study (without creating anything).
pub fn exists(url: &str) -> Result<bool> {
    let parsed = StudyUrl::parse(url)?;
    match connect(&parsed)?.query_opt(sql::SELECT_SPEC, &[&parsed.study]) {
        Ok(row) => Ok(row.is_some()),
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => Ok(false),
        Err(e) => Err(Error::study(parsed.shown, describe(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::sampler::SamplerConfig;
    use crate::search::space::Space;
    use crate::search::study::{Study, StudySpec};

    #[test]
    fn a_study_url_gives_its_name_and_hides_its_password() {
        let u = StudyUrl::parse("postgres://ann:s3cret@db.lan:5433/graft?study=lr&sslmode=disable")
            .unwrap();
        assert_eq!(u.study, "lr");
        assert_eq!(
            u.connect,
            "postgres://ann:s3cret@db.lan:5433/graft?sslmode=disable"
        );
        assert_eq!(u.shown, "postgres://ann@db.lan:5433/graft?study=lr");
        let d = StudyUrl::parse("postgresql://ann@127.0.0.1/postgres").unwrap();
        assert_eq!(
            (d.study.as_str(), d.connect.as_str()),
            ("default", "postgresql://ann@127.0.0.1/postgres")
        );
        assert!(StudyUrl::parse("postgres://h/db?study=").is_err());
        assert!(!is_url("runs/search1"));
    }

    #[test]
    fn an_unreachable_server_is_an_error_naming_the_url_without_its_password() {
        // Port 1 on loopback: nothing listens there.
        let Err(e) = PostgresStorage::open("postgres://ann:s3cret@127.0.0.1:1/db?study=x") else {
            panic!("connected to port 1");
        };
        let msg = e.to_string();
        assert!(
            msg.contains("postgres://ann@127.0.0.1:1/db?study=x"),
            "{msg}"
        );
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    /// The test server's URL with a study name unique to this run, or `None` (and a loud line) without one.
    fn test_url(what: &str) -> Option<String> {
        let Ok(base) = std::env::var("GRAFT_TEST_POSTGRES_URL") else {
            eprintln!("SKIPPED: set GRAFT_TEST_POSTGRES_URL (scripts/postgres-test-server.sh)");
            return None;
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        Some(format!(
            "{base}{sep}study={what}-{}-{}",
            std::process::id(),
            (now() * 1e6) as u64
        ))
    }

    fn spec() -> StudySpec {
        StudySpec {
            space: Space::from_toml("[x]\nfloat = [0.0, 1.0]\n[y]\nint = [0, 100]", &[]).unwrap(),
            sampler: SamplerConfig::Random,
            seed: 5,
            ..Default::default()
        }
    }

    #[test]
    fn threads_asking_at_once_get_distinct_consecutive_numbers() {
        let Some(url) = test_url("threads") else {
            return;
        };
        let n = 40;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let study = Study::open(Box::new(PostgresStorage::open(&url).unwrap()), spec())
                        .unwrap();
                    barrier.wait();
                    let mut mine = Vec::new();
                    while let Some(t) = study.ask(Some(n)).unwrap() {
                        study.report(t.number, 1, 0.5).unwrap();
                        let x = t.params["x"].as_f64();
                        study.tell(t.number, TrialState::Complete, x).unwrap();
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
        assert_eq!(all, (0..n as u64).collect::<Vec<_>>());
        let trials = PostgresStorage::open(&url).unwrap().trials().unwrap();
        assert_eq!(trials.len(), n);
        assert!(trials
            .iter()
            .all(|t| t.state == TrialState::Complete && t.intermediate.len() == 1));
        let again = crate::search::sampler::random_params(&spec().space, 5, 17);
        assert_eq!(trials[17].params, again);
        assert!(exists(&url).unwrap());
    }

    #[test]
    fn a_running_trial_with_a_stale_heartbeat_is_taken_over_and_the_first_spec_wins() {
        let Some(url) = test_url("stale") else {
            return;
        };
        let mut a = Study::open(Box::new(PostgresStorage::open(&url).unwrap()), spec()).unwrap();
        let first = a.ask(Some(3)).unwrap().unwrap();
        assert!(!first.resumed);
        a.stale_after = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(20));
        let again = a.ask(Some(3)).unwrap().unwrap();
        assert_eq!((again.number, again.resumed), (first.number, true));
        assert_eq!(again.params, first.params);
        // A second worker joining with another seed gets the stored spec.
        let other = StudySpec { seed: 99, ..spec() };
        let b = Study::open(Box::new(PostgresStorage::open(&url).unwrap()), other).unwrap();
        assert_eq!(b.spec().seed, 5);
        let other_study = url.replace("study=stale", "study=other-stale");
        assert!(
            !exists(&other_study).unwrap(),
            "studies are kept apart by name"
        );
    }
}
