//! Reading weight files (safetensors, PyTorch checkpoints) and loading them into a model's `VarMap`,
//! strictly: every tensor the model needs must be present with the right shape, and every tensor in the
//! file must be used, except the ones the caller names as skippable (the old classifier when a new head is
//! attached; `num_batches_tracked`). The [`LoadReport`] says what happened.
//!
//! Every file read here is refused when a float tensor holds NaN or an infinity ([`ensure_finite`]), and a
//! safetensors file that carries a checksum of its data ([`CHECKSUM_KEY`], written by
//! [`save_safetensors_checked`]) is refused when its data no longer matches it.

use super::finite::ensure_finite;
use crate::fsutil::sha256_hex;
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
        let tensors = crate::formats::pth::load_pth(path)?
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

/// Reads every tensor of a safetensors file; a truncated or corrupt file is a `BadFile` error naming it, as
/// is one whose data does not match the checksum it carries under [`CHECKSUM_KEY`] (a file without that key
/// is read without the check: plain weights, and deployment files written before exports carried one). A
/// float tensor holding NaN or an infinity is an [`Error::NonFiniteTensor`] naming it and the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<WeightFile> {
    use candle_core::safetensors::Load;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
    if let Some(expected) = metadata.get(CHECKSUM_KEY) {
        if sha256_hex(&bytes[8 + header_len..]) != *expected {
            return Err(Error::bad_file(
                path,
                format!("checksum mismatch ({CHECKSUM_KEY}): the tensor data is corrupt"),
            ));
        }
    }
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| Error::bad_file(path, format!("tensor `{name}`: {e}")))?;
        ensure_finite(&name, &t, path)?;
        tensors.insert(name, t.to_device(device)?);
    }
    Ok(WeightFile {
        path: path.to_path_buf(),
        tensors,
        metadata,
    })
}

/// `__metadata__` key holding the hex SHA-256 of a safetensors file's data section (every tensor byte, after
/// the header), written by [`save_safetensors_checked`] and verified by [`read_safetensors`].
pub const CHECKSUM_KEY: &str = "graft.sha256";

/// Stands in for the checksum while a file is serialised; as long as a hex SHA-256.
const CHECKSUM_PLACEHOLDER: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub file: PathBuf,
    /// Tensors copied into the model.
    pub loaded: usize,
    /// Tensors whose dtype differed from the model's and were converted on load, counted by
    /// `(file dtype, model dtype)`, e.g. `("f16", "f32") -> 120`.
    pub converted: BTreeMap<(&'static str, &'static str), usize>,
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
        // One mention for all converted tensors, not one per tensor.
        let mut targets: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((from, to), n) in &self.converted {
            targets.entry(to).or_default().push(format!("{n} {from}"));
        }
        for (to, parts) in targets {
            s.push_str(&format!(
                "; converted {} tensors to {to}",
                parts.join(" and ")
            ));
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
        if t.dtype() != var.dtype() {
            *report
                .converted
                .entry((t.dtype().as_str(), var.dtype().as_str()))
                .or_default() += 1;
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

/// [`save_safetensors_atomic`] plus a SHA-256 of the data section under [`CHECKSUM_KEY`] in the metadata, so
/// that [`read_safetensors`] refuses the file, naming it, once a bit of its data flips or it is cut short.
/// The file is serialised once with a placeholder of the digest's length, the data section hashed, and the
/// digest written over the placeholder (the header, and so the data's offset, keeps its length).
pub fn save_safetensors_checked(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut cpu: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        cpu.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let mut metadata = metadata;
    metadata.insert(CHECKSUM_KEY.to_string(), CHECKSUM_PLACEHOLDER.to_string());
    let views: Vec<(&str, &Tensor)> = cpu.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::bad_file(path, format!("cannot serialise: {e}")))?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let data_start = 8 + header_len;
    let digest = sha256_hex(&bytes[data_start..]);
    let needle = format!("\"{CHECKSUM_KEY}\":\"{CHECKSUM_PLACEHOLDER}\"");
    let at = bytes[..data_start]
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .ok_or_else(|| Error::bad_file(path, "cannot place the checksum in the header"))?
        + needle.len()
        - CHECKSUM_PLACEHOLDER.len()
        - 1;
    bytes[at..at + digest.len()].copy_from_slice(digest.as_bytes());
    crate::fsutil::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, t: Tensor) -> HashMap<String, Tensor> {
        HashMap::from([(name.to_string(), t)])
    }

    #[test]
    fn a_checksummed_file_round_trips_and_a_flipped_bit_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let t = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        save_safetensors_checked(&p, &one("w", t.clone()), meta).unwrap();
        let back = read_safetensors(&p, &Device::Cpu).unwrap();
        assert_eq!(back.metadata["k"], "v");
        assert_eq!(back.metadata[CHECKSUM_KEY].len(), 64);
        assert_eq!(
            back.tensors["w"].to_vec1::<f32>().unwrap(),
            vec![1., 2., 3., 4.]
        );
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&p, &bytes).unwrap();
        let err = match read_safetensors(&p, &Device::Cpu) {
            Ok(_) => panic!("a flipped bit was not noticed"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("m.safetensors") && err.contains("checksum"),
            "{err}"
        );
    }

    #[test]
    fn converted_dtypes_are_summarised_once() {
        let r = LoadReport {
            file: PathBuf::from("w.pth"),
            loaded: 5,
            converted: BTreeMap::from([(("f16", "f32"), 3), (("f64", "f32"), 2)]),
            ..Default::default()
        };
        let s = r.summary();
        assert!(
            s.contains("converted 3 f16 and 2 f64 tensors to f32"),
            "{s}"
        );
        assert_eq!(s.matches("converted").count(), 1, "{s}");
    }
}
