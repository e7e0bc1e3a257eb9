//! A folder of computed frozen-prefix outputs shared by runs (the trials of a search, or reruns on the same
//! data): a run whose frozen prefix, preprocessing and images are those of an earlier run reads the outputs
//! instead of running the prefix again.
//!
//! An entry is named by a SHA-256 of everything the outputs depend on: the architecture, the prefix depth, the
//! preprocessing, every tensor of the prefix (weights and BatchNorm statistics, bit for bit) and every sample
//! (path, label, file size and modification time). Nothing else can make two entries differ, so a hit gives
//! exactly what the prefix would compute. Entries are [`Checkpoint`] files (checksummed, written atomically);
//! a damaged one is reported and computed again.

use crate::formats::checkpoint::Checkpoint;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Version of the key and file layout; a change starts a fresh set of entries.
const STORE_FORMAT: &str = "graft-features/1";

/// The outputs of one split: `features` and `labels` have one row per decodable sample, in sample order;
/// `rows[i]` is sample `i`'s row (`None` for an image that could not be decoded, listed in `skipped`).
pub struct Stored {
    pub features: Tensor,
    pub labels: Tensor,
    pub rows: Vec<Option<u32>>,
    /// Images that could not be decoded, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    skipped: Vec<(PathBuf, String)>,
}

/// The key of an entry, built from everything its outputs depend on.
pub struct Key(Sha256);

impl Key {
    pub fn new() -> Key {
        let mut h = Sha256::new();
        h.update(STORE_FORMAT.as_bytes());
        Key(h)
    }
    /// Adds a named part (the name keeps parts from running into each other).
    pub fn part(&mut self, name: &str, bytes: &[u8]) {
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }
    /// Adds a tensor's dtype, shape and values.
    pub fn tensor(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let t = t.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let values: Vec<u8> = t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        self.part(name, &values);
        Ok(())
    }
    /// Adds an image file: its path, label, size and modification time (a changed file is another entry).
    pub fn image(&mut self, path: &Path, label: usize) {
        let meta = std::fs::metadata(path).ok();
        let size = meta.as_ref().map_or(0, |m| m.len());
        let mtime = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let mut bytes = (label as u64).to_le_bytes().to_vec();
        bytes.extend(size.to_le_bytes());
        bytes.extend(mtime.to_le_bytes());
        self.part(&path.to_string_lossy(), &bytes);
    }
    fn hex(&self) -> String {
        self.0
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Default for Key {
    fn default() -> Self {
        Key::new()
    }
}

/// A feature store folder.
pub struct FeatureStore {
    dir: PathBuf,
}

impl FeatureStore {
    pub fn new(dir: impl Into<PathBuf>) -> FeatureStore {
        FeatureStore { dir: dir.into() }
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{}.safetensors", key.hex()))
    }

    /// The entry for `key`, or `None` (also for a damaged entry, which is reported).
    pub fn load(&self, key: &Key, device: &Device) -> Result<Option<Stored>> {
        let path = self.path(key);
        if !path.is_file() {
            return Ok(None);
        }
        let read = || -> Result<Stored> {
            let ck = Checkpoint::load(&path, device)?;
            let meta: Meta = ck.meta()?;
            let t = |name: &str| {
                ck.tensors()
                    .get(name)
                    .cloned()
                    .ok_or_else(|| Error::MissingTensor {
                        name: name.into(),
                        file: path.clone(),
                    })
            };
            let rows = t("rows")?
                .to_vec1::<i64>()?
                .into_iter()
                .map(|r| u32::try_from(r).ok())
                .collect();
            Ok(Stored {
                features: t("features")?,
                labels: t("labels")?,
                rows,
                skipped: meta.skipped,
            })
        };
        match read() {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                eprintln!("warning: {e}; computing these features again");
                Ok(None)
            }
        }
    }

    /// Writes the entry for `key` atomically.
    pub fn save(&self, key: &Key, s: &Stored) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let meta = Meta {
            format: STORE_FORMAT.into(),
            skipped: s.skipped.clone(),
        };
        let mut ck = Checkpoint::new(&meta)?;
        ck.insert("features", s.features.clone());
        ck.insert("labels", s.labels.clone());
        let rows: Vec<i64> = s.rows.iter().map(|r| r.map_or(-1, i64::from)).collect();
        let n = rows.len();
        ck.insert("rows", Tensor::from_vec(rows, n, s.features.device())?);
        ck.save(self.path(key))
    }
}
