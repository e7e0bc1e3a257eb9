//! Reading weight files (safetensors, PyTorch checkpoints) and loading them into a model's `VarMap`,
//! strictly: every tensor the model needs must be present with the right shape, and every tensor in the
//! file must be used, except the ones the caller names as skippable (the old classifier when a new head is
//! attached; `num_batches_tracked`). The [`LoadReport`] says what happened.

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Named tensors read from one file.
pub struct WeightFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    /// The file's `__metadata__` (safetensors only).
    pub metadata: HashMap<String, String>,
}

/// Reads a `.safetensors` file, or a PyTorch checkpoint (`.pth`, `.pt`, `.bin`, `.ckpt`; zip or legacy).
pub fn read_weights(path: &Path, device: &Device) -> Result<WeightFile> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        ));
    }
    let is_safetensors = path
        .extension()
        .map(|e| e.eq_ignore_ascii_case("safetensors"))
        .unwrap_or(false);
    if is_safetensors {
        read_safetensors(path, device)
    } else {
        let tensors = crate::models::pth::load_pth(path)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(WeightFile {
            path: path.to_path_buf(),
            tensors,
            metadata: HashMap::new(),
        })
    }
}

/// Reads every tensor of a safetensors file; a truncated or corrupt file is a `BadFile` error naming it.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<WeightFile> {
    use candle_core::safetensors::Load;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view
            .load(device)
            .map_err(|e| Error::bad_file(path, format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, t);
    }
    Ok(WeightFile {
        path: path.to_path_buf(),
        tensors,
        metadata,
    })
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub file: PathBuf,
    /// Tensors copied into the model.
    pub loaded: usize,
    /// Parameters of the model that were left at their initial values (a new head), by name.
    pub initialised: Vec<String>,
    /// Tensors in the file that were not used, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl LoadReport {
    /// One line for the user, e.g. `loaded 122 tensors from f; skipped 2 (...); new: fc.weight, fc.bias`.
    pub fn summary(&self) -> String {
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, r) in &self.skipped {
            *reasons.entry(r.as_str()).or_default() += 1;
        }
        let mut s = format!(
            "loaded {} tensors from {}",
            self.loaded,
            self.file.display()
        );
        if !self.skipped.is_empty() {
            let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            s.push_str(&format!("; skipped {}", parts.join(", ")));
        }
        if !self.initialised.is_empty() {
            s.push_str(&format!(
                "; newly initialised: {}",
                self.initialised.join(", ")
            ));
        }
        s
    }
}

/// Copies `file`'s tensors into `varmap`.
///
/// `fresh_prefix` names a key prefix of the *model* (e.g. `head`) whose parameters the model initialises
/// itself: they are not loaded. `skip_prefix` names a key prefix of the *file* (e.g. `fc`, the old
/// 1000-class classifier when a new head is attached) whose tensors are skipped. Any other parameter missing
/// from the file, or present with another shape, is an error naming the tensor; any other tensor in the file
/// that the model does not have is an error too, except `num_batches_tracked`.
pub fn load_into(
    varmap: &VarMap,
    file: &WeightFile,
    fresh_prefix: Option<&str>,
    skip_prefix: Option<&str>,
) -> Result<LoadReport> {
    let under = |key: &str, prefix: &str| key == prefix || key.starts_with(&format!("{prefix}."));
    let is_fresh = |key: &str| fresh_prefix.map(|p| under(key, p)).unwrap_or(false);
    let is_skipped = |key: &str| skip_prefix.map(|p| under(key, p)).unwrap_or(false);
    let mut report = LoadReport {
        file: file.path.clone(),
        ..Default::default()
    };
    let vars = varmap.data().lock().expect("varmap lock poisoned");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        if is_fresh(name) {
            report.initialised.push(name.clone());
            continue;
        }
        let t = file.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            file: file.path.clone(),
        })?;
        if t.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                name: name.clone(),
                file: file.path.clone(),
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&t)?;
        report.loaded += 1;
    }
    let mut extra: Vec<&String> = file
        .tensors
        .keys()
        .filter(|k| !vars.contains_key(*k) || (is_fresh(k) && is_skipped(k)))
        .collect();
    extra.sort();
    for key in extra {
        if key.ends_with("num_batches_tracked") {
            report
                .skipped
                .push((key.clone(), "num_batches_tracked".into()));
        } else if is_skipped(key) {
            report.skipped.push((key.clone(), "old classifier".into()));
        } else {
            return Err(Error::bad_file(
                &file.path,
                format!("unexpected tensor `{key}` {:?}: the model has no such parameter (wrong architecture?)", file.tensors[key].dims()),
            ));
        }
    }
    Ok(report)
}

/// Writes named tensors and string metadata to `path` atomically: a temporary file in the same folder
/// is written and synced, then renamed over `path`, so a crash never leaves a half-written file.
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut cpu: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        cpu.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(&str, &Tensor)> = cpu.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let bytes = safetensors::tensor::serialize(views, metadata)
        .map_err(|e| Error::bad_file(path, format!("cannot serialise: {e}")))?;
    crate::fsutil::write_atomic(path, &bytes)
}
