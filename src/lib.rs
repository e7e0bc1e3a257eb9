//! graft: transfer learning for image classifiers, on candle.
//!
//! Load a pretrained backbone (ResNet-18/34/50, EfficientNet-Lite0/1/2, ConvNeXt atto..small) from
//! safetensors or a PyTorch checkpoint, freeze and unfreeze its layer groups, attach a new head, train it with optimizers that
//! match PyTorch step for step, and export a single deployment file.
//!
//! Layout, top to bottom (imports run downwards only): [`cli`] maps flags onto configs; [`search`] and
//! [`pretrain`] build on [`train`], whose [`train::runner`] is the one training loop (fine-tuning and
//! pretraining are its tasks); [`optim`] and [`models`] (architectures, heads, cards) sit below it;
//! [`kernels`] (CPU ops, the convolution algorithm choice, SIMD, parallel helpers), [`formats`] (pth,
//! safetensors, checkpoint files) and [`data`] at the bottom, with [`error`].

pub mod alloc;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod formats;
pub mod fsutil;
pub mod kernels;
pub mod models;
pub mod optim;
pub mod pretrain;
pub mod rng;
pub mod search;
pub mod sysmem;
pub mod train;

pub use error::{Error, Result};
