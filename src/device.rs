//! The CPU/CUDA switch. CUDA is a cargo feature (`--features cuda`); the CPU always works.

use crate::{Error, Result};
use candle_core::Device;

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

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_says_so() {
        let msg = parse_device("cuda").unwrap_err().to_string();
        assert!(msg.contains("without CUDA"), "{msg}");
    }
}
