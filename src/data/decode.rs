//! Reading image files into RGB pixels.
//!
//! Every format the `image` crate decodes by default is accepted: JPEG, PNG, BMP, GIF (its first frame),
//! WebP and TIFF. Whatever the stored colour model, the result is 8-bit RGB, as PIL's `convert("RGB")`
//! gives it to torchvision: grey is replicated into three channels, alpha is dropped (not composited),
//! 16-bit samples are scaled to 8 bits, and CMYK (JPEG or TIFF) is converted by the decoder.

use crate::{Error, Result};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;
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
/// decoder's reason. The JPEG decoder itself fills a truncated file's missing rows with grey and
/// reports success, so a JPEG is first checked to run to its end-of-image marker (as Pillow refuses
/// truncated files by default).
///
/// The EXIF orientation (JPEG, PNG, WebP, TIFF) is applied, as `PIL.ImageOps.exif_transpose` does: a phone
/// photo stored sideways with Orientation=6 comes out upright, in training, evaluation and prediction alike.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let fail = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let reader = ImageReader::new(Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        check_jpeg_complete(&bytes).map_err(fail)?;
    }
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    // A malformed EXIF block is no reason to lose the image: it is then read as stored.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(fail("image has no pixels".into()));
    }
    Ok(image)
}

/// Walks a JPEG's markers, skipping segments by their length and entropy-coded data to the next real
/// marker, and fails unless the end-of-image marker is reached. Data after it is allowed (phones
/// append some), and an embedded thumbnail's marker does not count because its segment is skipped.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    const TRUNCATED: &str = "truncated JPEG: the file ends before its end-of-image marker";
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG: no start-of-image marker".into());
    }
    let mut i = 2;
    loop {
        // Next marker: 0xFF (possibly repeated as fill) then a code.
        i += bytes[i.min(bytes.len())..]
            .iter()
            .position(|&b| b == 0xFF)
            .ok_or(TRUNCATED)?;
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let marker = *bytes.get(i).ok_or(TRUNCATED)?;
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD8 => continue,
            _ => {
                let len = bytes.get(i..i + 2).ok_or(TRUNCATED)?;
                i += u16::from_be_bytes([len[0], len[1]]) as usize;
                if i > bytes.len() {
                    return Err(TRUNCATED.into());
                }
                if marker == 0xDA {
                    // Entropy-coded data: 0xFF 0x00 is a stuffed byte and 0xFF 0xD0..=0xD7 a restart
                    // marker; any other 0xFF xx is the next marker.
                    loop {
                        i += bytes[i..]
                            .iter()
                            .position(|&b| b == 0xFF)
                            .ok_or(TRUNCATED)?;
                        match bytes.get(i + 1) {
                            None => return Err(TRUNCATED.into()),
                            Some(0x00 | 0xD0..=0xD7) => i += 2,
                            Some(_) => break,
                        }
                    }
                }
            }
        }
    }
}

/// Checks cheaply that `path` looks like an image graft can decode: its header names a known format and
/// gives non-zero dimensions (a zero-byte file, text saved as `.jpg`, a folder of HTML error pages). It reads
/// a few bytes, not the pixels, so a file corrupt further in still fails later, when it is decoded.
pub fn probe_image(path: &Path) -> Result<()> {
    let fail = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let (w, h) = ImageReader::open(path)
        .map_err(|e| fail(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?
        .into_dimensions()
        .map_err(|e| fail(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(fail("image has no pixels".into()));
    }
    Ok(())
}

/// Prints `warning: skipping image PATH: REASON` the first time `path` is skipped in this process, so that
/// a file read by several loaders (training, its cached features, validation) is reported once.
pub fn warn_skipped(path: &Path, reason: &str) {
    static WARNED: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let first = WARNED
        .lock()
        .map(|mut w| w.insert(path.to_path_buf()))
        .unwrap_or(true);
    if first {
        eprintln!("warning: skipping image {}: {reason}", path.display());
    }
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

    fn jpeg_bytes() -> Vec<u8> {
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([x as u8 * 4, y as u8 * 5, (x ^ y) as u8])
        });
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Jpeg)
            .unwrap();
        buf
    }

    #[test]
    fn a_whole_jpeg_passes_the_completeness_check_even_with_trailing_bytes() {
        let mut bytes = jpeg_bytes();
        assert_eq!(check_jpeg_complete(&bytes), Ok(()));
        bytes.extend_from_slice(b"trailer appended by a phone");
        assert_eq!(check_jpeg_complete(&bytes), Ok(()));
    }

    #[test]
    fn a_jpeg_cut_anywhere_fails_the_completeness_check() {
        let bytes = jpeg_bytes();
        for cut in (2..bytes.len() - 1).step_by(37).chain([bytes.len() - 1]) {
            assert!(
                check_jpeg_complete(&bytes[..cut]).is_err(),
                "cut at {cut} of {}",
                bytes.len()
            );
        }
    }

    #[test]
    fn hidden_files_and_other_extensions_are_not_images() {
        assert!(!is_image_path(Path::new("a/._photo.jpg")));
        assert!(!is_image_path(Path::new("a/.DS_Store")));
        assert!(!is_image_path(Path::new("a/notes.txt")));
        assert!(!is_image_path(Path::new("a/README")));
    }

    /// A JPEG of a 4x2 image (left half red, right half blue) with an EXIF APP1 segment saying
    /// Orientation=`orientation`, inserted right after the start-of-image marker as cameras write it.
    fn jpeg_with_orientation(orientation: u16) -> Vec<u8> {
        let img = RgbImage::from_fn(16, 8, |x, _| {
            if x < 8 {
                image::Rgb([250, 0, 0])
            } else {
                image::Rgb([0, 0, 250])
            }
        });
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        // TIFF, little-endian: header, one IFD with one SHORT entry (0x0112 Orientation), no next IFD.
        let mut tiff = b"II*\0".to_vec();
        tiff.extend_from_slice(&8u32.to_le_bytes());
        tiff.extend_from_slice(&1u16.to_le_bytes());
        tiff.extend_from_slice(&0x0112u16.to_le_bytes());
        tiff.extend_from_slice(&3u16.to_le_bytes());
        tiff.extend_from_slice(&1u32.to_le_bytes());
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_le_bytes());
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied_as_pil_exif_transpose_does() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.jpg");
        std::fs::write(&plain, jpeg_with_orientation(1)).unwrap();
        let img = load_rgb(&plain).unwrap();
        assert_eq!(img.dimensions(), (16, 8));
        // Orientation 6: the stored image is shown rotated 90 degrees clockwise, so the left (red) half
        // ends up on top.
        let rotated = dir.path().join("rotated.jpg");
        std::fs::write(&rotated, jpeg_with_orientation(6)).unwrap();
        let img = load_rgb(&rotated).unwrap();
        assert_eq!(img.dimensions(), (8, 16));
        let top = img.get_pixel(4, 2);
        let bottom = img.get_pixel(4, 13);
        assert!(top[0] > 200 && top[2] < 60, "top is red: {top:?}");
        assert!(
            bottom[2] > 200 && bottom[0] < 60,
            "bottom is blue: {bottom:?}"
        );
        // Orientation 8 (90 degrees counter-clockwise): red at the bottom.
        let other = dir.path().join("other.jpg");
        std::fs::write(&other, jpeg_with_orientation(8)).unwrap();
        let img = load_rgb(&other).unwrap();
        assert!(img.get_pixel(4, 13)[0] > 200);
    }
}
