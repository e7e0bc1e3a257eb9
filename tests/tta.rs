//! Test-time augmentation (`--tta none|flip|crops` of `graft eval` and `graft predict`): the views the
//! library makes, their layout in loader batches, and the real binary's averaged probabilities, checked
//! against the views run one by one through the library. The model is a freshly initialised ResNet-18 at
//! 32 pixels written as a deployment file; the images are small generated PNGs.

mod common;

use candle_core::{Device, Tensor, D};
use graft::data::{
    load_eval_tensor, load_tta_tensor, tta_tensor, ImageFolder, Interpolation, Loader,
    LoaderConfig, Preprocess, Tta,
};
use graft::export::{load_model, FORMAT, FORMAT_KEY, SPEC_KEY};
use graft::models::classifier::{Classifier, ClassifierSpec};
use graft::models::head::HeadConfig;
use image::{DynamicImage, Rgb, RgbImage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SIZE: usize = 32;

fn preprocess(crop_pct: f64) -> Preprocess {
    Preprocess {
        crop_pct,
        interpolation: Interpolation::Bilinear,
        ..Preprocess::imagenet(SIZE)
    }
}

/// A noisy, asymmetric `w` x `h` pattern, different for each `seed`.
fn pattern(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = (x * x * 7 + y * 31 + seed * 101 + x * y * 3) % 256;
        Rgb([v as u8, (x * 9 + seed * 40) as u8, (y * 5 + x * 2) as u8])
    })
}

/// Writes a deployment file of a freshly initialised ResNet-18 with classes `a`, `b`, `c`. The head's
/// weights are scaled down so that the probabilities stay away from 0 and 1 and differences show.
fn write_export(path: &Path) {
    let spec = ClassifierSpec {
        arch: "resnet18".into(),
        base: "resnet18".into(),
        head: HeadConfig::default(),
        classes: vec!["a".into(), "b".into(), "c".into()],
        preprocess: preprocess(0.875),
        bn_folded: false,
        drop_path: 0.0,
    };
    let model = Classifier::new(spec.clone(), &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = {
        let data = model.varmap.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| {
                let t = v.as_tensor();
                let t = if k.starts_with("head.") {
                    (t * 0.05).unwrap()
                } else {
                    t.copy().unwrap()
                };
                (k.clone(), t)
            })
            .collect()
    };
    let metadata = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        (SPEC_KEY.to_string(), serde_json::to_string(&spec).unwrap()),
    ]);
    graft::formats::weights::save_safetensors_checked(path, &tensors, metadata).unwrap();
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `graft predict --format json` probabilities of every class of each image, by class index.
fn predict_probs(model: &Path, images: &[PathBuf], tta: Option<&str>) -> Vec<Vec<f32>> {
    let mut args = vec![
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--format",
        "json",
    ];
    args.extend(["--top-k", "3"]);
    if let Some(t) = tta {
        args.extend(["--tta", t]);
    }
    args.extend(images.iter().map(|p| p.to_str().unwrap()));
    common::graft_ok(&args)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["tta"], tta.unwrap_or("none"), "{line}");
            let mut probs = vec![0f32; 3];
            for t in v["top"].as_array().unwrap() {
                probs[t["index"].as_u64().unwrap() as usize] = t["prob"].as_f64().unwrap() as f32;
            }
            probs
        })
        .collect()
}

fn eval_json(model: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["eval", "--model", model.to_str().unwrap()];
    args.extend(["--data", data.to_str().unwrap(), "--json"]);
    args.extend(extra);
    serde_json::from_str(&common::graft_ok(&args)).unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn ten_crops_are_input_sized_and_their_centre_view_is_the_plain_evaluation_view() {
    let image = DynamicImage::ImageRgb8(pattern(45, 39, 1));
    let p = preprocess(0.875);
    let crops = tta_tensor(&image, &p, Tta::Crops, &Device::Cpu).unwrap();
    assert_eq!(crops.dims(), &[10, 3, SIZE, SIZE]);
    let none = tta_tensor(&image, &p, Tta::None, &Device::Cpu).unwrap();
    assert_eq!(none.dims(), &[1, 3, SIZE, SIZE]);
    // torchvision's order: four corners, then the centre, then the same of the mirror image.
    assert_eq!(
        to_vec(&crops.get(4).unwrap()),
        to_vec(&none.get(0).unwrap())
    );
    let plain = graft::data::eval_tensor(&image, &p, &Device::Cpu).unwrap();
    assert_eq!(to_vec(&plain), to_vec(&none.get(0).unwrap()));
    // The mirror image's top-left crop is the top-right crop mirrored.
    let mirrored_tr = crops.get(1).unwrap().flip(&[2]).unwrap();
    assert_eq!(to_vec(&crops.get(5).unwrap()), to_vec(&mirrored_tr));
    let flip = tta_tensor(&image, &p, Tta::Flip, &Device::Cpu).unwrap();
    assert_eq!(flip.dims(), &[2, 3, SIZE, SIZE]);
    let mirrored = none.get(0).unwrap().flip(&[2]).unwrap();
    assert_eq!(to_vec(&flip.get(1).unwrap()), to_vec(&mirrored));
}

#[test]
fn without_a_crop_margin_ten_crops_cut_from_the_short_side_of_crop_pct_0_875() {
    let p = preprocess(1.0);
    assert_eq!(Tta::Crops.crops_short_side(&p), 36); // floor(32 / 0.875)
    let image = DynamicImage::ImageRgb8(pattern(50, 40, 2));
    let crops = tta_tensor(&image, &p, Tta::Crops, &Device::Cpu).unwrap();
    assert_eq!(crops.dims(), &[10, 3, SIZE, SIZE]);
    let views: Vec<Vec<f32>> = (0..5).map(|i| to_vec(&crops.get(i).unwrap())).collect();
    for i in 0..5 {
        for j in i + 1..5 {
            assert_ne!(views[i], views[j], "views {i} and {j} are the same crop");
        }
    }
}

#[test]
fn a_tta_loader_puts_the_views_of_each_sample_next_to_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    for (c, name) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(tmp.path().join(name)).unwrap();
        for i in 0..2 {
            let img = pattern(40 + i * 5, 36, c as u32 * 2 + i);
            img.save(tmp.path().join(name).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let ds = ImageFolder::open(tmp.path(), 0.0, 0).unwrap();
    let p = preprocess(0.875);
    for tta in [Tta::Flip, Tta::Crops] {
        let config = LoaderConfig {
            tta,
            ..LoaderConfig::eval(3)
        };
        let loader = Loader::new(ds.train.clone(), 2, p.clone(), config, &Device::Cpu).unwrap();
        for batch in loader.epoch(0) {
            let batch = batch.unwrap();
            let n = batch.indices.len();
            assert_eq!(batch.images.dims(), &[n * tta.views(), 3, SIZE, SIZE]);
            assert_eq!(batch.labels.dims(), &[n]);
            for (k, &i) in batch.indices.iter().enumerate() {
                let want = load_tta_tensor(&ds.train[i].path, &p, tta, &Device::Cpu).unwrap();
                let got = batch
                    .images
                    .narrow(0, k * tta.views(), tta.views())
                    .unwrap();
                assert_eq!(to_vec(&got), to_vec(&want), "{tta:?}, sample {i}");
            }
        }
    }
}

#[test]
fn tta_with_training_augmentation_is_refused_naming_the_setting() {
    let config = LoaderConfig {
        tta: Tta::Flip,
        ..LoaderConfig::train(2, 0)
    };
    let err = Loader::new(Vec::new(), 2, preprocess(0.875), config, &Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("tta"), "{err}");
}

#[test]
fn mean_probs_of_one_view_are_the_softmax_and_of_several_their_mean() {
    let logits = Tensor::new(
        &[[1f32, 2., 3.], [0., 0., 1.], [3., 1., 0.], [2., 2., 2.]],
        &Device::Cpu,
    )
    .unwrap();
    let softmax = candle_nn::ops::softmax(&logits, D::Minus1).unwrap();
    assert_eq!(
        to_vec(&Tta::None.mean_probs(&logits).unwrap()),
        to_vec(&softmax)
    );
    let two = Tta::Flip.mean_probs(&logits).unwrap();
    let s = softmax.to_vec2::<f32>().unwrap();
    let want: Vec<f32> = (0..2)
        .flat_map(|n| (0..3).map(move |k| (n, k)))
        .map(|(n, k)| (s[2 * n][k] + s[2 * n + 1][k]) / 2.0)
        .collect();
    assert_close(&to_vec(&two), &want, 1e-7, "mean of two views");
    // The scores evaluation reads: logits untouched without TTA, log-probabilities with it.
    assert_eq!(to_vec(&Tta::None.scores(&logits).unwrap()), to_vec(&logits));
    let scores = Tta::Flip.scores(&logits).unwrap();
    let back = to_vec(&scores.exp().unwrap());
    assert_close(&back, &want, 1e-6, "exp of the scores");
    for (tta, name) in [
        (Tta::None, "none"),
        (Tta::Flip, "flip"),
        (Tta::Crops, "crops"),
    ] {
        assert_eq!(serde_json::to_value(tta).unwrap(), name);
        assert_eq!(tta.name(), name);
    }
}

#[test]
fn predict_and_eval_average_the_views_as_the_library_computes_them_one_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model_path = tmp.path().join("model.safetensors");
    write_export(&model_path);
    let data = tmp.path().join("data");
    let mut images = Vec::new();
    for (c, name) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(data.join(name)).unwrap();
        let path = data.join(name).join("0.png");
        pattern(44 + 3 * c as u32, 37, 7 + c as u32)
            .save(&path)
            .unwrap();
        images.push(path);
    }
    let symmetric = tmp.path().join("symmetric.png");
    RgbImage::from_fn(40, 40, |x, y| {
        let m = x.min(39 - x);
        Rgb([(m * 12) as u8, (y * 6) as u8, ((m * y) % 256) as u8])
    })
    .save(&symmetric)
    .unwrap();
    let model = load_model(&model_path, &Device::Cpu).unwrap();
    let p = model.spec.preprocess.clone();

    // `none` (and no flag) is the softmax of the single evaluation view, bit for bit.
    let none = predict_probs(&model_path, &images, Some("none"));
    assert_eq!(predict_probs(&model_path, &images, None), none);
    for (path, got) in images.iter().zip(&none) {
        let x = load_eval_tensor(path, &p, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.predict(&x).unwrap();
        let want = candle_nn::ops::softmax(&logits, D::Minus1).unwrap();
        assert_eq!(got, &to_vec(&want), "{}", path.display());
    }

    // Each view through the model on its own, softmax, mean: what `flip` and `crops` print.
    for (tta, name) in [(Tta::Flip, "flip"), (Tta::Crops, "crops")] {
        let got = predict_probs(&model_path, &images, Some(name));
        for ((path, got), plain) in images.iter().zip(&got).zip(&none) {
            let views = load_tta_tensor(path, &p, tta, &Device::Cpu).unwrap();
            let mut mean = vec![0f32; 3];
            for v in 0..tta.views() {
                let logits = model.predict(&views.narrow(0, v, 1).unwrap()).unwrap();
                let probs = to_vec(&candle_nn::ops::softmax(&logits, D::Minus1).unwrap());
                mean.iter_mut()
                    .zip(probs)
                    .for_each(|(m, q)| *m += q / tta.views() as f32);
            }
            assert_close(got, &mean, 1e-5, &format!("{name} of {}", path.display()));
            assert_ne!(got, plain, "{name} changed nothing");
        }
        // eval reads the same averaged probabilities: its loss is their mean NLL of the true class.
        let eval = eval_json(&model_path, &data, &["--tta", name, "--batch-size", "1"]);
        assert_eq!(eval["tta"], name);
        let nll = -(got[0][0].ln() + got[1][1].ln()) as f64 / 2.0;
        let loss = eval["loss"].as_f64().unwrap();
        assert!(
            (loss - nll).abs() < 1e-4,
            "{name}: eval loss {loss}, predict NLL {nll}"
        );
        let argmax = |q: &[f32]| (0..3).max_by(|&i, &j| q[i].total_cmp(&q[j])).unwrap();
        let correct = (argmax(&got[0]) == 0) as u8 + (argmax(&got[1]) == 1) as u8;
        assert_eq!(
            eval["accuracy"].as_f64().unwrap(),
            correct as f64 / 2.0,
            "{name}"
        );
    }

    // `--tta none` is what eval printed before TTA existed: the same numbers as no flag.
    let plain = eval_json(&model_path, &data, &[]);
    assert_eq!(eval_json(&model_path, &data, &["--tta", "none"]), plain);
    assert_eq!(plain["tta"], "none");
    let nll = -(none[0][0].ln() + none[1][1].ln()) as f64 / 2.0;
    assert!(
        (plain["loss"].as_f64().unwrap() - nll).abs() < 1e-4,
        "{plain}"
    );

    // A horizontally symmetric image is its own mirror: `flip` changes nothing.
    let sym = [symmetric];
    let flip = predict_probs(&model_path, &sym, Some("flip"));
    assert_close(
        &flip[0],
        &predict_probs(&model_path, &sym, Some("none"))[0],
        1e-6,
        "symmetric",
    );
}

#[test]
fn an_unknown_tta_mode_is_refused_with_the_modes_there_are() {
    let eval = [
        "eval",
        "--model",
        "m.safetensors",
        "--data",
        "d",
        "--tta",
        "mirror",
    ];
    let predict = [
        "predict",
        "--model",
        "m.safetensors",
        "--tta",
        "mirror",
        "x.png",
    ];
    for args in [&eval[..], &predict[..]] {
        let command = args[0];
        let err = common::graft_err(args, &[]);
        assert!(
            err.contains("--tta") && err.contains("mirror"),
            "{command}: {err}"
        );
        assert!(
            err.contains("none") && err.contains("flip") && err.contains("crops"),
            "{err}"
        );
    }
}
