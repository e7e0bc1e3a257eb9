//! Reading IDX files (the MNIST / Fashion-MNIST format), gzipped or not, and writing them out as an
//! image folder that [`super::ImageFolder`] reads.
//!
//! IDX: two zero bytes, a type byte (0x08 = unsigned byte, the only type these datasets use), the number
//! of dimensions, each dimension as a big-endian `u32`, then the values in row-major order.

use crate::{Error, Result};
use image::imageops::FilterType;
use image::GrayImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Fashion-MNIST's class names in label order, made safe as folder names.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
];

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const DEBIAN_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// An n-dimensional array of bytes read from an IDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

impl IdxArray {
    /// Number of items along the first dimension.
    pub fn len(&self) -> usize {
        self.dims.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of item `i` (one image, or one label).
    pub fn item(&self, i: usize) -> &[u8] {
        let size: usize = self.dims[1..].iter().product();
        &self.data[i * size..(i + 1) * size]
    }
}

/// Parses the bytes of an IDX file, gunzipping them first when they start with the gzip magic.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    let unzipped;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip: {e}"))?;
        unzipped = out;
        &unzipped[..]
    } else {
        bytes
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX value type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        ));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err("truncated IDX header".into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let count: usize = dims.iter().product();
    if bytes.len() - header != count {
        return Err(format!(
            "IDX dims {dims:?} need {count} values, file holds {}",
            bytes.len() - header
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file (gzipped or not); errors name the file.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_idx(&bytes).map_err(|reason| Error::bad_file(path, reason))
}

/// Serialises `array` as an (uncompressed) IDX file's bytes.
pub fn idx_bytes(array: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, array.dims.len() as u8];
    for &d in &array.dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(&array.data);
    out
}

/// The four Fashion-MNIST (or MNIST) files in `dir`: `(train images, train labels, test images,
/// test labels)`, each as `<name>` or `<name>.gz`.
pub fn find_mnist_files(dir: &Path) -> Result<[PathBuf; 4]> {
    let names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];
    let find = |name: &str| {
        [format!("{name}.gz"), name.to_string()]
            .into_iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::Dataset {
                path: dir.to_path_buf(),
                reason: format!(
                    "{name}(.gz) not found; on Debian: apt-get install dataset-fashion-mnist"
                ),
            })
    };
    Ok([
        find(names[0])?,
        find(names[1])?,
        find(names[2])?,
        find(names[3])?,
    ])
}

/// How [`write_image_folder`] writes images.
#[derive(Clone, Debug)]
pub struct FolderSpec {
    /// Images per class; `None` writes all of them.
    pub per_class: Option<usize>,
    /// Side of the written square images (the source size keeps them as they are).
    pub size: u32,
    /// Three identical channels instead of one grey channel.
    pub rgb: bool,
    /// Chooses which images of each class are written.
    pub seed: u64,
}

/// Writes images (`[N, H, W]` grey bytes) with their labels as `out/<class>/<index>.png`, where `index`
/// is the image's position in the IDX file. Returns the number written. When `per_class` is set, that
/// many images of each class are chosen by a shuffle seeded with `seed` (all of a class when it has
/// fewer); images are resized bilinearly to `size`.
pub fn write_image_folder(
    images: &IdxArray,
    labels: &IdxArray,
    classes: &[&str],
    out: &Path,
    spec: &FolderSpec,
) -> Result<usize> {
    if images.dims.len() != 3 || labels.dims.len() != 1 || images.len() != labels.len() {
        return Err(Error::config(
            "idx",
            format!(
                "images {:?} and labels {:?} do not pair up",
                images.dims, labels.dims
            ),
        ));
    }
    let (h, w) = (images.dims[1] as u32, images.dims[2] as u32);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes.len()];
    for i in 0..labels.len() {
        let label = labels.data[i] as usize;
        let list = by_class.get_mut(label).ok_or_else(|| {
            Error::config(
                "idx",
                format!(
                    "label {label} at {i} has no class name (have {})",
                    classes.len()
                ),
            )
        })?;
        list.push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut written = 0;
    for (class, mut members) in classes.iter().zip(by_class) {
        if let Some(n) = spec.per_class {
            members.shuffle(&mut rng);
            members.truncate(n);
            members.sort_unstable();
        }
        let dir = out.join(class);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for i in members {
            let grey =
                GrayImage::from_raw(w, h, images.item(i).to_vec()).expect("item has h*w bytes");
            let grey = if (w, h) == (spec.size, spec.size) {
                grey
            } else {
                image::imageops::resize(&grey, spec.size, spec.size, FilterType::Triangle)
            };
            let path = dir.join(format!("{i:05}.png"));
            let saved = if spec.rgb {
                image::DynamicImage::ImageLuma8(grey).to_rgb8().save(&path)
            } else {
                grey.save(&path)
            };
            saved.map_err(|e| Error::Image {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            written += 1;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (IdxArray, IdxArray) {
        let images = IdxArray {
            dims: vec![6, 2, 3],
            data: (0..36).collect(),
        };
        let labels = IdxArray {
            dims: vec![6],
            data: vec![0, 1, 0, 1, 0, 1],
        };
        (images, labels)
    }

    #[test]
    fn idx_round_trips_plain_and_gzipped() {
        let (images, _) = tiny();
        let raw = idx_bytes(&images);
        assert_eq!(parse_idx(&raw).unwrap(), images);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        assert_eq!(parse_idx(&gz.finish().unwrap()).unwrap(), images);
        assert_eq!(images.item(1), &[6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn a_truncated_idx_file_is_an_error() {
        let (images, _) = tiny();
        let raw = idx_bytes(&images);
        let err = parse_idx(&raw[..raw.len() - 1]).unwrap_err();
        assert!(err.contains("need 36 values"), "{err}");
        assert!(parse_idx(b"PK\x03\x04").is_err());
    }

    #[test]
    fn the_folder_writer_takes_per_class_images_by_seed() {
        let (images, labels) = tiny();
        let dir = tempfile::tempdir().unwrap();
        let spec = FolderSpec {
            per_class: Some(2),
            size: 4,
            rgb: true,
            seed: 1,
        };
        let n = write_image_folder(&images, &labels, &["a", "b"], dir.path(), &spec).unwrap();
        assert_eq!(n, 4);
        for class in ["a", "b"] {
            let files: Vec<_> = std::fs::read_dir(dir.path().join(class)).unwrap().collect();
            assert_eq!(files.len(), 2);
        }
        let first = std::fs::read_dir(dir.path().join("a"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let img = image::open(first).unwrap();
        assert_eq!((img.width(), img.height()), (4, 4));
        assert_eq!(img.color(), image::ColorType::Rgb8);
    }
}
