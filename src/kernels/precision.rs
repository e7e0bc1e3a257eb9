//! The precision dense products multiply in, as a scope: PyTorch's `torch.autocast(dtype=bfloat16)`.
//!
//! Inside [`autocast`]`(Precision::Bf16, ..)` the dense convolutions (every algorithm: Winograd, shifted
//! GEMMs, im2col; forward and both gradients; but not the stem, see [`for_convolution`]) round their GEMM
//! inputs to bf16 and accumulate the
//! products in f32 ([`super::bf16`]). Everything else stays f32, as under PyTorch's autocast: the
//! tensors between layers, BatchNorm and its statistics, activations, softmax, the loss, the optimizer
//! and the parameters (which thereby are the f32 master copies). Loss scaling is not needed: bf16 has
//! f32's exponent range, so gradients do not underflow as they would in f16.
//!
//! The scope is a thread-local, read once when an op is built (on the thread running the forward) and
//! kept in the op, so its backward multiplies in the same precision wherever it runs;
//! [`super::par::on_pool`] carries the scope onto the pool. Tests running side by side in one process
//! each keep their own precision.
//!
//! Where graft's kernels do not run (a GPU, or the generic path forced), the same products run as candle's
//! own in bf16 ([`autocast_dtype`]): inputs cast to bf16, the result widened back to f32, as PyTorch's
//! autocast does (cuDNN and cuBLAS accumulate bf16 products in f32).
//!
//! Where the CPU has no bf16 dot product ([`bf16_supported`] false: no AVX512-BF16), bf16 products run
//! in f32: the same result up to rounding, no faster.

use std::cell::Cell;

/// What a dense product multiplies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 inputs and products.
    #[default]
    F32,
    /// bf16 inputs (rounded to nearest even), f32 accumulation.
    Bf16,
}

impl Precision {
    /// The name `--precision` takes and configs store.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown precision '{other}' (expected f32 or bf16)"
            )),
        }
    }
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with dense products in `precision`, restoring the caller's precision afterwards (also
/// when `f` panics).
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(precision)));
    f()
}

/// The precision of the innermost [`autocast`] on this thread (f32 outside any).
pub fn current() -> Precision {
    CURRENT.with(|c| c.get())
}

/// Input channels up to which a convolution stays f32 under bf16 autocast: the stem, whose input is the
/// image. Measured on the Fashion-MNIST anchor (EfficientNet-Lite0, seed 0, README "Mixed precision"):
/// 86.42% with every convolution in bf16, 87.08% with the stem in f32, against 87.16% all f32; the stem
/// is a few percent of a network's products, so it costs little speed.
pub const F32_MAX_INPUT_CHANNELS: usize = 4;

/// The precision a convolution with `in_channels` input channels multiplies in: the scope's, except
/// that an image's convolution (up to [`F32_MAX_INPUT_CHANNELS`]) stays f32.
pub fn for_convolution(in_channels: usize) -> Precision {
    if in_channels <= F32_MAX_INPUT_CHANNELS {
        Precision::F32
    } else {
        current()
    }
}

/// The dtype candle's own products (other devices, or the generic path) take for inputs of `dtype` in the
/// current scope: bf16 for f32 inside `autocast(Bf16)`, else `None` (unchanged).
pub fn autocast_dtype(dtype: candle_core::DType) -> Option<candle_core::DType> {
    (current() == Precision::Bf16 && dtype == candle_core::DType::F32)
        .then_some(candle_core::DType::BF16)
}

/// Whether this CPU multiplies bf16 natively (AVX512-BF16's `vdpbf16ps`), so that
/// [`Precision::Bf16`] runs faster than f32 rather than in f32. `GRAFT_SIMD` below `avx512` turns it off.
pub fn bf16_supported() -> bool {
    super::bf16::available()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autocast_scopes_nest_and_restore() {
        assert_eq!(current(), Precision::F32);
        autocast(Precision::Bf16, || {
            assert_eq!(current(), Precision::Bf16);
            autocast(Precision::F32, || assert_eq!(current(), Precision::F32));
            assert_eq!(current(), Precision::Bf16);
        });
        assert_eq!(current(), Precision::F32);
    }

    #[test]
    fn precision_names_round_trip() {
        for p in [Precision::F32, Precision::Bf16] {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert!("fp16"
            .parse::<Precision>()
            .unwrap_err()
            .contains("f32 or bf16"));
    }
}
