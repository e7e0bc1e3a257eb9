//! The data pipeline: image folders on disk to batches of normalised tensors.
//!
//! ```no_run
//! use graft::data::{ImageFolder, Loader, LoaderConfig, Preprocess};
//! let data = ImageFolder::open("./imgs", 0.2, 0)?;
//! let train = Loader::new(data.train.clone(), data.classes.len(), Preprocess::imagenet(224),
//!                         LoaderConfig::train(32, 0), &candle_core::Device::Cpu)?;
//! for batch in train.epoch(0) {
//!     let batch = batch?; // batch.images [32, 3, 224, 224] f32, batch.labels [32] u32
//! }
//! # Ok::<(), graft::Error>(())
//! ```
//!
//! - [`folder`]: finding classes and splits in `root/<class>/*.jpg` or `root/{train,val,test}/<class>/`;
//! - [`decode`]: any common image file to 8-bit RGB;
//! - [`resample`] and [`transform`]: Pillow-compatible resizing, the model card's evaluation transform,
//!   training augmentation;
//! - [`autoaugment`]: torchvision's TrivialAugmentWide and RandAugment ops, byte for byte as on PIL images;
//! - [`loader`] and [`cache`]: parallel, prefetched, seeded batches with decoded images cached;
//! - [`idx`]: MNIST-style IDX files (Fashion-MNIST) and writing them as an image folder.

pub mod autoaugment;
pub mod cache;
pub mod decode;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod resample;
pub mod transform;

pub use autoaugment::AutoAugment;
pub use cache::{CacheConfig, CacheStats};
pub use decode::{decode_image, is_image_path, load_rgb, IMAGE_EXTENSIONS};
pub use folder::{
    class_counts, class_weights, class_weights_of, list_images, Dataset, ImageFolder, Sample,
};
pub use loader::{Batch, Epoch, Loader, LoaderConfig};
pub use resample::Interpolation;
pub use transform::{
    eval_tensor, load_eval_tensor, load_tta_tensor, tta_tensor, Augment, ColorJitter, Preprocess,
    Tta,
};
