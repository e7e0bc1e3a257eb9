//! The CPU/CUDA switch. CUDA is a cargo feature (`--features cuda`); the CPU always works.
//!
//! graft's own kernels (the CPU custom ops under `kernels` and the fused optimizer steps) run only
//! where [`custom_kernels_on`] says so; everywhere else the same layer is composed from candle's ops, which
//! every candle device runs. That composed ("generic") path is what a GPU takes, and it can be forced on the
//! CPU so that tests on a machine without a GPU check it against the kernels: [`with_generic_ops`] for one
//! thread, `GRAFT_GENERIC_OPS=1` for a whole process.

use crate::{Error, Result};
use candle_core::Device;
use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    /// Set by [`with_generic_ops`] for the closure it runs.
    static GENERIC_HERE: Cell<bool> = const { Cell::new(false) };
}

/// The environment variable that forces the generic path in a whole process (value `1`).
pub const GENERIC_OPS_ENV: &str = "GRAFT_GENERIC_OPS";

/// Whether graft's CPU kernels may run on tensors of `device`: on the CPU, unless the generic path is forced
/// (by [`with_generic_ops`] on this thread or by `GRAFT_GENERIC_OPS=1`, read once). On any other device, false:
/// the callers then use candle's ops. Every dispatch between a kernel and its composed form asks this.
pub fn custom_kernels_on(device: &Device) -> bool {
    static FORCED_BY_ENV: OnceLock<bool> = OnceLock::new();
    let forced = *FORCED_BY_ENV
        .get_or_init(|| std::env::var(GENERIC_OPS_ENV).is_ok_and(|v| v.trim() == "1"));
    device.is_cpu() && !forced && !GENERIC_HERE.with(Cell::get)
}

/// Runs `f` with graft's CPU kernels switched off on this thread, so that every layer and optimizer step
/// inside takes the path a GPU takes, composed from candle ops (on the CPU, for tests). The previous setting
/// is restored afterwards, also when `f` panics. Work that `f` hands to other threads (rayon's pool) does not
/// see the switch; graft chooses its ops on the calling thread, so a model's forward, backward and an
/// optimizer step called from `f` are covered.
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC_HERE.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC_HERE.with(|g| g.replace(true)));
    f()
}

/// Builds the device named by `--device` (`cpu`, `cuda` or `cuda:N`).
///
/// Asking for CUDA in a build without the `cuda` feature, or on a machine without a usable GPU, is an
/// error that says which of the two it was.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.as_str() {
        "cuda" | "gpu" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::Device {
                    device: name.clone(),
                    reason: "expected `cpu`, `cuda` or `cuda:N`".into(),
                })
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Device {
            device: name,
            reason: "this graft was built without CUDA; rebuild with `cargo build --release --features cuda`".into(),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device {
        device: name,
        reason: format!("no usable CUDA GPU: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_parses() {
        assert!(parse_device("cpu").unwrap().is_cpu());
    }

    #[test]
    fn unknown_device_is_named_in_the_error() {
        let msg = parse_device("tpu").unwrap_err().to_string();
        assert!(msg.contains("tpu"), "{msg}");
    }

    #[test]
    fn generic_ops_are_switched_off_only_inside_the_closure() {
        if std::env::var(GENERIC_OPS_ENV).is_ok_and(|v| v.trim() == "1") {
            return; // the whole process runs generic: nothing to switch
        }
        assert!(custom_kernels_on(&Device::Cpu));
        with_generic_ops(|| {
            assert!(!custom_kernels_on(&Device::Cpu));
            with_generic_ops(|| ());
            assert!(
                !custom_kernels_on(&Device::Cpu),
                "an inner scope restores, not clears"
            );
        });
        assert!(custom_kernels_on(&Device::Cpu));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_says_so() {
        let msg = parse_device("cuda").unwrap_err().to_string();
        assert!(msg.contains("without CUDA"), "{msg}");
    }
}
