//! How much memory this machine can give a run, checked before a run allocates anything, so that a typo such
//! as `--image-size 100000` is a message, not a machine swapping itself to death or an allocator abort.

use crate::{Error, Result};

/// Bytes of memory the OS says it can hand out now (`MemAvailable` in `/proc/meminfo`), `None` where that is
/// not known (not Linux); the check is then skipped.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Peak memory of one training step per byte of its input batch. Measured with `cargo bench --bench
/// train_step` (peak RSS, batch 16, 224x224): ResNet-18 951 MiB and EfficientNet-Lite0 1377 MiB for a
/// 9.6 MB input batch, about 100 and 145 times the input; the larger is taken.
pub const TRAIN_PEAK_PER_INPUT_BYTE: f64 = 145.0;

/// The largest square input size graft accepts: well above any size an ImageNet backbone is fine-tuned at,
/// and small enough that one image's pixels (4096² x 3 x 4 bytes = 201 MB) are no threat by themselves.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// The estimated peak bytes of a training step on `batch` images of `channels` x `size` x `size`.
pub fn training_step_bytes(batch: usize, channels: usize, size: usize) -> f64 {
    batch as f64 * channels as f64 * (size as f64).powi(2) * 4.0 * TRAIN_PEAK_PER_INPUT_BYTE
}

/// Refuses a run estimated to need `need` bytes when the machine has less available; `what` names the flags
/// that set the size (e.g. `--image-size 5000 --batch-size 32`).
pub fn check_fits(what: &str, need: f64) -> Result<()> {
    let Some(avail) = available_bytes() else {
        return Ok(());
    };
    if need > avail as f64 {
        return Err(Error::TooLarge {
            what: what.to_string(),
            reason: format!(
                "a training step would need about {} of memory, and this machine has {} available; use a smaller --image-size or --batch-size",
                human_bytes(need),
                human_bytes(avail as f64)
            ),
        });
    }
    Ok(())
}

/// `1.5 GiB`, `320 MiB`.
pub fn human_bytes(b: f64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_step_is_refused_with_what_it_would_need() {
        let need = training_step_bytes(32, 3, 100_000);
        let Err(err) = check_fits("--image-size 100000", need) else {
            assert!(available_bytes().is_none(), "refused where memory is known");
            return;
        };
        let msg = err.to_string();
        assert!(
            msg.contains("--image-size 100000") && msg.contains("GiB"),
            "{msg}"
        );
    }

    #[test]
    fn an_ordinary_step_fits() {
        check_fits("--image-size 64", training_step_bytes(8, 3, 64)).unwrap();
    }
}
