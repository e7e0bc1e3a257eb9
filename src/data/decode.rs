//! Reading image files into RGB pixels.
//!
//! Every format the `image` crate decodes by default is accepted: JPEG, PNG, BMP, GIF (its first frame),
//! WebP and TIFF. Whatever the stored colour model, the result is 8-bit RGB, as PIL's `convert("RGB")`
//! gives it to torchvision: grey is replicated into three channels, alpha is dropped (not composited),
//! 16-bit samples are scaled to 8 bits, and CMYK (JPEG or TIFF) is converted by the decoder.

use crate::{Error, Result};
use image::{DynamicImage, ImageReader, RgbImage};
use std::path::Path;

/// File extensions read as images, lower case; matching is case-insensitive (`IMG_0001.JPG` is an image).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "bmp", "gif", "webp", "tif", "tiff",
];

/// Whether `path` names an image by its extension. Hidden files (a name starting with `.`, such as macOS's
/// `._photo.jpg` resource forks) are not images.
pub fn is_image_path(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') {
        return false;
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => IMAGE_EXTENSIONS
            .iter()
            .any(|known| known.eq_ignore_ascii_case(ext)),
        None => false,
    }
}

/// Decodes the image at `path`. The format is guessed from the file's first bytes and only then from
/// its extension, so a PNG saved as `.jpg` still opens.
///
/// A missing, unreadable, corrupt or truncated file is an [`Error::Image`] naming the path and the
/// decoder's reason.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let fail = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let reader = ImageReader::open(path)
        .map_err(|e| fail(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    let image = reader.decode().map_err(|e| fail(e.to_string()))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(fail("image has no pixels".into()));
    }
    Ok(image)
}

/// Decodes the image at `path` into 8-bit RGB (see the module doc for how other colour models map).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(into_rgb(decode_image(path)?))
}

/// Converts any decoded image to 8-bit RGB, without a copy when it already is.
pub fn into_rgb(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_match_in_any_case() {
        assert!(is_image_path(Path::new("a/b/IMG_1.JPG")));
        assert!(is_image_path(Path::new("x.Tiff")));
        assert!(is_image_path(Path::new("x.webp")));
    }

    #[test]
    fn hidden_files_and_other_extensions_are_not_images() {
        assert!(!is_image_path(Path::new("a/._photo.jpg")));
        assert!(!is_image_path(Path::new("a/.DS_Store")));
        assert!(!is_image_path(Path::new("a/notes.txt")));
        assert!(!is_image_path(Path::new("a/README")));
    }
}
