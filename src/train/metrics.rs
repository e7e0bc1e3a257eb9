//! What training measures: running loss and accuracy, the confusion matrix, and the per-epoch record written to
//! `metrics.jsonl`.
//!
//! Accuracies are fractions in `[0, 1]` everywhere (the progress display turns them into percentages).

use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Sample-weighted mean loss and accuracy over the batches of one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    loss_sum: f64,
    correct: u64,
    samples: u64,
}

impl RunningStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a batch of `samples` images whose *mean* loss is `mean_loss` and of which `correct` were classified
    /// right. Weighting by batch size makes a short last batch count for what it holds.
    pub fn add_batch(&mut self, mean_loss: f64, correct: usize, samples: usize) {
        self.loss_sum += mean_loss * samples as f64;
        self.correct += correct as u64;
        self.samples += samples as u64;
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Mean loss per sample; NaN before the first batch.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.samples as f64
    }

    /// Fraction of samples classified right; NaN before the first batch.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples as f64
    }
}

/// The predicted class of each row of `logits` `[N, classes]`.
pub fn predictions(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
}

/// How many predictions of `logits` `[N, classes]` equal `targets` `[N]` (any integer dtype).
pub fn count_correct(logits: &Tensor, targets: &Tensor) -> Result<usize> {
    let preds = predictions(logits)?;
    let targets = targets
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    Ok(preds.iter().zip(&targets).filter(|(p, t)| p == t).count())
}

/// Counts of (true class, predicted class) pairs. Rows are true classes, columns predictions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    classes: usize,
    /// Row-major `classes x classes`.
    counts: Vec<u64>,
}

/// Precision, recall and F1 of one class; each is NaN when undefined (no predictions or no samples of it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Samples whose true class this is.
    pub support: u64,
}

impl ConfusionMatrix {
    pub fn new(classes: usize) -> Self {
        ConfusionMatrix {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Records one sample. Panics if a class index is out of range: that is a bug in the caller, not data.
    pub fn add(&mut self, predicted: usize, target: usize) {
        assert!(
            predicted < self.classes && target < self.classes,
            "class index out of range: predicted {predicted}, target {target}, classes {}",
            self.classes
        );
        self.counts[target * self.classes + predicted] += 1;
    }

    /// Records a batch from logits `[N, classes]` and targets `[N]`.
    pub fn add_batch(&mut self, logits: &Tensor, targets: &Tensor) -> Result<()> {
        let preds = predictions(logits)?;
        let targets = targets
            .to_dtype(candle_core::DType::U32)?
            .to_vec1::<u32>()?;
        for (p, t) in preds.into_iter().zip(targets) {
            self.add(p as usize, t as usize);
        }
        Ok(())
    }

    /// Samples of true class `target` predicted as `predicted`.
    pub fn get(&self, target: usize, predicted: usize) -> u64 {
        self.counts[target * self.classes + predicted]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Fraction on the diagonal; NaN when empty.
    pub fn accuracy(&self) -> f64 {
        let diag: u64 = (0..self.classes).map(|c| self.get(c, c)).sum();
        diag as f64 / self.total() as f64
    }

    pub fn scores(&self, class: usize) -> ClassScores {
        let tp = self.get(class, class) as f64;
        let predicted: u64 = (0..self.classes).map(|t| self.get(t, class)).sum();
        let support: u64 = (0..self.classes).map(|p| self.get(class, p)).sum();
        let precision = tp / predicted as f64;
        let recall = tp / support as f64;
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else if precision == 0.0 && recall == 0.0 {
            0.0
        } else {
            f64::NAN
        };
        ClassScores {
            precision,
            recall,
            f1,
            support,
        }
    }

    /// Scores of every class, in class order.
    pub fn all_scores(&self) -> Vec<ClassScores> {
        (0..self.classes).map(|c| self.scores(c)).collect()
    }

    /// Fraction of each row's samples in each cell (recall-normalised); rows without samples are all zero.
    pub fn row_fractions(&self) -> Vec<Vec<f64>> {
        (0..self.classes)
            .map(|t| {
                let row = &self.counts[t * self.classes..(t + 1) * self.classes];
                let n: u64 = row.iter().sum();
                row.iter()
                    .map(|&c| if n == 0 { 0.0 } else { c as f64 / n as f64 })
                    .collect()
            })
            .collect()
    }

    /// A plain-text report: the matrix with class names (rows true, columns predicted, columns numbered to keep
    /// the table narrow) and then precision, recall, F1 and support per class.
    pub fn render(&self, class_names: &[String]) -> String {
        let name = |c: usize| {
            class_names
                .get(c)
                .cloned()
                .unwrap_or_else(|| format!("class {c}"))
        };
        let name_w = (0..self.classes)
            .map(|c| name(c).chars().count())
            .max()
            .unwrap_or(0)
            .max(9);
        let cell_w = self
            .counts
            .iter()
            .map(|c| c.to_string().len())
            .max()
            .unwrap_or(1)
            .max((self.classes.max(1) - 1).to_string().len() + 1)
            .max(3);
        let mut header = format!("{:<w$}", "true \\ pred", w = name_w + 5);
        for c in 0..self.classes {
            let _ = write!(header, " {:>cell_w$}", format!("#{c}"));
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "confusion matrix (rows: true class, columns: predicted)"
        );
        let _ = writeln!(out, "{header}");
        for t in 0..self.classes {
            let _ = write!(out, "#{t:<3} {:<name_w$}", name(t));
            for p in 0..self.classes {
                let _ = write!(out, " {:>cell_w$}", self.get(t, p));
            }
            out.push('\n');
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<w$} {:>9} {:>9} {:>9} {:>9}",
            "class",
            "precision",
            "recall",
            "f1",
            "support",
            w = name_w + 5
        );
        let pct = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{:.1}%", 100.0 * v)
            }
        };
        for (c, s) in self.all_scores().iter().enumerate() {
            let _ = writeln!(
                out,
                "#{c:<3} {:<name_w$} {:>9} {:>9} {:>9} {:>9}",
                name(c),
                pct(s.precision),
                pct(s.recall),
                pct(s.f1),
                s.support
            );
        }
        let _ = writeln!(
            out,
            "accuracy {} of {} samples",
            pct(self.accuracy()),
            self.total()
        );
        out
    }
}

/// One line of `metrics.jsonl`: what happened in one epoch.
///
/// Non-finite numbers (a diverged loss) are written as JSON `null` and read back as NaN, because JSON has no NaN.
/// `extra` holds any further fields (per-group learning rates, a stop reason, ...), flattened into the same object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    #[serde(with = "nan_as_null")]
    pub train_loss: f64,
    #[serde(with = "nan_as_null")]
    pub train_acc: f64,
    #[serde(with = "nan_as_null")]
    pub val_loss: f64,
    #[serde(with = "nan_as_null")]
    pub val_acc: f64,
    /// Learning rate at the end of the epoch (of the head's group, when groups differ).
    #[serde(with = "nan_as_null")]
    pub lr: f64,
    /// Wall-clock seconds of the epoch, validation included.
    #[serde(with = "nan_as_null")]
    pub seconds: f64,
    /// Training images per second.
    #[serde(with = "nan_as_null")]
    pub images_per_s: f64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// The append-only `metrics.jsonl` of a run: one JSON object per epoch, flushed line by line so that a crash
/// loses at most the epoch being written.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending, creating it if needed.
    pub fn append_to(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    /// Starts the log of a fresh run: an empty file (a reused run folder's old log is dropped).
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        crate::fsutil::write_atomic(path.as_ref(), b"")?;
        Self::append_to(path)
    }

    /// Prepares the log of a resumed run whose checkpoint finished epoch `last_epoch`: keeps the records of epochs
    /// `<= last_epoch` (a crash after the metrics line but before the checkpoint would otherwise duplicate an
    /// epoch), drops a torn last line, rewrites the file atomically and opens it for appending.
    pub fn resume(path: impl AsRef<Path>, last_epoch: usize) -> Result<Self> {
        Self::resume_with(path, last_epoch, &[])
    }

    /// [`MetricsLog::resume`] with the records the checkpoint carries (`TrainState::history`): when they cover
    /// epochs `1..=last_epoch` they are the log, whatever the file holds, so an epoch whose line a kill
    /// prevented is not lost; otherwise (older checkpoints) the file's records are kept as in `resume`.
    pub fn resume_with(
        path: impl AsRef<Path>,
        last_epoch: usize,
        history: &[EpochMetrics],
    ) -> Result<Self> {
        let path = path.as_ref();
        let complete = history.len() == last_epoch
            && history.iter().enumerate().all(|(i, m)| m.epoch == i + 1);
        let kept: Vec<EpochMetrics> = if complete {
            history.to_vec()
        } else if path.exists() {
            read_records(path, true)?
                .into_iter()
                .filter(|m| m.epoch <= last_epoch)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = String::new();
        for m in &kept {
            text.push_str(&serde_json::to_string(m).expect("metrics serialise"));
            text.push('\n');
        }
        crate::fsutil::write_atomic(path, text.as_bytes())?;
        Self::append_to(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one epoch and flushes it to the OS.
    pub fn append(&mut self, m: &EpochMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m).expect("metrics serialise");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Every record of a `metrics.jsonl`, in file order. A line that is not a record is a `BadFile` error naming
    /// the line.
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<EpochMetrics>> {
        read_records(path.as_ref(), false)
    }
}

/// Reads the records; with `tolerate_torn_tail`, an unparsable *last* line without a newline (a write cut short
/// by a crash) is dropped instead of failing.
fn read_records(path: &Path, tolerate_torn_tail: bool) -> Result<Vec<EpochMetrics>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(raw).map_err(|_| Error::bad_file(path, "not UTF-8 text"))?;
    let ends_with_newline = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<EpochMetrics>(line) {
            Ok(m) => out.push(m),
            Err(_) if tolerate_torn_tail && i + 1 == lines.len() && !ends_with_newline => {}
            Err(e) => {
                return Err(Error::bad_file(path, format!("line {}: {e}", i + 1)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn epoch(n: usize, val_loss: f64) -> EpochMetrics {
        EpochMetrics {
            epoch: n,
            train_loss: 1.0 / n as f64,
            train_acc: 0.5,
            val_loss,
            val_acc: 0.25,
            lr: 1e-3,
            seconds: 2.5,
            images_per_s: 400.0,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn running_stats_weight_batches_by_their_size() {
        let mut s = RunningStats::new();
        s.add_batch(1.0, 3, 4);
        s.add_batch(4.0, 0, 1);
        assert_eq!(s.samples(), 5);
        assert!((s.loss() - 8.0 / 5.0).abs() < 1e-12);
        assert!((s.accuracy() - 0.6).abs() < 1e-12);
        assert!(RunningStats::new().loss().is_nan());
    }

    #[test]
    fn correct_predictions_are_counted_from_logits() {
        let logits = Tensor::new(
            &[[0.1f32, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let targets = Tensor::new(&[1i64, 1, 2], &Device::Cpu).unwrap();
        assert_eq!(predictions(&logits).unwrap(), [1, 0, 2]);
        assert_eq!(count_correct(&logits, &targets).unwrap(), 2);
    }

    #[test]
    fn confusion_matrix_gives_precision_recall_and_f1_per_class() {
        // true: 0 0 0 1 1 2 ; predicted: 0 0 1 1 2 2
        let mut cm = ConfusionMatrix::new(3);
        for (p, t) in [(0, 0), (0, 0), (1, 0), (1, 1), (2, 1), (2, 2)] {
            cm.add(p, t);
        }
        assert_eq!(cm.total(), 6);
        assert!((cm.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        let s0 = cm.scores(0);
        assert_eq!((s0.precision, s0.support), (1.0, 3));
        assert!((s0.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((s0.f1 - 0.8).abs() < 1e-12);
        let s1 = cm.scores(1);
        assert_eq!((s1.precision, s1.recall), (0.5, 0.5));
        let s2 = cm.scores(2);
        assert_eq!((s2.precision, s2.recall), (0.5, 1.0));
        assert_eq!(cm.row_fractions()[1], [0.0, 0.5, 0.5]);
    }

    #[test]
    fn a_class_never_predicted_has_undefined_precision() {
        let mut cm = ConfusionMatrix::new(2);
        cm.add(0, 1);
        let s = cm.scores(1);
        assert!(s.precision.is_nan());
        assert_eq!(s.recall, 0.0);
        assert!(cm.render(&["a".into(), "b".into()]).contains('-'));
    }

    #[test]
    fn batches_are_added_from_logits_and_targets() {
        let mut cm = ConfusionMatrix::new(2);
        let logits = Tensor::new(&[[1f32, 0.0], [1.0, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 1, 1], &Device::Cpu).unwrap();
        cm.add_batch(&logits, &targets).unwrap();
        assert_eq!(
            (cm.get(0, 0), cm.get(1, 0), cm.get(1, 1), cm.get(0, 1)),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn rendered_table_names_every_class_with_its_counts_and_scores() {
        let mut cm = ConfusionMatrix::new(2);
        for _ in 0..12 {
            cm.add(0, 0);
        }
        cm.add(0, 1);
        cm.add(1, 1);
        let names = vec!["cat".to_string(), "golden_retriever".to_string()];
        let table = cm.render(&names);
        let row = table
            .lines()
            .find(|l| l.contains("golden_retriever"))
            .unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["#1", "golden_retriever", "1", "1"]);
        assert!(table.contains("92.3%"), "{table}"); // precision of cat: 12 / 13
        assert!(table.contains("accuracy 92.9% of 14 samples"), "{table}");
    }

    #[test]
    fn metrics_log_round_trips_including_extras_and_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::append_to(&path).unwrap();
        let mut first = epoch(1, 0.7);
        first
            .extra
            .insert("lr_backbone".into(), serde_json::json!(1e-4));
        log.append(&first).unwrap();
        log.append(&epoch(2, f64::NAN)).unwrap();
        drop(log);

        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for key in [
            "epoch",
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "lr",
            "seconds",
            "images_per_s",
            "lr_backbone",
        ] {
            assert!(line.get(key).is_some(), "missing {key} in {line}");
        }
        let back = MetricsLog::read(&path).unwrap();
        assert_eq!(back[0], first);
        assert!(back[1].val_loss.is_nan());
    }

    #[test]
    fn a_corrupt_line_is_reported_with_file_and_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"epoch\": 1}\n").unwrap();
        let err = MetricsLog::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("metrics.jsonl") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn resuming_drops_epochs_after_the_checkpoint_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::append_to(&path).unwrap();
        for n in 1..=3 {
            log.append(&epoch(n, 0.5)).unwrap();
        }
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"epoch\": 4, \"train_lo").unwrap();
        drop(f);

        let mut log = MetricsLog::resume(&path, 2).unwrap();
        log.append(&epoch(3, 0.4)).unwrap();
        let back = MetricsLog::read(&path).unwrap();
        assert_eq!(back.iter().map(|m| m.epoch).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(back[2].val_loss, 0.4);
    }
}
