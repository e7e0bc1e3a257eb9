//! The resampling and normalisation match Pillow + torchvision bit for bit: the golden EfficientNet-Lite0 input for
//! chelsea was made in PyTorch from `images/chelsea.png` (see ../shared/golden/README.md and
//! reference/check_efficientnet.py `preprocess(crop="tf")`: centre crop of `round(224 / 256 * short)`
//! pixels, Pillow bicubic resize to 224, mean 0.5, std 0.5), with torch 2.15 / torchvision 0.29.

use candle_core::Device;
use graft::data::resample::resize;
use graft::data::transform::normalize_into;
use graft::data::{load_rgb, Interpolation, Preprocess};
use std::path::PathBuf;

fn golden() -> PathBuf {
    std::env::var_os("GRAFT_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden")))
}

#[test]
fn bicubic_resize_and_normalisation_match_the_pytorch_reference_input() {
    let root = golden();
    let image = load_rgb(&root.join("images/chelsea.png")).unwrap();
    let (w, h) = image.dimensions();
    // Python: c = int(round(224 / 256 * min(w, h))); round() sends halves to even.
    let exact = 224.0 / 256.0 * w.min(h) as f64;
    let c = if exact.fract() == 0.5 && (exact.floor() as u32).is_multiple_of(2) {
        exact.floor()
    } else {
        exact.round()
    } as u32;
    let (left, top) = ((w - c) / 2, (h - c) / 2);
    let crop = image::imageops::crop_imm(&image, left, top, c, c).to_image();
    let resized = resize(&crop, 224, 224, Interpolation::Bicubic);
    let p = Preprocess {
        input_size: 224,
        crop_pct: 1.0,
        interpolation: Interpolation::Bicubic,
        mean: [0.5; 3],
        std: [0.5; 3],
        channels: 3,
    };
    let mut ours = vec![0f32; p.tensor_len()];
    normalize_into(&resized, &p, false, &mut ours);

    let tensors = candle_core::safetensors::load(
        root.join("models/efficientnet_lite0/reference_io.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let reference = tensors["chelsea_224.input"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(reference.len(), ours.len());
    // Our resampler is Pillow's fixed-point arithmetic, so every pixel is the same byte; what remains
    // is float rounding in the normalisation (one 8-bit level would be 2/255 = 0.0078 here).
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert!((a - b).abs() < 1e-5, "sample {i}: ours {a}, PyTorch {b}");
    }
}
