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

// ---- TrivialAugmentWide / RandAugment ops against Pillow ----
//
// tests/fixtures/augment-reference.json was made by scripts/augment-reference.py with Pillow 13.0.0: each op
// as torchvision 0.2x's `_apply_op` calls it on a PIL image (F.affine / Image.rotate with NEAREST and fill 0,
// ImageEnhance.*, ImageOps.*), on a deterministic 24x20 image and a 16x16 crop of it. Floats are stored as
// the hex of their f64 bits, images as hex RGB bytes.

mod augment_reference {
    use graft::data::autoaugment::{apply_op, magnitude, Op, Space, MAGNITUDE_BINS, OPS};
    use graft::data::transform::{augment_into, random_erasing};
    use graft::data::{Augment, AutoAugment, Interpolation, Preprocess};
    use image::RgbImage;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use serde_json::Value;

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/augment-reference.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn float(bits: &Value) -> f64 {
        f64::from_bits(u64::from_str_radix(bits.as_str().unwrap(), 16).unwrap())
    }

    fn bytes(hex: &Value) -> Vec<u8> {
        let s = hex.as_str().unwrap();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn op_named(name: &str) -> Op {
        *OPS.iter()
            .find(|op| format!("{op:?}") == name)
            .unwrap_or_else(|| panic!("no op {name}"))
    }

    fn image(v: &Value) -> RgbImage {
        let (w, h) = (v["width"].as_u64().unwrap(), v["height"].as_u64().unwrap());
        RgbImage::from_raw(w as u32, h as u32, bytes(&v["rgb"])).unwrap()
    }

    #[test]
    fn magnitude_tables_equal_torchvisions_float32_tables() {
        let f = fixture();
        let t = &f["tables"];
        let size = (
            t["size"][0].as_u64().unwrap() as u32,
            t["size"][1].as_u64().unwrap() as u32,
        );
        for (space, key) in [(Space::Wide, "wide"), (Space::Rand, "rand")] {
            for (name, values) in t[key].as_object().unwrap() {
                let op = op_named(name);
                let values = values.as_array().unwrap();
                assert_eq!(values.len(), MAGNITUDE_BINS);
                for (bin, v) in values.iter().enumerate() {
                    assert_eq!(
                        magnitude(space, op, bin, size),
                        float(v),
                        "{key} {name} bin {bin}"
                    );
                }
            }
        }
    }

    /// Every op gives Pillow's bytes exactly: the colour ops use Pillow's float32 blend and truncation,
    /// the geometric ones its 16.16 fixed-point nearest-neighbour stepping, so no tolerance is needed.
    #[test]
    fn every_op_matches_pillow_byte_for_byte() {
        let f = fixture();
        let mut failures = Vec::new();
        let cases = f["cases"].as_array().unwrap();
        for case in cases {
            let name = case["op"].as_str().unwrap();
            let m = float(&case["magnitude"]);
            let input = image(&f["images"][case["image"].as_str().unwrap()]);
            let ours = apply_op(&input, op_named(name), m);
            let want = bytes(&case["rgb"]);
            let (w, _) = input.dimensions();
            let diff: Vec<(usize, usize, u8, u8)> = ours
                .as_raw()
                .iter()
                .zip(&want)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, (a, b))| ((i / 3) % w as usize, i / 3 / w as usize, *a, *b))
                .collect();
            if !diff.is_empty() {
                failures.push(format!(
                    "{name}({m}) on {}: {} bytes differ, first (x, y, ours, Pillow) {:?}",
                    case["image"],
                    diff.len(),
                    &diff[..diff.len().min(4)]
                ));
            }
        }
        assert!(cases.len() > 40);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    fn preprocess(size: usize) -> Preprocess {
        Preprocess {
            input_size: size,
            crop_pct: 1.0,
            interpolation: Interpolation::Bilinear,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            channels: 3,
        }
    }

    #[test]
    fn the_same_seed_and_position_give_the_same_augmented_tensor() {
        let f = fixture();
        let input = image(&f["images"]["main"]);
        let p = preprocess(16);
        for auto in [AutoAugment::TrivialWide, AutoAugment::rand()] {
            let aug = Augment {
                auto: Some(auto),
                erasing: 0.5,
                ..Augment::default()
            };
            let run = |seed: u64| {
                let mut out = vec![0f32; p.tensor_len()];
                augment_into(
                    &input,
                    &p,
                    &aug,
                    &mut ChaCha8Rng::seed_from_u64(seed),
                    &mut out,
                );
                out
            };
            let distinct: std::collections::HashSet<Vec<u32>> = (0..8)
                .map(|seed| {
                    let (a, b) = (run(seed), run(seed));
                    assert_eq!(a, b, "{auto:?} seed {seed}");
                    a.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            assert!(distinct.len() > 4, "{auto:?}: seeds give different images");
        }
    }

    #[test]
    fn an_augment_without_policy_or_erasing_gives_what_it_gave_before() {
        // Off parts draw nothing: `auto: None, erasing: 0` is the old crop + flip, bit for bit. The old
        // pipeline is restated here: crop box, resize, flip draw, normalise.
        let f = fixture();
        let input = image(&f["images"]["main"]);
        let p = preprocess(16);
        let mut ours = vec![0f32; p.tensor_len()];
        augment_into(
            &input,
            &p,
            &Augment::default(),
            &mut ChaCha8Rng::seed_from_u64(7),
            &mut ours,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let b = graft::data::transform::random_resized_crop_box(
            24,
            20,
            [0.08, 1.0],
            [0.75, 4.0 / 3.0],
            &mut rng,
        );
        let crop = image::imageops::crop_imm(&input, b.left, b.top, b.width, b.height).to_image();
        let resized = graft::data::resample::resize(&crop, 16, 16, Interpolation::Bilinear);
        let flip = rand::Rng::random::<f64>(&mut rng) < 0.5;
        let mut old = vec![0f32; p.tensor_len()];
        graft::data::transform::normalize_into(&resized, &p, flip, &mut old);
        assert_eq!(ours, old);
    }

    #[test]
    fn erasing_with_probability_one_replaces_one_box_of_plausible_size_and_nothing_else() {
        let (c, s) = (3, 32);
        let before: Vec<f32> = (0..c * s * s)
            .map(|i| (i % 7) as f32 * 10.0 + 100.0)
            .collect();
        for seed in 0..50 {
            let mut out = before.clone();
            let b = random_erasing(&mut out, c, s, 1.0, &mut ChaCha8Rng::seed_from_u64(seed))
                .expect("a box that fits is found within 10 tries on a 32x32 image");
            let area = (b.height * b.width) as f64 / (s * s) as f64;
            // round() of each side moves the area a little past timm's [0.02, 1/3]
            assert!((0.01..0.40).contains(&area), "{b:?}: area {area}");
            let aspect = b.height as f64 / b.width as f64;
            assert!((0.2..5.0).contains(&aspect), "{b:?}");
            assert!(b.top + b.height <= s && b.left + b.width <= s);
            for ch in 0..c {
                for y in 0..s {
                    for x in 0..s {
                        let i = ch * s * s + y * s + x;
                        let inside = (b.top..b.top + b.height).contains(&y)
                            && (b.left..b.left + b.width).contains(&x);
                        if inside {
                            // noise is standard normal, the original values are 100 and above
                            assert!(out[i].abs() < 10.0, "({ch}, {y}, {x}) not erased: {b:?}");
                        } else {
                            assert_eq!(out[i], before[i], "({ch}, {y}, {x}) outside {b:?}");
                        }
                    }
                }
            }
        }
        let mut out = before.clone();
        assert_eq!(
            random_erasing(&mut out, c, s, 0.0, &mut ChaCha8Rng::seed_from_u64(1)),
            None
        );
        assert_eq!(out, before);
    }
}
