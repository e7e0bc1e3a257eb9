//! Batches of preprocessed images for training and evaluation.
//!
//! Each batch is decoded and transformed in parallel (rayon), on a background thread that prepares the
//! next batch while the caller trains on the current one. Decoded, resized pixels are cached (see
//! [`super::cache`]) so later epochs skip decoding.
//!
//! Determinism, which exact resume relies on: the sample order of epoch `e` and every random draw of
//! its augmentation depend only on `(seed, e)` and the sample's position in the epoch, never on thread
//! timing or on which epochs ran before. An image that fails to decode is reported once (stderr, and
//! [`Loader::skipped`]) and left out of its batch in every epoch, so that batch is one image short; the
//! order of all other images is unchanged.

use super::cache::{CacheConfig, CacheStats, ImageCache};
use super::decode::load_rgb;
use super::folder::{class_counts, Sample};
use super::transform::{augment_into, resize_short_side, Augment, Preprocess, Tta};
use crate::rng::mix;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How a [`Loader`] batches its samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Visit samples in a new random order each epoch.
    pub shuffle: bool,
    /// Leave out the last, incomplete batch (training: keeps BatchNorm statistics sane).
    pub drop_last: bool,
    pub seed: u64,
    /// Draw each epoch's samples with replacement, with probability inversely proportional to their
    /// class size, so every class is seen equally often (PyTorch's `WeightedRandomSampler`).
    pub balanced: bool,
    /// Training augmentation; `None` applies the evaluation transform.
    pub augment: Option<Augment>,
    /// Test-time augmentation (evaluation only: refused with `augment`): each sample becomes
    /// [`Tta::views`] consecutive images of its batch.
    pub tta: Tta,
    pub cache: CacheConfig,
    /// With augmentation, the short side of the working copy that is cached and cropped from; default
    /// the evaluation resize size (256 for 224 at crop 0.875). Larger keeps more detail for small crops.
    pub work_size: Option<usize>,
    /// Batches prepared ahead of the one being consumed, at least 1.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 32,
            shuffle: false,
            drop_last: false,
            seed: 0,
            balanced: false,
            augment: None,
            tta: Tta::None,
            cache: CacheConfig::default(),
            work_size: None,
            prefetch: 1,
        }
    }
}

impl LoaderConfig {
    /// Training defaults: shuffled, drop-last, default augmentation.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: true,
            seed,
            augment: Some(Augment::default()),
            ..Default::default()
        }
    }

    /// Evaluation defaults: every sample once, in order, evaluation transform.
    pub fn eval(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            ..Default::default()
        }
    }
}

/// A batch: `images` `[N * V, C, S, S]` `f32` (C the preprocessing's channels, V the [`LoaderConfig::tta`]
/// views, 1 without; the views of sample `k` are rows `k * V .. (k + 1) * V`), `labels` `[N]` `u32`, and the
/// indices of its samples in the loader's sample list.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub indices: Vec<usize>,
}

/// Serves epochs of batches over a fixed list of samples. Cloning shares the cache.
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

struct Inner {
    samples: Vec<Sample>,
    num_classes: usize,
    preprocess: Preprocess,
    config: LoaderConfig,
    cache: ImageCache,
    device: Device,
    skipped: Mutex<BTreeMap<usize, String>>,
}

impl Loader {
    /// A loader over `samples` (labels below `num_classes`) that produces tensors on `device`.
    pub fn new(
        samples: Vec<Sample>,
        num_classes: usize,
        preprocess: Preprocess,
        config: LoaderConfig,
        device: &Device,
    ) -> Result<Self> {
        preprocess.validate()?;
        if config.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if config.prefetch == 0 {
            return Err(Error::config("prefetch", "must be at least 1"));
        }
        if let Some(aug) = &config.augment {
            aug.validate()?;
            if config.tta != Tta::None {
                return Err(Error::config(
                    "tta",
                    "test-time augmentation applies to the evaluation transform, not with training augmentation",
                ));
            }
        }
        if let Some(bad) = samples.iter().find(|s| s.label >= num_classes) {
            return Err(Error::config(
                "label",
                format!(
                    "{} has label {} but there are {num_classes} classes",
                    bad.path.display(),
                    bad.label
                ),
            ));
        }
        if config.drop_last && !samples.is_empty() && samples.len() < config.batch_size {
            return Err(Error::config(
                "batch_size",
                format!(
                    "{} images are fewer than one batch of {} and incomplete batches are dropped; lower the batch size",
                    samples.len(),
                    config.batch_size
                ),
            ));
        }
        let work_size = config.work_size.unwrap_or_else(|| preprocess.resize_size());
        let transform_key = match &config.augment {
            Some(_) => format!("work short side {work_size} {:?}", preprocess.interpolation),
            // `none` and `flip` cut their views from the same evaluation crop.
            None if config.tta == Tta::Crops => format!(
                "ten-crop short side {} {:?}",
                config.tta.crops_short_side(&preprocess),
                preprocess.interpolation
            ),
            None => format!(
                "eval {} crop {} {:?}",
                preprocess.input_size, preprocess.crop_pct, preprocess.interpolation
            ),
        };
        let cache = ImageCache::new(samples.len(), &config.cache, transform_key)?;
        Ok(Loader {
            inner: Arc::new(Inner {
                samples,
                num_classes,
                preprocess,
                config,
                cache,
                device: device.clone(),
                skipped: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    pub fn samples(&self) -> &[Sample] {
        &self.inner.samples
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.inner.config
    }

    /// Number of batches in every epoch (before any image is skipped).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.inner.samples.len(), self.inner.config.batch_size);
        if self.inner.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample indices epoch `epoch` visits, in order, after drop-last. A pure function of the seed,
    /// the epoch and the sample list.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        self.inner.epoch_order(epoch)
    }

    /// The batches of epoch `epoch`, prepared on a background thread one batch (or `prefetch` batches)
    /// ahead. Dropping the iterator stops the thread.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        let inner = self.inner.clone();
        let (tx, rx) = sync_channel(inner.config.prefetch - 1);
        let worker = std::thread::Builder::new()
            .name("graft-loader".into())
            .spawn(move || {
                let order = inner.epoch_order(epoch);
                for (b, chunk) in order.chunks(inner.config.batch_size).enumerate() {
                    let start = b * inner.config.batch_size;
                    match inner.batch(epoch, start, chunk) {
                        Ok(None) => continue,
                        Ok(Some(batch)) => {
                            if tx.send(Ok(batch)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            })
            .expect("the OS can start a thread");
        Epoch {
            rx: Some(rx),
            worker: Some(worker),
        }
    }

    /// The images skipped because they could not be decoded, with the reason, in sample order.
    pub fn skipped(&self) -> Vec<(PathBuf, String)> {
        let skipped = self
            .inner
            .skipped
            .lock()
            .expect("no thread panics holding the lock");
        skipped
            .iter()
            .map(|(&i, reason)| (self.inner.samples[i].path.clone(), reason.clone()))
            .collect()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }
}

/// One epoch's batches; see [`Loader::epoch`].
pub struct Epoch {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let next = self.rx.as_ref()?.recv().ok();
        if next.is_none() {
            self.finish();
        }
        next
    }
}

impl Epoch {
    fn finish(&mut self) {
        self.rx = None;
        if let Some(worker) = self.worker.take() {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Inner {
    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let n = self.samples.len();
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(epoch);
        let mut order: Vec<usize> = if self.config.balanced && n > 0 {
            let counts = class_counts(&self.samples, self.num_classes);
            let weights: Vec<f64> = self
                .samples
                .iter()
                .map(|s| 1.0 / counts[s.label] as f64)
                .collect();
            let dist = WeightedIndex::new(&weights).expect("weights are positive and finite");
            (0..n).map(|_| dist.sample(&mut rng)).collect()
        } else {
            (0..n).collect()
        };
        if self.config.shuffle && !self.config.balanced {
            order.shuffle(&mut rng);
        }
        if self.config.drop_last {
            order.truncate(n / self.config.batch_size * self.config.batch_size);
        }
        order
    }

    /// The decoded pixels of sample `index` as cached: what the test-time views are cut from
    /// ([`Tta::base_pixels`], the evaluation crop without TTA), or with augmentation the working copy
    /// (short side at most `work_size`, never enlarged).
    fn pixels(&self, index: usize) -> Result<Arc<RgbImage>> {
        let path = &self.samples[index].path;
        if let Some(img) = self.cache.get(index, path) {
            return Ok(img);
        }
        let rgb = load_rgb(path)?;
        let p = &self.preprocess;
        let base = match &self.config.augment {
            Some(_) => {
                let work = self.config.work_size.unwrap_or_else(|| p.resize_size()) as u32;
                if rgb.width().min(rgb.height()) > work {
                    resize_short_side(&rgb, work, p.interpolation)
                } else {
                    rgb
                }
            }
            None => self.config.tta.base_pixels(&rgb, p),
        };
        Ok(self.cache.put(index, path, base))
    }

    /// Fills `out` with sample `index` (its TTA views, one after the other) at epoch position `position`;
    /// `false` when it is skipped.
    fn prepare(&self, epoch: u64, position: usize, index: usize, out: &mut [f32]) -> bool {
        if self
            .skipped
            .lock()
            .expect("no panics under the lock")
            .contains_key(&index)
        {
            return false;
        }
        let pixels = match self.pixels(index) {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    Error::Image { reason, .. } => reason,
                    other => other.to_string(),
                };
                let mut skipped = self.skipped.lock().expect("no panics under the lock");
                if let std::collections::btree_map::Entry::Vacant(slot) = skipped.entry(index) {
                    super::decode::warn_skipped(&self.samples[index].path, &reason);
                    slot.insert(reason);
                }
                return false;
            }
        };
        match &self.config.augment {
            Some(aug) => {
                let seed = mix(mix(mix(self.config.seed) ^ epoch) ^ position as u64);
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                augment_into(&pixels, &self.preprocess, aug, &mut rng, out);
            }
            None => self.config.tta.views_into(&pixels, &self.preprocess, out),
        }
        true
    }

    /// The batch of samples `indices`, which start at position `start` of the epoch; `None` when every
    /// one of them was skipped.
    fn batch(&self, epoch: u64, start: usize, indices: &[usize]) -> Result<Option<Batch>> {
        let views = self.config.tta.views();
        let len = self.preprocess.tensor_len() * views;
        let mut data = vec![0f32; indices.len() * len];
        let ok: Vec<bool> = data
            .par_chunks_mut(len)
            .zip(indices.par_iter())
            .enumerate()
            .map(|(k, (out, &index))| self.prepare(epoch, start + k, index, out))
            .collect();
        let mut kept = Vec::with_capacity(indices.len());
        if ok.iter().all(|&o| o) {
            kept.extend_from_slice(indices);
        } else {
            let mut write = 0;
            for (k, &index) in indices.iter().enumerate() {
                if ok[k] {
                    data.copy_within(k * len..(k + 1) * len, write * len);
                    write += 1;
                    kept.push(index);
                }
            }
            data.truncate(write * len);
        }
        if kept.is_empty() {
            return Ok(None);
        }
        let s = self.preprocess.input_size;
        let labels: Vec<u32> = kept.iter().map(|&i| self.samples[i].label as u32).collect();
        let images = Tensor::from_vec(
            data,
            (kept.len() * views, self.preprocess.channels, s, s),
            &self.device,
        )?;
        let labels = Tensor::from_vec(labels, kept.len(), &self.device)?;
        Ok(Some(Batch {
            images,
            labels,
            indices: kept,
        }))
    }
}
