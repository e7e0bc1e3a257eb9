//! The one evaluation of a classifier: mean cross-entropy (no smoothing, no class weights), accuracy and the
//! confusion matrix over batches of logits. Fine-tuning's validation and `graft eval` both count through it.

use crate::train::loss::cross_entropy;
use crate::train::metrics::{count_correct, ConfusionMatrix, RunningStats};
use crate::Result;
use candle_core::Tensor;

/// Counts `batches` of (logits, labels) for `classes` classes; `on_batch(images, mean loss, correct)` sees
/// each batch (a progress bar).
pub fn classification(
    classes: usize,
    batches: impl Iterator<Item = Result<(Tensor, Tensor)>>,
    mut on_batch: impl FnMut(usize, f64, usize),
) -> Result<(RunningStats, ConfusionMatrix)> {
    let mut cm = ConfusionMatrix::new(classes);
    let mut stats = RunningStats::new();
    for batch in batches {
        let (logits, labels) = batch?;
        let loss = cross_entropy(&logits, &labels, 0.0, None)?.to_scalar::<f32>()? as f64;
        let correct = count_correct(&logits, &labels)?;
        let n = labels.dim(0)?;
        cm.add_batch(&logits, &labels)?;
        stats.add_batch(loss, correct, n);
        on_batch(n, loss, correct);
    }
    Ok((stats, cm))
}
