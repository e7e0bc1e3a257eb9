//! graft's CPU kernels: candle custom ops with forward and backward for what candle 0.11 lacks or runs
//! slowly, and the SIMD and thread-pool helpers they (and the optimizer steps) run on. On other devices
//! (see [`crate::device::custom_kernels_on`]) each op falls back to the same computation composed from
//! candle's ops.
//!
//! What is where, bottom to top of the imports (a module imports only those below it):
//! - [`simd`]: the `vectorized!` dispatch to the widest instruction set the CPU has; `matrix`: where a
//!   matrix lies in a slice; `bf16`: the GEMM that multiplies in bf16 (AVX512-BF16); [`precision`]:
//!   the `autocast` scope that chooses it (f32 or bf16 products); [`par`]: parallel helpers (buffers
//!   zeroed chunk by chunk where they are used, work on the pool, in the caller's autocast scope);
//! - `common`: what the ops share: dtype checks and dispatch macros, a convolution's geometry and
//!   inference epilogue, the GEMM helpers;
//! - the ops: `activation` ([`relu`], [`relu6`], [`add_relu`], [`silu`], [`hard_swish`], [`hard_sigmoid`], [`gelu`]:
//!   one-pass forward and backward), `norm` ([`layer_norm`] over any dimension, [`softmax_last_dim`]),
//!   `bn_train` (training-mode BatchNorm with a hand-written backward and a fused ReLU / ReLU6), `pool`
//!   ([`max_pool2d`] with padding and PyTorch's tie rule), `depthwise` ([`depthwise_conv2d`]), and the
//!   dense convolution algorithms `im2col`, `shifted` (shifted GEMMs) and `winograd` (F(2x2, 3x3)); `linear`
//!   ([`linear_product_autocast`]: a linear layer's product on the bf16 GEMM under bf16 autocast);
//! - [`conv`]: the one place that chooses how a convolution runs (`conv::choose`) and the
//!   convolution ops built on that choice.
//!
//! The kernels import no model, training or data code (only [`crate::device`] and [`crate::error`]).
//! `examples/bench_forward.rs` and `benches/layer_ops.rs` measure them against the candle ops they
//! replace.

pub mod par;
pub mod precision;
pub mod simd;

mod bf16;
mod matrix;

mod common;

mod activation;
mod bn_train;
mod depthwise;
mod im2col;
mod linear;
mod norm;
mod pool;
mod shifted;
mod winograd;

pub mod conv;

#[cfg(test)]
pub(crate) mod test_support;

pub(crate) use activation::Smooth;
pub use activation::{add_relu, gelu, hard_sigmoid, hard_swish, relu, relu6, silu};
pub(crate) use bn_train::{batch_norm_train, batch_stats};
pub(crate) use common::Epilogue;
pub use common::Padding2d;
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_padded};
pub use linear::linear_product_autocast;
pub use norm::{add_bias, layer_norm, layer_norm_composed, softmax_last_dim};
pub use pool::{max_pool2d, max_pool2d_composed};
