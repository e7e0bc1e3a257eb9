//! What a run saves to resume, and run folders.
//!
//! [`TrainState`] is the metadata of every [`Checkpoint`] a run writes (see [`crate::formats::checkpoint`] for
//! the file itself). Every file is written atomically ([`write_atomic`]): to `NAME.tmp` in the same folder, fsynced, then renamed
//! over `NAME`. A crash or Ctrl-C at any moment leaves either the old or the new file, never a torn one; a stray
//! `NAME.tmp` from a crash is simply overwritten by the next save.
//!
//! A [`RunDir`] is the folder of one training run: `run.json` (marks it as a graft run), `config.json`,
//! `metrics.jsonl`, `best.safetensors`, `last.safetensors` and the PNG plots.

use crate::formats::checkpoint::Checkpoint;
use crate::optim::schedule::ReduceOnPlateau;
use crate::rng::RngState;
use crate::train::early_stop::EarlyStopping;
use crate::train::metrics::EpochMetrics;
use crate::{Error, Result};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use crate::fsutil::{tmp_path, write_atomic};
/// Version of the run folder's checkpoint contents ([`TrainState`]). 2: typed state with the run's position,
/// plateau and resolved model; checkpoints without the field are version 1 (graft before the one runner).
pub const RUN_FORMAT: u32 = 2;

/// Where a run stands: the phase it is in and the epochs done in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub phase: usize,
    /// Epochs finished in the phase.
    pub phase_epoch: usize,
    /// The phase ended before its last epoch (an independent phase stopped early).
    pub phase_done: bool,
}

/// Everything besides tensors that a resumed run needs, named in one place: the metadata of every checkpoint
/// (its tensors: the model under `model.`, the optimizer state under `optim.`). `C` is the command's config,
/// `R` what the run resolved its model to (for fine-tuning the [`crate::models::classifier::ClassifierSpec`]),
/// so that export and eval read the model from here and never resolve the base again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState<C = serde_json::Value, R = serde_json::Value> {
    /// [`RUN_FORMAT`].
    pub format: u32,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: u64,
    pub position: Position,
    /// The early-stopping policy with its best value and patience count.
    pub early_stop: Option<EarlyStopping>,
    /// `ReduceLROnPlateau`'s state, for `--schedule plateau`.
    pub plateau: Option<ReduceOnPlateau>,
    /// Named generators (`dropout`, ...) at the end of `epoch`.
    pub rng: BTreeMap<String, RngState>,
    /// Non-tensor optimizer state (rule, step counts, hyperparameters per group) as `OptimState::metadata`
    /// writes it; its tensors live under `optim.`.
    pub optimizer: BTreeMap<String, String>,
    /// The run's full configuration.
    pub config: C,
    /// The model the run trains, as resolved once at its start.
    pub model: R,
    /// The metrics of every epoch up to `epoch`, so that a kill between writing this checkpoint and appending
    /// to `metrics.jsonl` loses no record: a resume rewrites the log from here.
    pub history: Vec<EpochMetrics>,
    /// Optimizer steps skipped so far because their loss was not finite.
    pub bad_steps: u64,
    /// Updates of the weights' moving average (its tensors live under `ema.`); 0 without one.
    #[serde(default)]
    pub ema_updates: u64,
}

impl<C: DeserializeOwned, R: DeserializeOwned> TrainState<C, R> {
    /// The state of checkpoint `ck` (loaded from `path`). A checkpoint of another run format is refused with
    /// an error naming both versions.
    pub fn from_checkpoint(ck: &Checkpoint, path: &Path) -> Result<Self> {
        let format = ck
            .meta_json()
            .get("format")
            .and_then(|v| v.as_u64())
            .unwrap_or(1);
        if format != u64::from(RUN_FORMAT) {
            return Err(Error::bad_file(
                path,
                format!(
                    "written in run format {format} (an older graft); this graft reads run format {RUN_FORMAT}: train the run again, or use the graft that wrote it"
                ),
            ));
        }
        ck.meta()
    }
}

/// Name of the file that marks a folder as a graft run.
pub const RUN_MARKER: &str = "run.json";

/// What `run.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Always `"graft"`.
    pub tool: String,
    pub graft_version: String,
    /// Creation time, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created_utc: String,
}

/// The folder of one training run and the names of the files in it.
///
/// A `RunDir` made by [`RunDir::create`] or [`RunDir::open_to_resume`] holds the folder's [`RunLock`] (clones
/// share it): one process at a time writes a run. [`RunDir::open_existing`] only reads (export, eval) and takes
/// no lock.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
    lock: Option<std::sync::Arc<RunLock>>,
}

impl PartialEq for RunDir {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}
impl Eq for RunDir {}

/// The folder of a run's TensorBoard event files (`tensorboard --logdir RUN` or `--logdir runs/` reads it).
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// Files of a run that are only results of its checkpoints: a run folder with no `last.safetensors` holds
/// nothing that cannot be made again, so reusing it removes these.
const RESULT_FILES: &[&str] = &[
    "config.json",
    "metrics.jsonl",
    "best.safetensors",
    "curves.png",
    "confusion.png",
    "summary.txt",
    "summary.json",
];

impl RunDir {
    /// Creates the run folder: `path` when given, otherwise a fresh `runs/YYYYmmdd-HHMMSS` (UTC), with `-2`,
    /// `-3`, ... appended when that name is taken. A given `path` may exist if it is empty, or if it is a graft
    /// run that never wrote a checkpoint (it died before its first epoch ended: its leftovers are removed and it
    /// starts again); a run with a checkpoint is refused, and so is a folder another process holds.
    pub fn create(path: Option<&Path>) -> Result<RunDir> {
        match path {
            Some(p) => Self::create_at(p, SystemTime::now()),
            None => Self::create_dated(Path::new("runs"), SystemTime::now()),
        }
    }

    /// Creates a fresh dated folder under `root` for the time `now`.
    pub fn create_dated(root: &Path, now: SystemTime) -> Result<RunDir> {
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let stamp = utc_stamp(now, false);
        for n in 1.. {
            let name = if n == 1 {
                stamp.clone()
            } else {
                format!("{stamp}-{n}")
            };
            let path = root.join(name);
            match fs::create_dir(&path) {
                Ok(()) => return Self::init(path, now),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        unreachable!("the loop returns")
    }

    fn create_at(path: &Path, now: SystemTime) -> Result<RunDir> {
        if path.join(RUN_MARKER).exists() {
            let lock = RunLock::acquire(path)?;
            if path.join("last.safetensors").exists() {
                return Err(Error::config(
                    "--run-dir",
                    format!(
                        "{} already holds a graft run with a checkpoint; continue it with `graft finetune --resume {}` or choose another folder",
                        path.display(),
                        path.display()
                    ),
                ));
            }
            // A run that died before its first checkpoint: nothing in it is worth keeping.
            for name in RESULT_FILES {
                let f = path.join(name);
                if f.exists() {
                    fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
                }
            }
            let events = path.join(TENSORBOARD_DIR);
            if events.is_dir() {
                fs::remove_dir_all(&events).map_err(|e| Error::io(&events, e))?;
            }
            remove_stale_temporaries(path)?;
            return Self::init_locked(path.to_path_buf(), now, lock);
        }
        if path.exists() {
            let mut entries = fs::read_dir(path).map_err(|e| Error::io(path, e))?;
            if entries.next().is_some() {
                return Err(Error::config(
                    "--run-dir",
                    format!("{} exists and is not empty", path.display()),
                ));
            }
        }
        fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        Self::init(path.to_path_buf(), now)
    }

    fn init(path: PathBuf, now: SystemTime) -> Result<RunDir> {
        let lock = RunLock::acquire(&path)?;
        Self::init_locked(path, now, lock)
    }

    fn init_locked(path: PathBuf, now: SystemTime, lock: RunLock) -> Result<RunDir> {
        let info = RunInfo {
            tool: "graft".into(),
            graft_version: env!("CARGO_PKG_VERSION").into(),
            created_utc: utc_stamp(now, true),
        };
        let run = RunDir {
            path,
            lock: Some(std::sync::Arc::new(lock)),
        };
        let json = serde_json::to_vec_pretty(&info).expect("run info serialises");
        write_atomic(&run.path.join(RUN_MARKER), &json).map_err(|e| match e {
            // Name the folder the user chose, not our temporary file.
            Error::Io { source, .. } => Error::io(&run.path, source),
            other => other,
        })?;
        Ok(run)
    }

    /// Opens an earlier run to continue writing it: [`RunDir::open_existing`] plus the folder's lock (refused
    /// with [`Error::Busy`] while another process holds it) and removal of temporary files a killed writer left.
    pub fn open_to_resume(path: impl AsRef<Path>) -> Result<RunDir> {
        let mut run = Self::open_existing(path)?;
        let lock = RunLock::acquire(&run.path)?;
        remove_stale_temporaries(&run.path)?;
        run.lock = Some(std::sync::Arc::new(lock));
        Ok(run)
    }

    /// Opens the folder of an earlier run for reading. A folder without a valid `run.json` is refused with a
    /// `BadFile` error naming it; nothing in it is touched.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<RunDir> {
        let path = path.as_ref();
        if !path.is_dir() {
            return Err(Error::bad_file(
                path,
                "not a folder (expected a graft run folder)",
            ));
        }
        let marker = path.join(RUN_MARKER);
        let text = match fs::read_to_string(&marker) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::bad_file(
                    path,
                    format!("not a graft run folder ({RUN_MARKER} is missing)"),
                ))
            }
            Err(e) => return Err(Error::io(&marker, e)),
        };
        match serde_json::from_str::<RunInfo>(&text) {
            Ok(info) if info.tool == "graft" => Ok(RunDir {
                path: path.to_path_buf(),
                lock: None,
            }),
            _ => Err(Error::bad_file(marker, "not a graft run marker")),
        }
    }

    /// Whether the run has written a checkpoint it can resume from.
    pub fn has_checkpoint(&self) -> bool {
        self.last_checkpoint().is_file()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn info(&self) -> Result<RunInfo> {
        read_json(&self.path.join(RUN_MARKER))
    }
    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }
    pub fn best_checkpoint(&self) -> PathBuf {
        self.path.join("best.safetensors")
    }
    pub fn last_checkpoint(&self) -> PathBuf {
        self.path.join("last.safetensors")
    }
    /// The checkpoint to resume from (`last.safetensors`); a run that has not finished an epoch yet has none, and
    /// says so.
    pub fn resume_checkpoint(&self) -> Result<PathBuf> {
        let last = self.last_checkpoint();
        if last.is_file() {
            Ok(last)
        } else {
            Err(Error::bad_file(
                &self.path,
                "this run has no checkpoint to resume from yet (last.safetensors is missing)",
            ))
        }
    }
    /// Loss and accuracy curves.
    pub fn curves_png(&self) -> PathBuf {
        self.path.join("curves.png")
    }
    pub fn confusion_png(&self) -> PathBuf {
        self.path.join("confusion.png")
    }
    /// The outcome of a finished run, as JSON.
    pub fn summary_path(&self) -> PathBuf {
        self.path.join("summary.json")
    }

    /// Writes `config.json` atomically.
    pub fn write_config(&self, config: &impl Serialize) -> Result<()> {
        let json = serde_json::to_vec_pretty(config)
            .map_err(|e| Error::config("run config", e.to_string()))?;
        write_atomic(&self.config_path(), &json)
    }

    pub fn read_config<T: DeserializeOwned>(&self) -> Result<T> {
        read_json(&self.config_path())
    }
}

/// Name of the lock file inside a run folder (see [`RunLock`]).
pub const LOCK_FILE: &str = "lock";

/// An exclusive claim on a run folder, held for as long as this value (or a clone of the [`RunDir`]
/// holding it) lives.
///
/// It is an OS file lock (`flock`) on `RUN/lock`, not the file's existence: the kernel drops it when the
/// process ends in any way (exit, panic, `kill -9`), so a lock left by a dead process never blocks anyone,
/// and there is no stale-lock timeout to guess. The file holds the holder's pid, only for the message a
/// second process gets.
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    /// Takes the lock of `dir`, or fails with [`Error::Busy`] naming the holder's pid.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text
                    .trim()
                    .parse::<u32>()
                    .map_or("another graft process".to_string(), |pid| {
                        format!("another graft process (pid {pid})")
                    });
                return Err(Error::Busy {
                    path: dir.to_path_buf(),
                    holder,
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::io(&path, e))?;
        Ok(RunLock { _file: file })
    }
}

/// Removes the `*.tmp` files a killed writer left in `dir` (only called with the folder's lock held, so no
/// live writer owns them).
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "tmp") && path.is_file() {
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, e.to_string()))
}

/// `YYYYmmdd-HHMMSS` or, with `iso`, `YYYY-mm-ddTHH:MM:SSZ`, in UTC.
pub fn utc_stamp(t: SystemTime, iso: bool) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let (hh, mm, ss) = (s / 3600, s / 60 % 60, s % 60);
    if iso {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
    }
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;
    use crate::train::early_stop::Monitor;
    use candle_core::DType;
    use candle_core::{Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_nn::VarMap;
    use std::collections::HashMap;
    use std::time::Duration;

    fn state() -> TrainState {
        let mut es = EarlyStopping::new(Monitor::ValAcc, Some(3), 0.001).unwrap();
        es.observe(1, 0.5);
        es.observe(2, 0.4);
        TrainState {
            format: RUN_FORMAT,
            epoch: 2,
            step: 250,
            position: Position {
                phase: 1,
                phase_epoch: 1,
                phase_done: false,
            },
            early_stop: Some(es),
            plateau: None,
            rng: [("dropout".to_string(), RngState::of(&seeded(5)))].into(),
            optimizer: [("kind".to_string(), "adam".to_string())].into(),
            config: serde_json::json!({"base": "resnet18", "lr": 0.001}),
            model: serde_json::json!({"arch": "resnet18", "classes": ["cat", "dog"]}),
            history: Vec::new(),
            bad_steps: 0,
            ema_updates: 0,
        }
    }

    fn sample() -> Checkpoint {
        let dev = Device::Cpu;
        let mut ck = Checkpoint::new(&state()).unwrap();
        ck.insert_prefixed(
            "model",
            [
                (
                    "fc.weight",
                    Tensor::arange(0f32, 6.0, &dev)
                        .unwrap()
                        .reshape((2, 3))
                        .unwrap(),
                ),
                ("fc.bias", Tensor::new(&[0.5f32, -0.5], &dev).unwrap()),
            ],
        );
        ck.insert(
            "optim.exp_avg.fc.bias",
            Tensor::new(&[1e-3f64, 2e-3], &dev).unwrap(),
        );
        ck.insert("optim.steps", Tensor::new(&[250i64], &dev).unwrap());
        ck
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dtype() == b.dtype()
            && a.dims() == b.dims()
            && a.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                == b.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
    }

    #[test]
    fn checkpoint_round_trips_tensors_and_train_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        let ck = sample();
        ck.save(&path).unwrap();
        let back = Checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.tensors().len(), 4);
        for (k, t) in ck.tensors() {
            assert!(same(t, &back.tensors()[k]), "{k} differs");
        }
        assert_eq!(back.meta::<TrainState>().unwrap(), state());
        assert_eq!(back.with_prefix("model").len(), 2);
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn varmap_weights_are_saved_and_restored_by_name() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let w = vb
            .pp("head")
            .pp("fc")
            .get_with_hints((3, 4), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let saved = w.copy().unwrap();
        let mut ck = Checkpoint::new(&serde_json::json!({})).unwrap();
        ck.insert_varmap("model", &varmap).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("best.safetensors");
        ck.save(&path).unwrap();

        varmap.data().lock().unwrap()["head.fc.weight"]
            .set(&Tensor::zeros((3, 4), DType::F32, &dev).unwrap())
            .unwrap();
        Checkpoint::load(&path, &dev)
            .unwrap()
            .restore_varmap("model", &varmap)
            .unwrap();
        assert!(
            same(&w, &saved),
            "the head's own tensor sees the restored values"
        );
    }

    #[test]
    fn a_resumed_head_computes_what_the_uninterrupted_one_would_have() {
        use crate::models::head::{Activation, Head, HeadConfig};
        let dev = Device::Cpu;
        let cfg = HeadConfig::with_hidden(16, 0.5, Activation::Relu);
        let build = || {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let head = Head::new(&cfg, 8, 3, vb.pp("head")).unwrap();
            (varmap, head)
        };
        let x = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        let (varmap, head) = build();
        head.reset_parameters(&mut seeded(1)).unwrap();
        let head = head.with_dropout_seed(2);
        head.forward(&x, true).unwrap();

        let mut st = state();
        st.rng = [("dropout".to_string(), head.rng_state())].into();
        let mut ck = Checkpoint::new(&st).unwrap();
        ck.insert_varmap("model", &varmap).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        ck.save(&path).unwrap();
        let expected: Vec<f32> = head
            .forward(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let (varmap2, head2) = build();
        let back = Checkpoint::load(&path, &dev).unwrap();
        back.restore_varmap("model", &varmap2).unwrap();
        head2
            .set_rng_state(&back.meta::<TrainState>().unwrap().rng["dropout"])
            .unwrap();
        let got: Vec<f32> = head2
            .forward(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn restoring_into_a_model_with_a_missing_or_misshapen_tensor_names_it() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        vb.get_with_hints(3, "fc.bias", candle_nn::Init::Const(0.0))
            .unwrap();
        let err = sample()
            .restore_varmap("model", &varmap)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.fc.bias") && err.contains("[3]"),
            "{err}"
        );
        let err = sample()
            .restore_varmap("other", &varmap)
            .unwrap_err()
            .to_string();
        assert!(err.contains("other.fc.bias"), "{err}");
    }

    #[test]
    fn a_truncated_checkpoint_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        sample().save(&path).unwrap();
        let bytes = fs::read(&path).unwrap();
        for cut in [0, 5, bytes.len() / 2, bytes.len() - 1] {
            fs::write(&path, &bytes[..cut]).unwrap();
            let err = Checkpoint::load(&path, &Device::Cpu).unwrap_err();
            assert!(matches!(err, Error::BadFile { .. }), "cut at {cut}: {err}");
            assert!(err.to_string().contains("last.safetensors"), "{err}");
        }
    }

    #[test]
    fn a_flipped_bit_in_the_tensor_data_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        sample().save(&path).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let err = Checkpoint::load(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn a_plain_weights_file_is_not_taken_for_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("fc.bias", t)]), &path).unwrap();
        let err = Checkpoint::load(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a graft checkpoint"), "{err}");
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_checkpoint_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        sample().save(&path).unwrap();
        // The crash: a half-written temporary file next to the good one.
        fs::write(tmp_path(&path), b"half a checkpo").unwrap();
        let back = Checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.meta::<TrainState>().unwrap().step, 250);
        // The next save simply replaces the stray temporary file.
        let mut newer = state();
        newer.step = 300;
        Checkpoint::new(&newer).unwrap().save(&path).unwrap();
        assert!(!tmp_path(&path).exists());
        assert_eq!(
            Checkpoint::load(&path, &Device::Cpu)
                .unwrap()
                .meta::<TrainState>()
                .unwrap()
                .step,
            300
        );
    }

    #[test]
    fn a_failed_save_keeps_what_was_saved_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        sample().save(&path).unwrap();
        // A folder squatting on the temporary name makes the next save fail before the rename.
        fs::create_dir(tmp_path(&path)).unwrap();
        assert!(Checkpoint::new(&state()).unwrap().save(&path).is_err());
        assert_eq!(
            Checkpoint::load(&path, &Device::Cpu)
                .unwrap()
                .tensors()
                .len(),
            4
        );
    }

    #[test]
    fn dated_run_folders_are_named_in_utc_and_never_reused() {
        let root = tempfile::tempdir().unwrap();
        // 2024-02-29 13:05:09 UTC
        let t = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
        let a = RunDir::create_dated(root.path(), t).unwrap();
        let b = RunDir::create_dated(root.path(), t).unwrap();
        assert_eq!(a.path().file_name().unwrap(), "20240229-130509");
        assert_eq!(b.path().file_name().unwrap(), "20240229-130509-2");
        assert_eq!(a.info().unwrap().created_utc, "2024-02-29T13:05:09Z");
        assert_eq!(RunDir::open_existing(a.path()).unwrap(), a);
    }

    #[test]
    fn utc_dates_are_right_across_leap_years_and_the_epoch() {
        assert_eq!(utc_stamp(UNIX_EPOCH, true), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_868_800); // 2000-03-01
        assert_eq!(utc_stamp(t, false), "20000301-000000");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_399); // 2100-02-28 23:59:59
        assert_eq!(utc_stamp(t, true), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn a_run_without_a_checkpoint_cannot_be_resumed_and_says_so() {
        let root = tempfile::tempdir().unwrap();
        let run = RunDir::create(Some(&root.path().join("r"))).unwrap();
        let err = run.resume_checkpoint().unwrap_err().to_string();
        assert!(err.contains("no checkpoint") && err.contains("r"), "{err}");
        sample().save(run.last_checkpoint()).unwrap();
        assert_eq!(run.resume_checkpoint().unwrap(), run.last_checkpoint());
    }

    #[test]
    fn a_folder_that_is_not_a_run_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunDir::open_existing(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("not a graft run folder") && err.contains("run.json"),
            "{err}"
        );
        fs::write(dir.path().join(RUN_MARKER), "{}").unwrap();
        assert!(RunDir::open_existing(dir.path()).is_err());
        let err = RunDir::open_existing(dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn an_existing_run_or_a_non_empty_folder_is_not_overwritten() {
        let root = tempfile::tempdir().unwrap();
        let chosen = root.path().join("my-run");
        let run = RunDir::create(Some(&chosen)).unwrap();
        run.write_config(&serde_json::json!({"lr": 0.1})).unwrap();
        sample().save(run.last_checkpoint()).unwrap();
        drop(run);
        let err = RunDir::create(Some(&chosen)).unwrap_err().to_string();
        assert!(err.contains("already holds a graft run"), "{err}");
        let run = RunDir::open_existing(&chosen).unwrap();
        assert_eq!(run.read_config::<serde_json::Value>().unwrap()["lr"], 0.1);

        let other = root.path().join("photos");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("cat.jpg"), b"x").unwrap();
        let err = RunDir::create(Some(&other)).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        assert!(!other.join(RUN_MARKER).exists());
    }

    #[test]
    fn a_checkpoint_holding_nan_is_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        let mut ck = sample();
        ck.insert(
            "model.fc.bias",
            Tensor::new(&[f32::NAN, 0.0], &Device::Cpu).unwrap(),
        );
        ck.save(&path).unwrap();
        let err = Checkpoint::load(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.fc.bias") && err.contains("last.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid_and_the_lock_dies_with_its_holder() {
        let root = tempfile::tempdir().unwrap();
        let chosen = root.path().join("r");
        let run = RunDir::create(Some(&chosen)).unwrap();
        sample().save(run.last_checkpoint()).unwrap();
        let err = RunDir::open_to_resume(&chosen).unwrap_err();
        assert!(matches!(err, Error::Busy { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // Readers are never refused.
        RunDir::open_existing(&chosen).unwrap();
        drop(run);
        RunDir::open_to_resume(&chosen).unwrap();
    }

    #[test]
    fn a_run_that_died_before_its_first_checkpoint_is_reused_and_its_temporaries_cleaned() {
        let root = tempfile::tempdir().unwrap();
        let chosen = root.path().join("r");
        let run = RunDir::create(Some(&chosen)).unwrap();
        run.write_config(&serde_json::json!({"lr": 0.1})).unwrap();
        fs::write(run.metrics_path(), "{}\n").unwrap();
        fs::write(chosen.join("last.safetensors.tmp"), b"torn").unwrap();
        drop(run);
        let again = RunDir::create(Some(&chosen)).unwrap();
        assert!(!again.config_path().exists() && !again.metrics_path().exists());
        assert!(!chosen.join("last.safetensors.tmp").exists());
    }

    #[test]
    fn a_run_folder_that_cannot_be_created_is_named_in_the_error() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        // A folder below a regular file cannot be created, whoever runs the test (root ignores permissions).
        let err = RunDir::create(Some(&file.join("run"))).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("a-file/run"), "{err}");
        let err = RunDir::create_dated(&file, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("a-file"), "{err}");
    }

    #[test]
    fn a_checkpoint_of_an_older_run_format_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        // What graft wrote before the one runner: no `format`, untyped parts.
        let old = serde_json::json!({"epoch": 2, "step": 10, "data": {}, "optimizer": {}, "schedule": {},
            "config": {}, "classes": ["a"], "rng": {}, "early_stop": null});
        Checkpoint::new(&old).unwrap().save(&path).unwrap();
        let ck = Checkpoint::load(&path, &Device::Cpu).unwrap();
        let msg = TrainState::<serde_json::Value, serde_json::Value>::from_checkpoint(&ck, &path)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("run format 1")
                && msg.contains("run format 2")
                && msg.contains("last.safetensors"),
            "{msg}"
        );
        Checkpoint::new(&state()).unwrap().save(&path).unwrap();
        let ck = Checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!(TrainState::from_checkpoint(&ck, &path).unwrap(), state());
    }
}
