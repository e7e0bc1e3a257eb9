//! A cache of decoded, resized images, so that epochs after the first do not decode again.
//!
//! Entries are 8-bit RGB images keyed by sample index (a loader's samples never change). They fill
//! memory up to a byte budget, first come first kept (no eviction: every epoch reads every image, so
//! any eviction policy would only trade one miss for another); beyond the budget, entries go to a disk
//! folder when one is configured, one raw file per image, else they are decoded again each epoch.
//!
//! A disk entry's name is a hash of the source file's path, size and modification time and of the
//! transform that produced it, so a later run over the same files reuses it and a changed file or
//! transform misses it.

use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Where decoded images are kept between epochs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheConfig {
    /// Bytes of decoded pixels kept in memory; 0 keeps none.
    pub memory_bytes: u64,
    /// Folder for the images that do not fit in memory; `None` decodes those again each epoch.
    pub disk_dir: Option<PathBuf>,
}

impl Default for CacheConfig {
    /// 2 GiB in memory (about 10,000 images at 256x341), no disk.
    fn default() -> Self {
        CacheConfig {
            memory_bytes: 2 << 30,
            disk_dir: None,
        }
    }
}

/// What a cache holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_images: usize,
    pub memory_bytes: u64,
    pub disk_images: usize,
}

pub(crate) struct ImageCache {
    slots: Vec<OnceLock<Arc<RgbImage>>>,
    budget: u64,
    used: AtomicU64,
    in_memory: AtomicUsize,
    on_disk: AtomicUsize,
    disk_dir: Option<PathBuf>,
    /// Describes the transform that made the cached pixels; part of each disk key.
    transform_key: String,
}

const DISK_MAGIC: &[u8; 8] = b"GRAFTRGB";

impl ImageCache {
    pub(crate) fn new(
        len: usize,
        config: &CacheConfig,
        transform_key: String,
    ) -> crate::Result<Self> {
        if let Some(dir) = &config.disk_dir {
            std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        }
        Ok(ImageCache {
            slots: (0..len).map(|_| OnceLock::new()).collect(),
            budget: config.memory_bytes,
            used: AtomicU64::new(0),
            in_memory: AtomicUsize::new(0),
            on_disk: AtomicUsize::new(0),
            disk_dir: config.disk_dir.clone(),
            transform_key,
        })
    }

    /// The cached pixels of sample `index` (whose file is `source`), from memory or disk.
    pub(crate) fn get(&self, index: usize, source: &Path) -> Option<Arc<RgbImage>> {
        if let Some(img) = self.slots[index].get() {
            return Some(img.clone());
        }
        let file = self.disk_file(source)?;
        read_raw(&file).map(Arc::new)
    }

    /// Stores the pixels of sample `index`: in memory while the budget allows, else on disk if configured.
    pub(crate) fn put(&self, index: usize, source: &Path, image: RgbImage) -> Arc<RgbImage> {
        let bytes = image.as_raw().len() as u64;
        let reserved = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used + bytes <= self.budget).then_some(used + bytes)
            })
            .is_ok();
        let image = Arc::new(image);
        if reserved {
            if self.slots[index].set(image.clone()).is_ok() {
                self.in_memory.fetch_add(1, Ordering::Relaxed);
            } else {
                self.used.fetch_sub(bytes, Ordering::SeqCst);
            }
        } else if let Some(file) = self.disk_file(source) {
            // A failed write only costs a decode next epoch; it is not worth failing training for.
            if write_raw(&file, &image).is_ok() {
                self.on_disk.fetch_add(1, Ordering::Relaxed);
            }
        }
        image
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            memory_images: self.in_memory.load(Ordering::Relaxed),
            memory_bytes: self.used.load(Ordering::Relaxed),
            disk_images: self.on_disk.load(Ordering::Relaxed),
        }
    }

    fn disk_file(&self, source: &Path) -> Option<PathBuf> {
        let dir = self.disk_dir.as_ref()?;
        let meta = std::fs::metadata(source).ok()?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let mut hash = Sha256::new();
        hash.update(source.to_string_lossy().as_bytes());
        hash.update(meta.len().to_le_bytes());
        hash.update(modified.to_le_bytes());
        hash.update(self.transform_key.as_bytes());
        let digest = hash.finalize();
        let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Some(dir.join(format!("{name}.rgb")))
    }
}

fn read_raw(file: &Path) -> Option<RgbImage> {
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() < 16 || &bytes[..8] != DISK_MAGIC {
        return None;
    }
    let w = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    let h = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
    let pixels = bytes.split_off(16);
    RgbImage::from_raw(w, h, pixels).filter(|img| img.as_raw().len() == 3 * w as usize * h as usize)
}

/// Writes through a temporary name and renames, so a reader never sees half a file.
fn write_raw(file: &Path, image: &RgbImage) -> std::io::Result<()> {
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        out.write_all(DISK_MAGIC)?;
        out.write_all(&image.width().to_le_bytes())?;
        out.write_all(&image.height().to_le_bytes())?;
        out.write_all(image.as_raw())?;
        out.flush()?;
    }
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(seed: u8) -> RgbImage {
        RgbImage::from_fn(5, 4, |x, y| image::Rgb([seed, x as u8, y as u8]))
    }

    #[test]
    fn memory_holds_entries_up_to_the_budget_then_disk_takes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let src: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = dir.path().join(format!("{i}.png"));
                std::fs::write(&p, [i as u8]).unwrap();
                p
            })
            .collect();
        let config = CacheConfig {
            memory_bytes: 2 * 60,
            disk_dir: Some(dir.path().join("cache")),
        };
        let cache = ImageCache::new(3, &config, "k".into()).unwrap();
        for (i, p) in src.iter().enumerate() {
            assert!(cache.get(i, p).is_none());
            cache.put(i, p, image(i as u8));
        }
        assert_eq!(
            cache.stats(),
            CacheStats {
                memory_images: 2,
                memory_bytes: 120,
                disk_images: 1
            }
        );
        for (i, p) in src.iter().enumerate() {
            assert_eq!(*cache.get(i, p).unwrap(), image(i as u8));
        }
        // A new cache (a later run) over the same files finds the disk entry; another transform does not.
        let again = ImageCache::new(3, &config, "k".into()).unwrap();
        assert_eq!(*again.get(2, &src[2]).unwrap(), image(2));
        let other = ImageCache::new(3, &config, "other".into()).unwrap();
        assert!(other.get(2, &src[2]).is_none());
    }

    #[test]
    fn a_zero_budget_without_disk_caches_nothing() {
        let config = CacheConfig {
            memory_bytes: 0,
            disk_dir: None,
        };
        let cache = ImageCache::new(1, &config, String::new()).unwrap();
        cache.put(0, Path::new("x.png"), image(1));
        assert!(cache.get(0, Path::new("x.png")).is_none());
    }
}
