//! The checkpoint file: ONE safetensors file of named tensors (model weights under `model.`, optimizer state
//! under `optim.`, by convention) plus JSON metadata (anything `Serialize`; a training run stores its
//! `TrainState`) kept as a string in the safetensors `__metadata__` header together with a format tag and a
//! SHA-256 of the data section (all tensor bytes), so a truncated or bit-flipped file is refused with an error
//! naming it instead of resuming from garbage. Saving is atomic (a temporary file renamed into place).

use crate::fsutil::{sha256_hex, write_atomic};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// Value of the `format` key in a checkpoint's `__metadata__`.
pub const CHECKPOINT_FORMAT: &str = "graft-checkpoint/1";

/// Named tensors plus typed metadata, saved and loaded as one safetensors file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    tensors: BTreeMap<String, Tensor>,
    meta: serde_json::Value,
    /// The file this was loaded from, for error messages.
    source: Option<PathBuf>,
}

impl Checkpoint {
    /// An empty checkpoint carrying `meta`.
    pub fn new(meta: &impl Serialize) -> Result<Self> {
        let meta = serde_json::to_value(meta)
            .map_err(|e| Error::config("checkpoint metadata", e.to_string()))?;
        Ok(Checkpoint {
            tensors: BTreeMap::new(),
            meta,
            source: None,
        })
    }

    /// Adds one tensor under its full name (`__metadata__` is reserved by safetensors; saving refuses it).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Adds tensors as `prefix.name` (e.g. `model.layer1.0.conv1.weight`, `optim.exp_avg.fc.weight`).
    pub fn insert_prefixed<K: AsRef<str>>(
        &mut self,
        prefix: &str,
        tensors: impl IntoIterator<Item = (K, Tensor)>,
    ) {
        for (k, t) in tensors {
            self.tensors.insert(format!("{prefix}.{}", k.as_ref()), t);
        }
    }

    /// Adds every variable of `varmap` (parameters and BatchNorm buffers) as `prefix.key`, detached copies so that
    /// later training steps cannot change what is saved.
    pub fn insert_varmap(&mut self, prefix: &str, varmap: &VarMap) -> Result<()> {
        let data = varmap.data().lock().expect("varmap poisoned");
        for (k, v) in data.iter() {
            self.tensors
                .insert(format!("{prefix}.{k}"), v.as_tensor().detach().copy()?);
        }
        Ok(())
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// The tensors under `prefix.`, with the prefix stripped.
    pub fn with_prefix(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(&p).map(|k| (k.to_string(), t.clone())))
            .collect()
    }

    /// Sets every variable of `varmap` from `prefix.key`. Every variable must be present with its shape; tensors
    /// in the checkpoint that the varmap does not have are ignored (e.g. optimizer state under another prefix).
    pub fn restore_varmap(&self, prefix: &str, varmap: &VarMap) -> Result<()> {
        let file = self
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<checkpoint>"));
        let data = varmap.data().lock().expect("varmap poisoned");
        for (k, v) in data.iter() {
            let name = format!("{prefix}.{k}");
            let t = self
                .tensors
                .get(&name)
                .ok_or_else(|| Error::MissingTensor {
                    name: name.clone(),
                    file: file.clone(),
                })?;
            if t.dims() != v.dims() {
                return Err(Error::ShapeMismatch {
                    name,
                    file: file.clone(),
                    expected: v.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            v.set(&t.to_device(v.device())?.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    /// The metadata as JSON.
    pub fn meta_json(&self) -> &serde_json::Value {
        &self.meta
    }

    /// The metadata as `T`; a mismatch is a `BadFile` error naming the file it came from.
    pub fn meta<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.meta.clone()).map_err(|e| {
            let path = self
                .source
                .clone()
                .unwrap_or_else(|| PathBuf::from("<checkpoint>"));
            Error::bad_file(path, format!("checkpoint metadata does not fit: {e}"))
        })
    }

    /// Writes the checkpoint atomically to `path` (see the module doc).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if self.tensors.contains_key("__metadata__") {
            return Err(Error::config(
                "checkpoint",
                "`__metadata__` is reserved and cannot name a tensor",
            ));
        }
        let cpu: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let mut header = HashMap::new();
        header.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
        header.insert("meta".to_string(), self.meta.to_string());
        // The checksum covers the data section, which follows the header: serialise once with a placeholder of
        // the same length, hash the data section, then write the digest over the placeholder.
        header.insert("sha256".to_string(), CHECKSUM_PLACEHOLDER.to_string());
        let mut bytes =
            safetensors::serialize(cpu.iter().map(|(k, t)| (k.as_str(), t)), Some(header))
                .map_err(|e| Error::bad_file(path, format!("cannot serialise checkpoint: {e}")))?;
        let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let digest = sha256_hex(&bytes[data_start..]);
        let needle = format!("\"sha256\":\"{CHECKSUM_PLACEHOLDER}\"");
        let at = bytes[..data_start]
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .expect("the placeholder is in the header")
            + "\"sha256\":\"".len();
        bytes[at..at + digest.len()].copy_from_slice(digest.as_bytes());
        write_atomic(path, &bytes)
    }

    /// Reads and validates a checkpoint onto `device`. Truncated, corrupt or foreign files are `BadFile` errors
    /// naming `path`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Checkpoint> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::bad_file(path, reason);
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            bad(format!(
                "not a complete safetensors file ({e}); the file may be truncated or corrupt"
            ))
        })?;
        let (header_len, info) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("unreadable safetensors header ({e})")))?;
        let header = info
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("not a graft checkpoint (no metadata)".into()))?;
        match header.get("format") {
            Some(f) if f == CHECKPOINT_FORMAT => {}
            Some(f) => {
                return Err(bad(format!(
                    "checkpoint format `{f}` is not {CHECKPOINT_FORMAT}"
                )))
            }
            None => return Err(bad("not a graft checkpoint (a plain weights file?)".into())),
        }
        let expected = header
            .get("sha256")
            .ok_or_else(|| bad("checkpoint has no checksum".into()))?;
        if sha256_hex(&bytes[8 + header_len..]) != *expected {
            return Err(bad("checksum mismatch: the tensor data is corrupt".into()));
        }
        let meta: serde_json::Value = serde_json::from_str(
            header
                .get("meta")
                .ok_or_else(|| bad("checkpoint has no metadata".into()))?,
        )
        .map_err(|e| bad(format!("checkpoint metadata is not JSON: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = dtype_of(view.dtype())
                .ok_or_else(|| bad(format!("tensor `{name}` has unsupported dtype")))?;
            let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
            // A run that diverged before the loss showed it must not resume from (or export) NaN weights.
            crate::formats::finite::ensure_finite(&name, &t, path)?;
            tensors.insert(name, t.to_device(device)?);
        }
        Ok(Checkpoint {
            tensors,
            meta,
            source: Some(path.to_path_buf()),
        })
    }
}

fn dtype_of(d: safetensors::Dtype) -> Option<candle_core::DType> {
    use candle_core::DType;
    use safetensors::Dtype as S;
    Some(match d {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

/// Stands in for the checksum while the file is serialised; as long as a hex SHA-256.
const CHECKSUM_PLACEHOLDER: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";
