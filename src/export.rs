//! Deployment files: one safetensors file holding a fine-tuned classifier's weights and, in its
//! `__metadata__`, everything needed to use them (architecture, head, class names, preprocessing, graft
//! version). `graft predict --model` and `graft eval --model` need nothing else.

use crate::models::classifier::{Classifier, ClassifierSpec};
use crate::models::weights;
use crate::train::checkpoint::{Checkpoint, RunDir, TrainState};
use crate::train::finetune::{classifier_spec, FinetuneConfig};
use crate::{Error, Result};
use candle_core::Device;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `__metadata__` key marking a graft deployment file, with its format version.
pub const FORMAT_KEY: &str = "graft.format";
/// The current deployment format.
pub const FORMAT: &str = "graft-model/1";
/// `__metadata__` key holding the [`ClassifierSpec`] as JSON.
pub const SPEC_KEY: &str = "graft.spec";

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub path: PathBuf,
    pub source: PathBuf,
    pub tensors: usize,
    pub spec: ClassifierSpec,
}

/// Writes the run's best weights (its last, if no best was kept) as a deployment file, atomically.
pub fn export_run(run: &RunDir, out: &Path) -> Result<ExportReport> {
    let source = if run.best_checkpoint().is_file() {
        run.best_checkpoint()
    } else {
        run.resume_checkpoint()?
    };
    let ck = Checkpoint::load(&source, &Device::Cpu)?;
    let state: TrainState = ck.meta()?;
    let cfg: FinetuneConfig = serde_json::from_value(state.config.clone())
        .map_err(|e| Error::bad_file(&source, format!("checkpoint config: {e}")))?;
    let spec = classifier_spec(&cfg, state.classes.clone())?;
    let tensors: HashMap<_, _> = ck.with_prefix("model").into_iter().collect();
    if tensors.is_empty() {
        return Err(Error::bad_file(
            &source,
            "no model weights in this checkpoint",
        ));
    }
    // Check that the weights really build the spec's model before anything is written.
    let model = Classifier::new(spec.clone(), &Device::Cpu)?;
    let file = weights::WeightFile {
        path: source.clone(),
        tensors: tensors.clone(),
        metadata: HashMap::new(),
    };
    model.load_all(&file)?;
    let mut metadata = HashMap::new();
    metadata.insert(FORMAT_KEY.to_string(), FORMAT.to_string());
    metadata.insert(
        SPEC_KEY.to_string(),
        serde_json::to_string(&spec).map_err(|e| Error::config("spec", e.to_string()))?,
    );
    metadata.insert(
        "graft.version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    metadata.insert("graft.run".to_string(), run.path().display().to_string());
    weights::save_safetensors_atomic(out, &tensors, Some(metadata))?;
    Ok(ExportReport {
        path: out.to_path_buf(),
        source,
        tensors: tensors.len(),
        spec,
    })
}

/// Loads a deployment file written by [`export_run`].
pub fn load_model(path: &Path, device: &Device) -> Result<Classifier> {
    let file = weights::read_safetensors(path, device)?;
    match file.metadata.get(FORMAT_KEY).map(String::as_str) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(Error::bad_file(
                path,
                format!("deployment format `{other}` is not one this graft reads ({FORMAT})"),
            ))
        }
        None => {
            return Err(Error::bad_file(
                path,
                "not a graft model (no graft.format in its metadata); use --base/--weights for plain weights",
            ))
        }
    }
    let spec: ClassifierSpec = file
        .metadata
        .get(SPEC_KEY)
        .ok_or_else(|| Error::bad_file(path, format!("no `{SPEC_KEY}` in its metadata")))
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| Error::bad_file(path, format!("`{SPEC_KEY}`: {e}")))
        })?;
    let model = Classifier::new(spec, device)?;
    model.load_all(&file)?;
    Ok(model)
}
