//! Image folders on disk: every supported format and colour model decodes to RGB, the layouts and
//! splits are found, and every way a folder can be unusable is a clear error. All folders are generated
//! in a temp dir by the tests themselves.

use graft::data::{class_weights, decode_image, load_rgb, ImageFolder};
use graft::Error;
use image::{ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba};
use std::path::{Path, PathBuf};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn save_rgb(path: &Path, colour: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(16, 12, Rgb(colour))
        .save(path)
        .unwrap();
}

/// An uncompressed little-endian CMYK TIFF, one strip, written byte by byte (the `image` crate does not
/// encode CMYK).
fn cmyk_tiff(w: u16, h: u16, cmyk: [u8; 4]) -> Vec<u8> {
    let entries: [(u16, u16, u32, u32); 10] = [
        (256, 3, 1, w as u32),                // ImageWidth
        (257, 3, 1, h as u32),                // ImageLength
        (258, 3, 4, 134),                     // BitsPerSample -> offset of [8, 8, 8, 8]
        (259, 3, 1, 1),                       // Compression: none
        (262, 3, 1, 5),                       // Photometric: separated (CMYK)
        (273, 4, 1, 142),                     // StripOffsets
        (277, 3, 1, 4),                       // SamplesPerPixel
        (278, 3, 1, h as u32),                // RowsPerStrip
        (279, 4, 1, w as u32 * h as u32 * 4), // StripByteCounts
        (284, 3, 1, 1),                       // PlanarConfiguration: chunky
    ];
    let mut out = b"II".to_vec();
    out.extend_from_slice(&42u16.to_le_bytes());
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, ty, count, value) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(out.len(), 134);
    for _ in 0..4 {
        out.extend_from_slice(&8u16.to_le_bytes());
    }
    for _ in 0..(w as usize * h as usize) {
        out.extend_from_slice(&cmyk);
    }
    out
}

/// A baseline 8x8 CMYK JPEG (Adobe APP14, no colour transform) of one flat colour, encoded by hand: each
/// component's block is DC-only, quantiser 1, so its DC coefficient is `8 * (value - 128)`. Values are
/// stored inverted, as Adobe writes CMYK and as decoders read it.
fn cmyk_jpeg(stored: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    let mut segment = |marker: u8, body: &[u8]| {
        out.extend_from_slice(&[0xFF, marker]);
        out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(body);
    };
    segment(0xEE, &[b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, 0]);
    let mut dqt = vec![0u8];
    dqt.extend_from_slice(&[1u8; 64]);
    segment(0xDB, &dqt);
    let mut sof = vec![8, 0, 8, 0, 8, 4];
    for id in 1..=4u8 {
        sof.extend_from_slice(&[id, 0x11, 0]);
    }
    segment(0xC0, &sof);
    // The standard luminance DC table (categories 0..=11) and an AC table holding only end-of-block.
    let dc_bits = [0u8, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    let mut dht = vec![0x00];
    dht.extend_from_slice(&dc_bits);
    dht.extend(0..=11u8);
    segment(0xC4, &dht);
    let mut dht = vec![0x10, 1];
    dht.extend_from_slice(&[0u8; 15]);
    dht.push(0x00);
    segment(0xC4, &dht);
    let mut sos = vec![4];
    for id in 1..=4u8 {
        sos.extend_from_slice(&[id, 0x00]);
    }
    sos.extend_from_slice(&[0, 63, 0]);
    segment(0xDA, &sos);
    // Canonical codes of the DC table, by category.
    let mut codes = Vec::new();
    let mut code = 0u32;
    for (len, &n) in dc_bits.iter().enumerate() {
        for _ in 0..n {
            codes.push((code, len as u32 + 1));
            code += 1;
        }
        code <<= 1;
    }
    let mut bits: Vec<bool> = Vec::new();
    let put = |value: u32, len: u32, bits: &mut Vec<bool>| {
        for i in (0..len).rev() {
            bits.push((value >> i) & 1 == 1);
        }
    };
    for v in stored {
        let dc = 8 * (v as i32 - 128);
        let category = 32 - dc.unsigned_abs().leading_zeros();
        let (code, len) = codes[category as usize];
        put(code, len, &mut bits);
        let extra = if dc >= 0 {
            dc
        } else {
            dc + (1 << category) - 1
        };
        put(extra as u32, category, &mut bits);
        put(0, 1, &mut bits); // end of block
    }
    while !bits.len().is_multiple_of(8) {
        bits.push(true);
    }
    for byte in bits.chunks(8) {
        let b = byte.iter().fold(0u8, |acc, &bit| (acc << 1) | bit as u8);
        out.push(b);
        if b == 0xFF {
            out.push(0);
        }
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// One file per supported format and colour model, with the RGB colour it must decode to and how far
/// a lossy format may stray.
fn every_format(dir: &Path) -> Vec<(PathBuf, [u8; 3], u8)> {
    let mut files = Vec::new();
    let p = dir.join("rgb.jpg");
    save_rgb(&p, [200, 30, 40]);
    files.push((p, [200, 30, 40], 8));
    let p = dir.join("UPPER.JPEG");
    save_rgb(&p, [20, 130, 240]);
    files.push((p, [20, 130, 240], 8));
    let p = dir.join("grey.jpg");
    ImageBuffer::from_pixel(9, 9, Luma([77u8]))
        .save(&p)
        .unwrap();
    files.push((p, [77, 77, 77], 2));
    let p = dir.join("rgb.png");
    save_rgb(&p, [1, 2, 3]);
    files.push((p, [1, 2, 3], 0));
    let p = dir.join("grey.Png");
    ImageBuffer::from_pixel(5, 7, Luma([99u8]))
        .save(&p)
        .unwrap();
    files.push((p, [99, 99, 99], 0));
    let p = dir.join("grey_alpha.png");
    ImageBuffer::from_pixel(5, 7, LumaA([50u8, 10]))
        .save(&p)
        .unwrap();
    files.push((p, [50, 50, 50], 0));
    let p = dir.join("rgba.png");
    ImageBuffer::from_pixel(6, 4, Rgba([10u8, 220, 30, 0]))
        .save(&p)
        .unwrap();
    files.push((p, [10, 220, 30], 0)); // alpha dropped, as PIL's convert("RGB")
    let p = dir.join("rgb16.png");
    ImageBuffer::from_pixel(3, 3, Rgb([65535u16, 0, 32896]))
        .save(&p)
        .unwrap();
    files.push((p, [255, 0, 128], 0));
    let p = dir.join("grey16.png");
    ImageBuffer::from_pixel(3, 3, Luma([257u16 * 60]))
        .save(&p)
        .unwrap();
    files.push((p, [60, 60, 60], 0));
    let p = dir.join("rgb.bmp");
    save_rgb(&p, [9, 8, 7]);
    files.push((p, [9, 8, 7], 0));
    let p = dir.join("rgb.webp");
    save_rgb(&p, [120, 60, 30]);
    files.push((p, [120, 60, 30], 0));
    let p = dir.join("rgb.TIF");
    save_rgb(&p, [33, 66, 99]);
    files.push((p, [33, 66, 99], 0));
    let p = dir.join("cmyk.tiff");
    write(&p, &cmyk_tiff(4, 3, [255, 0, 255, 0])); // full cyan + yellow, no black: green
    files.push((p, [0, 255, 0], 0));
    let p = dir.join("cmyk.jpg");
    write(&p, &cmyk_jpeg([0, 255, 0, 255])); // inverted: full cyan + yellow, no black: green
    files.push((p, [0, 255, 0], 2));
    // An animated GIF: the first frame (red) is the image.
    let p = dir.join("anim.gif");
    {
        let file = std::fs::File::create(&p).unwrap();
        let mut enc = image::codecs::gif::GifEncoder::new(file);
        let red = image::Frame::new(ImageBuffer::from_pixel(8, 8, Rgba([255u8, 0, 0, 255])));
        let blue = image::Frame::new(ImageBuffer::from_pixel(8, 8, Rgba([0u8, 0, 255, 255])));
        enc.encode_frames([red, blue]).unwrap();
    }
    files.push((p, [255, 0, 0], 0));
    // A PNG misnamed as .jpg is read by its content.
    let p = dir.join("really_png.jpg");
    let mut buf = Vec::new();
    RgbImage::from_pixel(4, 4, Rgb([5, 6, 7]))
        .write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
        .unwrap();
    write(&p, &buf);
    files.push((p, [5, 6, 7], 0));
    files
}

#[test]
fn every_format_and_colour_model_decodes_to_the_expected_rgb() {
    let dir = tempfile::tempdir().unwrap();
    for (path, want, tolerance) in every_format(dir.path()) {
        let rgb = load_rgb(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(rgb.width() > 0 && rgb.height() > 0);
        for px in rgb.pixels() {
            for c in 0..3 {
                let diff = (px.0[c] as i32 - want[c] as i32).unsigned_abs();
                assert!(
                    diff <= tolerance as u32,
                    "{}: got {:?}, want {want:?}",
                    path.display(),
                    px.0
                );
            }
        }
    }
}

#[test]
fn the_folder_lists_every_format_and_ignores_hidden_and_non_image_files() {
    let dir = tempfile::tempdir().unwrap();
    let formats = every_format(&dir.path().join("cats"));
    save_rgb(&dir.path().join("dogs/d1.png"), [0, 0, 0]);
    save_rgb(&dir.path().join("dogs/nested/deeper/d2.JPG"), [0, 0, 0]);
    write(&dir.path().join("dogs/.hidden.jpg"), b"not looked at");
    write(&dir.path().join("dogs/._d1.png"), b"macOS resource fork");
    write(&dir.path().join("dogs/notes.txt"), b"hello");
    write(&dir.path().join("dogs/Thumbs.db"), b"x");
    save_rgb(&dir.path().join("dogs/.cache/d3.png"), [0, 0, 0]);
    save_rgb(&dir.path().join(".git/objects/x.png"), [0, 0, 0]);
    write(&dir.path().join("README.md"), b"a dataset");

    let data = ImageFolder::open(dir.path(), 0.0, 0).unwrap();
    assert_eq!(data.classes, vec!["cats", "dogs"]);
    assert!(data.val.is_empty() && data.test.is_none());
    let cats: Vec<_> = data.train.iter().filter(|s| s.label == 0).collect();
    let dogs: Vec<_> = data
        .train
        .iter()
        .filter(|s| s.label == 1)
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(cats.len(), formats.len());
    assert_eq!(
        dogs,
        vec![
            dir.path().join("dogs/d1.png"),
            dir.path().join("dogs/nested/deeper/d2.JPG")
        ]
    );
}

fn class_folder(root: &Path, class: &str, n: usize) {
    for i in 0..n {
        save_rgb(
            &root.join(class).join(format!("{i:03}.png")),
            [i as u8, 0, 0],
        );
    }
}

#[test]
fn classes_are_sorted_by_name_and_validation_is_a_stratified_seeded_fraction() {
    let dir = tempfile::tempdir().unwrap();
    class_folder(dir.path(), "zebra", 10);
    class_folder(dir.path(), "ant", 20);
    class_folder(dir.path(), "Moose", 5);
    let data = ImageFolder::open(dir.path(), 0.2, 42).unwrap();
    assert_eq!(
        data.classes,
        vec!["Moose", "ant", "zebra"],
        "byte order, as Python's sorted()"
    );
    let count = |s: &[graft::data::Sample], l| s.iter().filter(|x| x.label == l).count();
    assert_eq!(
        [
            count(&data.val, 0),
            count(&data.val, 1),
            count(&data.val, 2)
        ],
        [1, 4, 2]
    );
    assert_eq!(data.train.len() + data.val.len(), 35);
    assert!(!data.val_from_folder);
    let again = ImageFolder::open(dir.path(), 0.2, 42).unwrap();
    assert_eq!(again.val, data.val);
    let other = ImageFolder::open(dir.path(), 0.2, 43).unwrap();
    assert_ne!(other.val, data.val);
    // sklearn "balanced" on the training counts [4, 16, 8]: 28 / (3 * count)
    let w = class_weights(&data);
    for (w, c) in w.iter().zip([4.0f32, 16.0, 8.0]) {
        assert!((w - 28.0 / (3.0 * c)).abs() < 1e-5, "{w}");
    }
}

#[test]
fn train_val_and_test_folders_are_the_splits() {
    let dir = tempfile::tempdir().unwrap();
    for (split, n) in [("train", 4), ("valid", 2), ("test", 3)] {
        class_folder(&dir.path().join(split), "a", n);
        class_folder(&dir.path().join(split), "b", n);
    }
    let data = ImageFolder::open(dir.path(), 0.5, 0).unwrap();
    assert_eq!(data.classes, vec!["a", "b"]);
    assert_eq!(
        (data.train.len(), data.val.len()),
        (8, 4),
        "val_split is not applied to a val folder"
    );
    assert!(data.val_from_folder);
    assert_eq!(data.test.as_ref().unwrap().len(), 6);
    assert!(data
        .val
        .iter()
        .all(|s| s.path.starts_with(dir.path().join("valid"))));
}

#[test]
fn train_and_test_without_val_split_validation_off_train() {
    let dir = tempfile::tempdir().unwrap();
    class_folder(&dir.path().join("train"), "a", 10);
    class_folder(&dir.path().join("train"), "b", 10);
    class_folder(&dir.path().join("test"), "a", 3);
    class_folder(&dir.path().join("test"), "b", 3);
    let data = ImageFolder::open(dir.path(), 0.2, 0).unwrap();
    assert_eq!((data.train.len(), data.val.len()), (16, 4));
    assert_eq!(data.test.unwrap().len(), 6);
    assert!(data
        .val
        .iter()
        .all(|s| s.path.starts_with(dir.path().join("train"))));
}

fn dataset_error(root: &Path) -> String {
    match ImageFolder::open(root, 0.2, 0) {
        Err(e @ Error::Dataset { .. }) => e.to_string(),
        Err(other) => panic!("expected a dataset error, got {other:?}"),
        Ok(d) => panic!("expected an error, got classes {:?}", d.classes),
    }
}

#[test]
fn unusable_folders_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let missing = dataset_error(&root.join("nope"));
    assert!(
        missing.contains("nope") && missing.contains("cannot open"),
        "{missing}"
    );

    std::fs::create_dir_all(root.join("empty")).unwrap();
    let empty = dataset_error(&root.join("empty"));
    assert!(empty.contains("is empty"), "{empty}");

    save_rgb(&root.join("loose/a.png"), [0, 0, 0]);
    let loose = dataset_error(&root.join("loose"));
    assert!(loose.contains("no class folders"), "{loose}");

    write(&root.join("noimages/a/readme.txt"), b"x");
    std::fs::create_dir_all(root.join("noimages/b")).unwrap();
    let none = dataset_error(&root.join("noimages"));
    assert!(none.contains("no class folder holds an image"), "{none}");

    class_folder(&root.join("single"), "only", 3);
    let single = dataset_error(&root.join("single"));
    assert!(single.contains("only one class (`only`)"), "{single}");

    class_folder(&root.join("oneempty"), "a", 3);
    class_folder(&root.join("oneempty"), "b", 3);
    std::fs::create_dir_all(root.join("oneempty/c")).unwrap();
    let one_empty = dataset_error(&root.join("oneempty"));
    assert!(
        one_empty.contains("class folder(s) c hold no images"),
        "{one_empty}"
    );

    class_folder(&root.join("split/train"), "a", 3);
    class_folder(&root.join("split/train"), "b", 3);
    class_folder(&root.join("split/val"), "cat", 1);
    let unknown = dataset_error(&root.join("split"));
    assert!(
        unknown.contains("`cat` is not among the training classes"),
        "{unknown}"
    );

    let bad_fraction = ImageFolder::open(root.join("oneempty"), 1.0, 0).unwrap_err();
    assert!(
        bad_fraction.to_string().contains("val_split"),
        "{bad_fraction}"
    );
}

#[test]
fn corrupt_and_truncated_images_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.jpg");
    write(&garbage, b"\xFF\xD8\xFF\xE0 this is not a jpeg at all");
    let mut png = Vec::new();
    RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 7]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let truncated = dir.path().join("truncated.png");
    write(&truncated, &png[..png.len() / 2]);
    let mut jpeg = Vec::new();
    RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 7]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let truncated_jpeg = dir.path().join("truncated.jpg");
    write(&truncated_jpeg, &jpeg[..jpeg.len() * 3 / 4]);
    let mut gif = Vec::new();
    RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 7]))
        .write_to(&mut std::io::Cursor::new(&mut gif), image::ImageFormat::Gif)
        .unwrap();
    let truncated_gif = dir.path().join("truncated.gif");
    write(&truncated_gif, &gif[..gif.len() * 3 / 4]);
    let empty = dir.path().join("empty.png");
    write(&empty, b"");
    let text = dir.path().join("text.webp");
    write(&text, b"hello, world");
    for path in [
        garbage,
        truncated,
        truncated_jpeg,
        truncated_gif,
        empty,
        text,
        dir.path().join("absent.png"),
    ] {
        match decode_image(&path) {
            Err(Error::Image { path: p, reason }) => {
                assert_eq!(p, path);
                assert!(!reason.is_empty());
                if path.ends_with("truncated.jpg") {
                    assert!(reason.contains("truncated"), "{reason}");
                }
            }
            other => panic!("{}: expected an image error, got {other:?}", path.display()),
        }
    }
}
