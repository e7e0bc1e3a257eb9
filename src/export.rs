//! Deployment files: one safetensors file holding a fine-tuned classifier's weights and, in its
//! `__metadata__`, everything needed to use them (architecture, head, class names, preprocessing, graft
//! version). `graft predict --model` and `graft eval --model` need nothing else.
//!
//! An export carries a SHA-256 of its tensor data under [`weights::CHECKSUM_KEY`], as checkpoints carry
//! theirs, and [`load_model`] refuses a file whose data does not match it, naming the file. Exports written
//! before the checksum existed have none and still load (without the check). Every tensor is checked for NaN
//! and infinities both when the export is written and when it is loaded.

use crate::formats::checkpoint::Checkpoint;
use crate::formats::weights;
use crate::models::classifier::{Classifier, ClassifierSpec};
use crate::train::checkpoint::{RunDir, TrainState};
use crate::train::config::FinetuneConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
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

/// How to write a deployment file.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    /// Fold every BatchNorm into the convolution before it ([`fold_batch_norm`]).
    pub fold_bn: bool,
}

/// Writes the run's best weights (its last, if no best was kept) as a deployment file, atomically (a
/// temporary file renamed into place), with a checksum of its data.
///
/// Refused before anything is read: an `out` that is one of the run's own files (its checkpoints, config,
/// metrics, plots, summary or marker, also through a symlink or hard link), since writing it would destroy
/// the run's record. Refused before anything is written: weights that do not build the run's model, and
/// weights holding NaN or infinities ([`Error::NonFiniteTensor`]), which would predict nothing meaningful.
pub fn export_run(run: &RunDir, out: &Path, opts: ExportOptions) -> Result<ExportReport> {
    let run_files = [
        run.best_checkpoint(),
        run.last_checkpoint(),
        run.config_path(),
        run.metrics_path(),
        run.summary_path(),
        run.curves_png(),
        run.confusion_png(),
        run.path().join(crate::train::checkpoint::RUN_MARKER),
    ];
    crate::fsutil::refuse_output_over_input(out, run_files.iter().map(PathBuf::as_path))?;
    let source = if run.best_checkpoint().is_file() {
        run.best_checkpoint()
    } else {
        run.resume_checkpoint()?
    };
    let ck = Checkpoint::load(&source, &Device::Cpu)?;
    // The model as the run resolved it at its start: neither the model card nor a pretraining folder is read
    // again, so an edited card or a moved `ae:` folder changes nothing here.
    let state: TrainState<FinetuneConfig, ClassifierSpec> =
        TrainState::from_checkpoint(&ck, &source)?;
    let spec = state.model;
    // The weights the run ended with: the moving average when it kept one.
    let prefix = crate::train::runner::model_prefix(&ck);
    let tensors: HashMap<_, _> = ck.with_prefix(prefix).into_iter().collect();
    if tensors.is_empty() {
        return Err(Error::bad_file(
            &source,
            "no model weights in this checkpoint",
        ));
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        crate::formats::finite::ensure_finite(
            &format!("{prefix}.{name}"),
            &tensors[name],
            &source,
        )?;
    }
    // Check that the weights really build the spec's model before anything is written.
    let model = Classifier::new(spec.clone(), &Device::Cpu)?;
    let file = weights::WeightFile {
        path: source.clone(),
        tensors: tensors.clone(),
        metadata: HashMap::new(),
    };
    model.load_all(&file)?;
    let (mut spec, mut tensors) = (spec, tensors);
    if opts.fold_bn {
        fold_batch_norm(&model, &mut tensors)?;
        spec.bn_folded = true;
    }
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
    weights::save_safetensors_checked(out, &tensors, metadata)?;
    Ok(ExportReport {
        path: out.to_path_buf(),
        source,
        tensors: tensors.len(),
        spec,
    })
}

/// Loads a deployment file written by [`export_run`]. Its checksum is verified when it has one (exports
/// written before checksums existed have none and load unchecked) and every tensor is checked for NaN and
/// infinities ([`weights::read_safetensors`]). A training checkpoint given instead is refused with the
/// `graft export` command that turns its run into a deployment file.
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
        None if file.metadata.get("format").map(String::as_str)
            == Some(crate::formats::checkpoint::CHECKPOINT_FORMAT) =>
        {
            let run = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            return Err(Error::bad_file(
                path,
                format!(
                    "this is a training checkpoint, not an exported model; export its run first: \
                     `graft export {} --out model.safetensors`, then use --model model.safetensors",
                    run.display()
                ),
            ));
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
    let mut file = file;
    if model.spec.bn_folded {
        unfold_batch_norm(&model, &mut file.tensors)
            .map_err(|e| Error::bad_file(path, format!("folded BatchNorm: {e}")))?;
    }
    model.load_all(&file)?;
    Ok(model)
}

/// The BatchNorms of `model`'s backbone with the convolution each follows: `(bn prefix, conv prefix, eps)`.
fn bn_conv_pairs(model: &Classifier) -> Result<Vec<(String, String, f64)>> {
    let keys: Vec<String> = model
        .varmap
        .data()
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut pairs = Vec::new();
    for key in keys {
        let Some(bn) = key.strip_suffix(".running_mean") else {
            continue;
        };
        let (conv, eps) = model.backbone.conv_of_bn(bn).ok_or_else(|| {
            Error::config(
                "--fold-bn",
                format!("BatchNorm `{bn}` does not follow a convolution it can be folded into"),
            )
        })?;
        pairs.push((bn.to_string(), conv, eps));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(pairs)
}

fn take(tensors: &mut HashMap<String, Tensor>, key: &str) -> Result<Tensor> {
    tensors.remove(key).ok_or_else(|| Error::MissingTensor {
        name: key.to_string(),
        file: PathBuf::from("<model weights>"),
    })
}

/// Folds every BatchNorm of `model`'s backbone into the convolution before it, in `tensors` (the model's
/// weights by key): per output channel `s = gamma / sqrt(running_var + eps)`, the filter becomes `w * s` and
/// the convolution gets the bias `beta - running_mean * s` (plus `b * s` where it had one); the BatchNorm's
/// tensors are removed. In inference this computes what the unfolded network computes, up to rounding
/// (done in f64), with one pass fewer over every activation in runtimes that run BatchNorm on its own.
/// Returns the number of BatchNorms folded.
pub fn fold_batch_norm(model: &Classifier, tensors: &mut HashMap<String, Tensor>) -> Result<usize> {
    let pairs = bn_conv_pairs(model)?;
    for (bn, conv, eps) in &pairs {
        let f64_of = |t: Tensor| t.to_dtype(DType::F64);
        let gamma = f64_of(take(tensors, &format!("{bn}.weight"))?)?;
        let beta = f64_of(take(tensors, &format!("{bn}.bias"))?)?;
        let mean = f64_of(take(tensors, &format!("{bn}.running_mean"))?)?;
        let var = f64_of(take(tensors, &format!("{bn}.running_var"))?)?;
        tensors.remove(&format!("{bn}.num_batches_tracked"));
        let w_key = format!("{conv}.weight");
        let w = take(tensors, &w_key)?;
        let dtype = w.dtype();
        let c = gamma.dim(0)?;
        let scale = gamma.div(&(var + *eps)?.sqrt()?)?;
        let mut bias = beta.sub(&mean.mul(&scale)?)?;
        if let Some(b) = tensors.remove(&format!("{conv}.bias")) {
            bias = bias.add(&f64_of(b)?.mul(&scale)?)?;
        }
        let w = f64_of(w)?.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        tensors.insert(w_key, w.to_dtype(dtype)?);
        tensors.insert(format!("{conv}.bias"), bias.to_dtype(dtype)?);
    }
    Ok(pairs.len())
}

/// Reads a folded file back into the unchanged architecture: each convolution's bias becomes the shift of
/// its BatchNorm, whose statistics are set to the identity (`gamma 1`, `mean 0`, `var 1 - eps`).
fn unfold_batch_norm(model: &Classifier, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    for (bn, conv, eps) in bn_conv_pairs(model)? {
        let bias = take(tensors, &format!("{conv}.bias"))?;
        let c = bias.dim(0)?;
        let (dtype, dev) = (bias.dtype(), bias.device().clone());
        let ones = Tensor::ones(c, dtype, &dev)?;
        tensors.insert(format!("{bn}.weight"), ones.clone());
        tensors.insert(format!("{bn}.bias"), bias);
        tensors.insert(format!("{bn}.running_mean"), Tensor::zeros(c, dtype, &dev)?);
        tensors.insert(format!("{bn}.running_var"), (ones * (1.0 - eps))?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Preprocess;
    use crate::formats::weights::WeightFile;
    use crate::models::head::HeadConfig;

    fn classifier(arch: &str) -> Classifier {
        let spec = ClassifierSpec {
            arch: arch.into(),
            base: arch.into(),
            head: HeadConfig::default(),
            classes: vec!["a".into(), "b".into(), "c".into()],
            preprocess: Preprocess::imagenet(32),
            bn_folded: false,
            drop_path: 0.0,
        };
        Classifier::new(spec, &Device::Cpu).unwrap()
    }

    /// The model's weights with random BatchNorm statistics and affine parameters, so a fold that ignores any
    /// of them shows.
    fn randomised_weights(model: &Classifier) -> HashMap<String, Tensor> {
        let data = model.varmap.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| {
                let t = v.as_tensor();
                let t = if k.ends_with("running_var") {
                    Tensor::rand(0.5f32, 2.0, t.shape(), &Device::Cpu).unwrap()
                } else if k.ends_with("running_mean") || k.ends_with(".bias") {
                    Tensor::randn(0f32, 0.3, t.shape(), &Device::Cpu).unwrap()
                } else if t.rank() == 1 {
                    Tensor::rand(0.5f32, 1.5, t.shape(), &Device::Cpu).unwrap()
                } else {
                    t.copy().unwrap()
                };
                (k.clone(), t)
            })
            .collect()
    }

    fn file(tensors: HashMap<String, Tensor>) -> WeightFile {
        WeightFile {
            path: PathBuf::from("test"),
            tensors,
            metadata: HashMap::new(),
        }
    }

    #[test]
    fn folded_batch_norm_predicts_what_the_unfolded_network_predicts() {
        for arch in ["resnet18", "efficientnet_lite0"] {
            let model = classifier(arch);
            let weights = randomised_weights(&model);
            model.load_all(&file(weights.clone())).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
            let want = model.predict(&x).unwrap();

            let mut folded = weights.clone();
            let n = fold_batch_norm(&model, &mut folded).unwrap();
            assert!(n > 10, "{arch}: folded only {n} BatchNorms");
            assert!(
                !folded.keys().any(|k| k.contains("running_")),
                "{arch}: BatchNorm statistics left in the folded weights"
            );
            assert_eq!(
                folded.len(),
                weights.len() - 3 * n,
                "{arch}: 4 BN tensors out, 1 bias in"
            );

            let mut spec = model.spec.clone();
            spec.bn_folded = true;
            let fresh = Classifier::new(spec, &Device::Cpu).unwrap();
            unfold_batch_norm(&fresh, &mut folded).unwrap();
            fresh.load_all(&file(folded)).unwrap();
            let got = fresh.predict(&x).unwrap();
            let diff = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-4 * (1.0 + scale),
                "{arch}: logits differ by {diff}"
            );
        }
    }

    #[test]
    fn every_batch_norm_maps_to_the_convolution_before_it() {
        let resnet = classifier("resnet18");
        let pairs = bn_conv_pairs(&resnet).unwrap();
        let find = |bn: &str| pairs.iter().find(|p| p.0 == bn).map(|p| p.1.clone());
        assert_eq!(find("bn1").as_deref(), Some("conv1"));
        assert_eq!(find("layer2.0.bn2").as_deref(), Some("layer2.0.conv2"));
        assert_eq!(
            find("layer2.0.downsample.1").as_deref(),
            Some("layer2.0.downsample.0")
        );
        let effnet = classifier("efficientnet_lite0");
        let pairs = bn_conv_pairs(&effnet).unwrap();
        let find = |bn: &str| pairs.iter().find(|p| p.0 == bn).map(|p| p.1.clone());
        assert_eq!(find("_bn0").as_deref(), Some("_conv_stem"));
        assert_eq!(find("_bn1").as_deref(), Some("_conv_head"));
        assert_eq!(
            find("_blocks.3._bn1").as_deref(),
            Some("_blocks.3._depthwise_conv")
        );
    }
}
