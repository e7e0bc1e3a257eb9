//! Discovering a class-per-subfolder image dataset, as torchvision's `ImageFolder` and Keras's
//! `image_dataset_from_directory` read it, and splitting it.
//!
//! Two layouts are recognised:
//! - `root/<class>/**/<image>`: every image is a training candidate, and a stratified, seeded fraction of
//!   each class becomes the validation split;
//! - `root/train/<class>/...`, optionally with `root/val/` (or `valid/`, `validation/`) and `root/test/`
//!   laid out the same way: the folders are the splits. Without a validation folder, validation is split
//!   off `train` as in the first layout. (So a class cannot be called `train`.)
//!
//! Classes are the subfolders of the root (or of `train`), sorted by name; their index is the label.
//! Class folders are searched recursively, symlinks followed; hidden files and folders (names starting
//! with `.`) and files that are not images by extension are ignored. Images are listed in sorted path
//! order, so the same folder always gives the same lists.

use super::decode::{is_image_path, IMAGE_EXTENSIONS};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One image and its class index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// A dataset found on disk: its classes and its splits.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    /// Class names in label order (sorted by name).
    pub classes: Vec<String>,
    pub train: Vec<Sample>,
    /// Empty when `val_split` is 0 and there is no validation folder.
    pub val: Vec<Sample>,
    /// Present only when the dataset has a `test` folder.
    pub test: Option<Vec<Sample>>,
    /// Whether `val` came from a folder (`val/` or `valid/`) rather than from splitting `train`.
    pub val_from_folder: bool,
    /// Files left out because they cannot be read as images (see [`super::decode::probe_image`]), or that
    /// are a second path to an image already listed (a symlink), with the reason; each was warned about once.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Dataset {
    /// Leaves out the files whose header cannot be read as an image ([`super::decode::probe_image`], in
    /// parallel), each warned about once and recorded in `skipped`, so that they never reach a batch. A class
    /// none of whose training images can be read is an error naming its folder (it could not be learnt).
    /// Files that pass this check but fail to decode later are skipped by the loader.
    pub fn drop_unreadable(&mut self) -> Result<()> {
        let before = class_counts(&self.train, self.classes.len());
        let mut skipped = std::mem::take(&mut self.skipped);
        self.train = readable(std::mem::take(&mut self.train), &mut skipped);
        self.val = readable(std::mem::take(&mut self.val), &mut skipped);
        if let Some(t) = self.test.take() {
            self.test = Some(readable(t, &mut skipped));
        }
        self.skipped = skipped;
        let after = class_counts(&self.train, self.classes.len());
        if let Some(c) = (0..after.len()).find(|&c| after[c] == 0 && before[c] > 0) {
            let class = &self.classes[c];
            let folder = self.skipped.iter().find(|(p, _)| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .is_some_and(|n| n.to_string_lossy() == *class)
            });
            let (example, why) = folder
                .map(|(p, r)| (p.display().to_string(), r.clone()))
                .unwrap_or_default();
            return Err(dataset_error(
                &self.root,
                format!(
                    "none of the {} training images of class `{class}` can be read (e.g. {example}: {why}); fix or remove them",
                    before[c]
                ),
            ));
        }
        Ok(())
    }

    /// Number of training images in each class, in label order.
    pub fn class_counts(&self) -> Vec<usize> {
        class_counts(&self.train, self.classes.len())
    }
}

/// Number of samples per label.
pub fn class_counts(samples: &[Sample], num_classes: usize) -> Vec<usize> {
    let mut counts = vec![0; num_classes];
    for s in samples {
        counts[s.label] += 1;
    }
    counts
}

/// Loss weights that make every class count the same, scikit-learn's `class_weight="balanced"`:
/// `n_samples / (n_classes * count[c])`, computed on the training split. A class without training images
/// gets weight 0 (it never appears in a loss).
pub fn class_weights(dataset: &Dataset) -> Vec<f32> {
    class_weights_of(&dataset.train, dataset.classes.len())
}

/// [`class_weights`] for any list of samples.
pub fn class_weights_of(samples: &[Sample], num_classes: usize) -> Vec<f32> {
    let counts = class_counts(samples, num_classes);
    let n = samples.len() as f64;
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                (n / (num_classes as f64 * c as f64)) as f32
            }
        })
        .collect()
}

/// Entry point to the folder layouts described in the module doc.
pub struct ImageFolder;

impl ImageFolder {
    /// Finds the classes and splits under `root`. `val_split` (in `[0, 1)`) is the fraction of each class
    /// moved from `train` to `val` when there is no validation folder; which images move depends only on
    /// `seed` and the file list.
    ///
    /// Errors ([`Error::Dataset`]): `root` missing or not a folder, no class folders, no images at all,
    /// a class folder without images, a single class, a `val`/`test` class unknown to `train`.
    pub fn open(root: impl AsRef<Path>, val_split: f64, seed: u64) -> Result<Dataset> {
        let root = root.as_ref();
        if !(0.0..1.0).contains(&val_split) {
            return Err(Error::config(
                "val_split",
                format!("{val_split} is not in [0, 1)"),
            ));
        }
        let meta = std::fs::metadata(root)
            .map_err(|e| dataset_error(root, format!("cannot open: {e}")))?;
        if !meta.is_dir() {
            return Err(dataset_error(root, "is not a folder"));
        }
        let split_dir = |names: &[&str]| names.iter().map(|n| root.join(n)).find(|p| p.is_dir());
        let train_dir = split_dir(&["train"]);
        let val_dir = split_dir(&["val", "valid", "validation"]);
        let test_dir = split_dir(&["test"]);
        let split_layout = train_dir.is_some();

        let mut skipped = Vec::new();
        let (classes, mut train) = match (&train_dir, split_layout) {
            (Some(dir), true) => read_classes(dir)?,
            _ => read_classes(root)?,
        };

        let (val, val_from_folder) = match (split_layout, val_dir) {
            (true, Some(dir)) => (read_split(&dir, &classes)?, true),
            _ => {
                let (kept, val) = stratified_split(train, classes.len(), val_split, seed);
                train = kept;
                (val, false)
            }
        };
        let mut test = match (split_layout, test_dir) {
            (true, Some(dir)) => Some(read_split(&dir, &classes)?),
            _ => None,
        };
        // One file reached by two paths (a symlink into another class or split) is read once, under the
        // first path in the order train, val, test.
        let mut seen = std::collections::HashMap::new();
        let mut first_path = |s: &Sample, skipped: &mut Vec<(PathBuf, String)>| {
            let key = s.path.canonicalize().unwrap_or_else(|_| s.path.clone());
            match seen.entry(key) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(s.path.clone());
                    true
                }
                std::collections::hash_map::Entry::Occupied(o) => {
                    let reason = format!("the same file as {}", o.get().display());
                    super::decode::warn_skipped(&s.path, &reason);
                    skipped.push((s.path.clone(), reason));
                    false
                }
            }
        };
        train.retain(|s| first_path(s, &mut skipped));
        let mut val = val;
        val.retain(|s| first_path(s, &mut skipped));
        if let Some(t) = test.as_mut() {
            t.retain(|s| first_path(s, &mut skipped));
        }
        Ok(Dataset {
            root: root.to_path_buf(),
            classes,
            train,
            val,
            test,
            val_from_folder,
            skipped,
        })
    }
}

fn dataset_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The visible subfolders of `dir`, sorted by name.
fn subfolders(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if !is_hidden(&path) && path.is_dir() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Every image under `root`, recursively (class subfolders or not), in sorted path order, with the
/// hidden-file and extension rules of [`ImageFolder::open`]. An empty or missing folder is a
/// [`Error::Dataset`] error.
pub fn list_images(root: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let root = root.as_ref();
    if !root.is_dir() {
        return Err(dataset_error(root, "is not a folder"));
    }
    let mut out = Vec::new();
    images_under(root, &mut HashSet::new(), &mut out)?;
    if out.is_empty() {
        return Err(dataset_error(
            root,
            format!(
                "no images found (extensions: {})",
                IMAGE_EXTENSIONS.join(", ")
            ),
        ));
    }
    Ok(out)
}

/// All images under `dir`, recursively, in sorted order. `seen` guards against symlink cycles.
fn images_under(dir: &Path, seen: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) -> Result<()> {
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        if is_hidden(&path) {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => images_under(&path, seen, out)?,
            Ok(m) if m.is_file() && is_image_path(&path) => out.push(path),
            Ok(_) => {}
            // A symlink that dangles or loops: reported, never followed, never fatal.
            Err(e) if path.is_symlink() => super::decode::warn_skipped(
                &path,
                &format!("broken or looping symbolic link ({e})"),
            ),
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(())
}

fn class_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The samples whose image header can be read ([`super::decode::probe_image`], in parallel); the others
/// are warned about and added to `skipped`.
fn readable(samples: Vec<Sample>, skipped: &mut Vec<(PathBuf, String)>) -> Vec<Sample> {
    use rayon::prelude::*;
    let probed: Vec<Result<()>> = samples
        .par_iter()
        .map(|s| super::decode::probe_image(&s.path))
        .collect();
    let mut ok = Vec::with_capacity(samples.len());
    for (sample, r) in samples.into_iter().zip(probed) {
        match r {
            Ok(()) => ok.push(sample),
            Err(e) => {
                let reason = match e {
                    Error::Image { reason, .. } => reason,
                    other => other.to_string(),
                };
                super::decode::warn_skipped(&sample.path, &reason);
                skipped.push((sample.path, reason));
            }
        }
    }
    ok
}

/// Reads `dir/<class>/**` into sorted class names and samples, with the errors of [`ImageFolder::open`].
fn read_classes(dir: &Path) -> Result<(Vec<String>, Vec<Sample>)> {
    let folders = subfolders(dir)?;
    if folders.is_empty() {
        let loose = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .any(|e| is_image_path(&e.path()));
        let reason = if loose {
            "holds images but no class folders; put each class's images in its own subfolder, <root>/<class>/<image>"
        } else {
            "is empty: expected one subfolder of images per class, <root>/<class>/<image>"
        };
        return Err(dataset_error(dir, reason));
    }
    let mut classes = Vec::new();
    let mut samples = Vec::new();
    let mut empty = Vec::new();
    for folder in &folders {
        let mut images = Vec::new();
        images_under(folder, &mut HashSet::new(), &mut images)?;
        if images.is_empty() {
            empty.push(class_name(folder));
            continue;
        }
        let label = classes.len();
        classes.push(class_name(folder));
        samples.extend(images.into_iter().map(|path| Sample { path, label }));
    }
    let extensions = IMAGE_EXTENSIONS.join(", ");
    if classes.is_empty() {
        return Err(dataset_error(
            dir,
            format!("no class folder holds an image (looked for {extensions})"),
        ));
    }
    if !empty.is_empty() {
        return Err(dataset_error(
            dir,
            format!(
                "class folder(s) {} hold no images (looked for {extensions}); remove them or add images",
                empty.join(", ")
            ),
        ));
    }
    if classes.len() == 1 {
        return Err(dataset_error(
            dir,
            format!(
                "only one class (`{}`); a classifier needs at least two class folders",
                classes[0]
            ),
        ));
    }
    Ok((classes, samples))
}

/// Reads a `val`/`test` folder against the training classes. A class may be absent or empty there
/// (small validation sets), but an unknown class is an error: its label would mean nothing.
fn read_split(dir: &Path, classes: &[String]) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for folder in subfolders(dir)? {
        let name = class_name(&folder);
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(dataset_error(
                &folder,
                format!(
                    "class `{name}` is not among the training classes ({})",
                    classes.join(", ")
                ),
            ));
        };
        let mut images = Vec::new();
        images_under(&folder, &mut HashSet::new(), &mut images)?;
        samples.extend(images.into_iter().map(|path| Sample { path, label }));
    }
    if samples.is_empty() {
        return Err(dataset_error(dir, "holds no images in class folders"));
    }
    Ok(samples)
}

/// Moves `round(count * fraction)` images of each class (at most `count - 1`, so every class keeps one
/// for training) into the second list, chosen by a shuffle seeded with `seed`. Both lists keep path order.
pub fn stratified_split(
    samples: Vec<Sample>,
    num_classes: usize,
    fraction: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>) {
    if fraction <= 0.0 {
        return (samples, Vec::new());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut to_val = vec![false; samples.len()];
    for label in 0..num_classes {
        let mut members: Vec<usize> = (0..samples.len())
            .filter(|&i| samples[i].label == label)
            .collect();
        let n_val = ((members.len() as f64 * fraction).round() as usize)
            .min(members.len().saturating_sub(1));
        members.shuffle(&mut rng);
        for &i in &members[..n_val] {
            to_val[i] = true;
        }
    }
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (sample, v) in samples.into_iter().zip(to_val) {
        if v {
            val.push(sample);
        } else {
            train.push(sample);
        }
    }
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(counts: &[usize]) -> Vec<Sample> {
        counts
            .iter()
            .enumerate()
            .flat_map(|(label, &n)| {
                (0..n).map(move |i| Sample {
                    path: PathBuf::from(format!("{label}/{i}.png")),
                    label,
                })
            })
            .collect()
    }

    #[test]
    fn stratified_split_takes_the_fraction_of_every_class_and_keeps_one_for_training() {
        let (train, val) = stratified_split(samples(&[10, 5, 1]), 3, 0.2, 7);
        assert_eq!(class_counts(&val, 3), vec![2, 1, 0]);
        assert_eq!(class_counts(&train, 3), vec![8, 4, 1]);
        let (train2, val2) = stratified_split(samples(&[10, 5, 1]), 3, 0.2, 7);
        assert_eq!((train, val), (train2, val2), "same seed, same split");
    }

    #[test]
    fn different_seeds_choose_different_validation_images() {
        let (_, a) = stratified_split(samples(&[50, 50]), 2, 0.2, 1);
        let (_, b) = stratified_split(samples(&[50, 50]), 2, 0.2, 2);
        assert_ne!(a, b);
    }

    #[test]
    fn balanced_weights_follow_sklearn() {
        // sklearn: n_samples / (n_classes * bincount) = 8 / (2 * [6, 2]) = [2/3, 2]
        let w = class_weights_of(&samples(&[6, 2]), 2);
        assert!(
            (w[0] - 2.0 / 3.0).abs() < 1e-6 && (w[1] - 2.0).abs() < 1e-6,
            "{w:?}"
        );
    }
}
