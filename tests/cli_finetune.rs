//! End to end through the real binary: finetune on a small generated folder, stop early, resume after an
//! interruption to the same result, export, and predict from the export with the same answers as eval.

mod common;

use candle_core::Device;
use common::{graft_ok, make_folder, model_tensors, resnet18_weights};
use std::path::Path;

/// The flags of one small, fast run: ResNet-18 (golden weights) at 32x32, one frozen epoch then up to
/// four unfrozen ones; `--min-delta 100` means no epoch after the first counts as an improvement, so
/// `--patience 2` stops the run after epoch 3 for certain.
fn run_flags<'a>(data: &'a str, weights: &'a str, run: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--base",
        "resnet18",
        "--weights",
        weights,
        "--data",
        data,
        "--image-size",
        "32",
        "--crop-pct",
        "1",
        "--batch-size",
        "4",
        "--freeze-epochs",
        "1",
        "--epochs",
        "4",
        "--lr",
        "1e-3",
        "--patience",
        "2",
        "--min-delta",
        "100",
        "--seed",
        "7",
        "--quiet",
        "--run-dir",
        run,
    ]
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn finetune_stops_early_resumes_identically_exports_and_predicts_like_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "green", "red"], 8);
    let weights = resnet18_weights();
    let (d, w) = (data.to_str().unwrap(), weights.to_str().unwrap());

    // Uninterrupted run.
    let full = tmp.path().join("full");
    graft_ok(&run_flags(d, w, full.to_str().unwrap()));
    let m_full = metrics(&full);
    assert_eq!(
        m_full.len(),
        3,
        "patience 2 after a best first epoch stops after epoch 3: {m_full:?}"
    );
    for f in [
        "config.json",
        "metrics.jsonl",
        "best.safetensors",
        "last.safetensors",
        "curves.png",
        "confusion.png",
    ] {
        assert!(full.join(f).is_file(), "{f} missing from the run folder");
    }
    for key in [
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "images_per_s",
    ] {
        assert!(m_full[0].get(key).is_some(), "metrics.jsonl lacks {key}");
    }

    // Interrupted after two epochs, then resumed.
    let split = tmp.path().join("split");
    let mut first = run_flags(d, w, split.to_str().unwrap());
    first.extend(["--stop-after", "2"]);
    graft_ok(&first);
    assert_eq!(metrics(&split).len(), 2);
    graft_ok(&["finetune", "--resume", split.to_str().unwrap(), "--quiet"]);
    let m_split = metrics(&split);
    assert_eq!(m_split.len(), m_full.len());
    for (a, b) in m_full.iter().zip(&m_split) {
        for key in ["train_loss", "train_acc", "val_loss", "val_acc", "lr"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{key}: {x} vs {y}"
            );
        }
    }
    for file in ["last.safetensors", "best.safetensors"] {
        let (a, b) = (
            model_tensors(&full.join(file)),
            model_tensors(&split.join(file)),
        );
        assert_eq!(a.len(), b.len());
        for (k, va) in &a {
            let vb = &b[k];
            let diff = va
                .iter()
                .zip(vb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-5, "{file} {k}: resumed run differs by {diff}");
        }
    }

    // Export, then predict and eval from the export alone.
    let export = tmp.path().join("model.safetensors");
    graft_ok(&[
        "export",
        split.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    let eval: serde_json::Value = serde_json::from_str(&graft_ok(&[
        "eval",
        "--model",
        export.to_str().unwrap(),
        "--data",
        d,
        "--json",
    ]))
    .unwrap();
    let mut images = Vec::new();
    for class in ["blue", "green", "red"] {
        for e in std::fs::read_dir(data.join(class)).unwrap() {
            images.push(e.unwrap().path());
        }
    }
    let mut args = vec![
        "predict".to_string(),
        "--model".into(),
        export.display().to_string(),
    ];
    args.extend([
        "--format".into(),
        "json".into(),
        "--top-k".into(),
        "1".into(),
    ]);
    args.extend(images.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = graft_ok(&args);
    let mut correct = 0;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), images.len());
    for line in lines {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        let path = p["path"].as_str().unwrap();
        let class = Path::new(path)
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        if p["top"][0]["class"].as_str().unwrap() == class {
            correct += 1;
        }
    }
    let predict_acc = correct as f64 / images.len() as f64;
    let eval_acc = eval["accuracy"].as_f64().unwrap();
    assert!(
        (predict_acc - eval_acc).abs() < 1e-9,
        "predict {predict_acc} vs eval {eval_acc}"
    );
    assert_eq!(eval["images"].as_u64().unwrap() as usize, images.len());

    // A BatchNorm-folded export holds no BatchNorm tensors and evaluates to the same loss and accuracy.
    let folded = tmp.path().join("folded.safetensors");
    graft_ok(&[
        "export",
        full.to_str().unwrap(),
        "--out",
        folded.to_str().unwrap(),
        "--fold-bn",
    ]);
    let keys = candle_core::safetensors::load(&folded, &Device::Cpu).unwrap();
    assert!(!keys.keys().any(|k| k.contains("running_")));
    assert!(keys.contains_key("conv1.bias"));
    let eval_folded: serde_json::Value = serde_json::from_str(&graft_ok(&[
        "eval",
        "--model",
        folded.to_str().unwrap(),
        "--data",
        d,
        "--json",
    ]))
    .unwrap();
    assert_eq!(eval_folded["accuracy"], eval["accuracy"]);
    let (a, b) = (
        eval_folded["loss"].as_f64().unwrap(),
        eval["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * (1.0 + b), "loss {a} folded vs {b}");
}

#[test]
fn a_linear_probe_trains_the_head_on_cached_features_and_leaves_the_backbone_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "red"], 6);
    let weights = resnet18_weights();
    let run = tmp.path().join("probe");
    graft_ok(&[
        "finetune",
        "--base",
        "resnet18",
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--freeze-epochs",
        "3",
        "--epochs",
        "0",
        "--lr",
        "1e-2",
        "--schedule",
        "constant",
        "--optimizer",
        "adam",
        "--quiet",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    let after = model_tensors(&run.join("last.safetensors"));
    let before = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let mut compared = 0;
    for (k, v) in &after {
        let key = k.strip_prefix("model.").unwrap();
        if key.starts_with("head.") {
            continue;
        }
        let orig = before[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&orig, v, "{key} changed although the backbone was frozen");
        compared += 1;
    }
    assert!(compared >= 100, "compared only {compared} backbone tensors");
    let m = metrics(&run);
    assert_eq!(m.len(), 3);
    assert!(m[2]["train_loss"].as_f64().unwrap() < m[0]["train_loss"].as_f64().unwrap());
}

#[test]
fn train_bn_trains_batchnorm_affine_parameters_of_frozen_groups_and_nothing_else_there() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "red"], 6);
    let weights = resnet18_weights();
    let run = tmp.path().join("probe");
    graft_ok(&[
        "finetune",
        "--base",
        "resnet18",
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--freeze-epochs",
        "2",
        "--epochs",
        "0",
        "--lr",
        "1e-2",
        "--train-bn",
        "--quiet",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    let after = model_tensors(&run.join("last.safetensors"));
    let before = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let (mut bn_moved, mut checked) = (0, 0);
    for (k, v) in &after {
        let key = k.strip_prefix("model.").unwrap();
        if key.starts_with("head.") {
            continue;
        }
        let orig = before[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let is_bn_affine = before[key].rank() == 1 && !key.contains("running_");
        if is_bn_affine {
            bn_moved += usize::from(&orig != v);
        } else {
            assert_eq!(
                &orig, v,
                "{key} changed: only BatchNorm scales and shifts may train"
            );
            checked += 1;
        }
    }
    assert!(checked > 50, "checked {checked}");
    assert!(
        bn_moved > 10,
        "only {bn_moved} BatchNorm affine tensors moved"
    );
}

#[test]
fn cached_activations_of_a_frozen_prefix_train_exactly_like_the_whole_network() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "red"], 6);
    let weights = resnet18_weights();
    let run = |name: &str, cache_mb: &str| {
        let dir = tmp.path().join(name);
        let store = tmp.path().join("store");
        let mut args = vec![
            "finetune",
            "--base",
            "resnet18",
            "--weights",
            weights.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--freeze-epochs",
            "0",
            "--epochs",
            "2",
            "--freeze",
            "stem,layer1,layer2",
            "--cache-mb",
            cache_mb,
            "--seed",
            "3",
            "--quiet",
            "--run-dir",
            dir.to_str().unwrap(),
        ];
        if name.starts_with("stored") {
            args.extend(["--feature-store", store.to_str().unwrap()]);
        }
        (dir.clone(), graft_ok(&args))
    };
    let (cached, log) = run("cached", "64");
    assert!(
        log.contains("activations after layer2 computed once"),
        "the cache was not used:\n{log}"
    );
    let (plain, log) = run("plain", "0");
    assert!(
        !log.contains("computed once"),
        "--cache-mb 0 cached:\n{log}"
    );

    let (a, b) = (metrics(&cached), metrics(&plain));
    for (ma, mb) in a.iter().zip(&b) {
        for key in ["train_loss", "val_loss", "val_acc"] {
            let (x, y) = (ma[key].as_f64().unwrap(), mb[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{key}: {x} vs {y}");
        }
    }
    let (ta, tb) = (
        model_tensors(&cached.join("last.safetensors")),
        model_tensors(&plain.join("last.safetensors")),
    );
    let mut moved = 0;
    let before = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    for (k, va) in &ta {
        let vb = &tb[k];
        let diff = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{k} differs by {diff}");
        let key = k.strip_prefix("model.").unwrap();
        if key.starts_with("layer3.") {
            let orig = before[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            moved += usize::from(&orig != va);
        }
        if key.starts_with("layer1.") || key.starts_with("conv1.") {
            let orig = before[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(&orig, va, "{key} is frozen but moved");
        }
    }
    assert!(moved > 5, "layer3 did not train ({moved} tensors moved)");

    // A feature store: the first run computes the prefix and keeps it, the second reads it; both end with
    // the cached run's metrics and weights exactly.
    let (first, log) = run("stored-1", "64");
    assert!(log.contains("layer2 computed once"), "{log}");
    let (second, log) = run("stored-2", "64");
    assert!(log.contains("layer2 read from the feature store"), "{log}");
    for dir in [&first, &second] {
        let strip =
            |v: Vec<serde_json::Value>| v.into_iter().map(without_timing).collect::<Vec<_>>();
        assert_eq!(strip(metrics(dir)), strip(metrics(&cached)));
        assert_eq!(
            model_tensors(&dir.join("last.safetensors")),
            model_tensors(&cached.join("last.safetensors"))
        );
    }
}

/// A metrics record without its wall-clock fields.
fn without_timing(mut m: serde_json::Value) -> serde_json::Value {
    let obj = m.as_object_mut().unwrap();
    obj.remove("seconds");
    obj.remove("images_per_s");
    m
}

#[test]
fn a_run_config_reproduces_the_run_and_flags_given_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "red"], 6);
    let run = tmp.path().join("run");
    // A dense encoder from seeded random init: the cheapest whole run, with non-default head and optimizer.
    graft_ok(&[
        "finetune",
        "--base",
        "dense:256,16",
        "--image-size",
        "16",
        "--data",
        data.to_str().unwrap(),
        "--freeze-epochs",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--hidden",
        "8",
        "--optimizer",
        "momentum",
        "--momentum",
        "0.8",
        "--seed",
        "5",
        "--quiet",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    let config = run.join("config.json");
    let again = tmp.path().join("again");
    graft_ok(&[
        "finetune",
        "--config",
        config.to_str().unwrap(),
        "--quiet",
        "--run-dir",
        again.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        std::fs::read_to_string(again.join("config.json")).unwrap()
    );
    let (a, b) = (metrics(&run), metrics(&again));
    assert_eq!(a.len(), 3);
    let strip = |m: Vec<serde_json::Value>| m.into_iter().map(without_timing).collect::<Vec<_>>();
    assert_eq!(strip(a.clone()), strip(b));
    for file in ["last.safetensors", "best.safetensors"] {
        assert_eq!(
            model_tensors(&run.join(file)),
            model_tensors(&again.join(file)),
            "{file}"
        );
    }

    // A flag given on the command line wins over the file.
    let shorter = tmp.path().join("shorter");
    graft_ok(&[
        "finetune",
        "--config",
        config.to_str().unwrap(),
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--quiet",
        "--run-dir",
        shorter.to_str().unwrap(),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shorter.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (cfg["epochs"].as_u64(), cfg["lr"].as_f64()),
        (Some(1), Some(1e-2))
    );
    assert_eq!(
        cfg["optimizer"]["momentum"].as_f64(),
        Some(0.8),
        "the rest is the file's"
    );
    assert_eq!(metrics(&shorter).len(), 2);
}

/// `--precision bf16` end to end: the run records its precision, a resume after an interruption continues
/// it in bf16 to the same metrics as an uninterrupted bf16 run, and its first epoch's loss differs from
/// f32's by bf16's rounding (not zero where the CPU has AVX512-BF16, and small).
#[test]
fn a_bf16_run_records_its_precision_and_resumes_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "green", "red"], 8);
    let weights = resnet18_weights();
    let (d, w) = (data.to_str().unwrap(), weights.to_str().unwrap());
    let f32_run = tmp.path().join("f32");
    graft_ok(&run_flags(d, w, f32_run.to_str().unwrap()));
    let full = tmp.path().join("full");
    let mut flags = run_flags(d, w, full.to_str().unwrap());
    flags.extend(["--precision", "bf16"]);
    graft_ok(&flags);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["precision"], "bf16");
    let split = tmp.path().join("split");
    let mut first = run_flags(d, w, split.to_str().unwrap());
    first.extend(["--precision", "bf16", "--stop-after", "2"]);
    graft_ok(&first);
    graft_ok(&["finetune", "--resume", split.to_str().unwrap(), "--quiet"]);
    let (m_full, m_split, m_f32) = (metrics(&full), metrics(&split), metrics(&f32_run));
    assert_eq!(m_full.len(), m_split.len());
    for (a, b) in m_full.iter().zip(&m_split) {
        assert_eq!(without_timing(a.clone()), without_timing(b.clone()));
    }
    // The first (frozen) epoch: the head trains on the backbone's bf16 features, so the runs have not
    // yet drifted apart the way whole trajectories of a tiny batch-4 run do (5% by the second epoch).
    let loss = |m: &[serde_json::Value]| m[0]["train_loss"].as_f64().unwrap();
    let gap = (loss(&m_full) - loss(&m_f32)).abs() / loss(&m_f32);
    assert!(gap < 0.02, "bf16 {} vs f32 {}", loss(&m_full), loss(&m_f32));
    if graft::kernels::precision::bf16_supported() {
        assert!(gap > 0.0, "bf16 gave f32's loss exactly");
    }
}
