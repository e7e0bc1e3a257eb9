//! The resampling and normalisation match Pillow + torchvision: the golden EfficientNet-Lite0 input for
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
    // One 8-bit level is 2/255 after normalisation by std 0.5. Pillow accumulates in fixed point, we in
    // f32, so a few samples may round the other way; none may be off by more than one level.
    let level = 2.0 / 255.0;
    let mut off_by_one = 0;
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        let diff = (a - b).abs();
        assert!(diff < 1.5 * level, "sample {i}: ours {a}, PyTorch {b}");
        if diff > 0.5 * level {
            off_by_one += 1;
        }
    }
    // Measured: 4 of 150,528.
    assert!(
        off_by_one * 1000 < ours.len(),
        "{off_by_one} of {} samples one level off",
        ours.len()
    );
}
