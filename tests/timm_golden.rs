//! Parity with timm for the timm-layout architectures: every case in tests/fixtures/timm (each `CASE.json`
//! beside its `CASE.safetensors`, made by scripts/timm-golden.py with timm 1.0.31 / torch 2.15: ConvNeXt,
//! EfficientNet, MobileNetV3 and the Vision Transformer (also at an input size whose position embeddings
//! are resampled) with reduced depths and widths, random weights and BatchNorm statistics) is
//! run in eval mode (each layer group, the features, the logits) and in train mode (logits, the cross-entropy
//! loss, the gradient of every parameter and the BatchNorm statistics after the forward), each checked
//! against timm's float64 run within the case's bound, which the script set from timm's own float32 error.
//! A case dropped into the folder is checked without code changes. The full-size architectures must have
//! exactly timm's keys and shapes, and a file in timm's layout loads strictly.
//!
//! `GRAFT_TEST_DEVICE` chooses the device, as in tests/resnet_golden.rs.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::TestDevice;
use graft::formats::weights;
use graft::models::convnext::{ConvNext, ConvNextConfig};
use graft::models::effnet::{EffNet, EffNetConfig};
use graft::models::layers::linear;
use graft::models::vit::{Vit, VitConfig};
use graft::models::{build_backbone, Backbone, Mode};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/timm"))
}

/// Every case in the fixtures folder, by name.
fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".json")?;
            (stem != "keys").then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

/// ||ours - reference||_2, in f64.
fn l2_err(ours: &Tensor, reference: &Tensor) -> f64 {
    let a = ours
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = reference.to_dtype(DType::F64).unwrap();
    assert_eq!(a.dims(), b.dims(), "shape");
    (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The backbone a case describes (`graft` in CASE.json).
fn backbone(name: &str, g: &Value, vb: VarBuilder) -> Box<dyn Backbone> {
    let arch = g["model_name"].as_str().unwrap();
    let width = || g["width"].as_f64().unwrap();
    match g["family"].as_str().unwrap() {
        "convnext" => {
            let cfg = ConvNextConfig {
                arch: arch.to_string(),
                depths: usizes(&g["depths"]),
                dims: usizes(&g["dims"]),
                conv_mlp: g["conv_mlp"].as_bool().unwrap(),
                drop_path: 0.0,
            };
            Box::new(ConvNext::new(cfg, vb).unwrap())
        }
        "efficientnet" => {
            let cfg =
                EffNetConfig::efficientnet(arch, width(), g["depth"].as_f64().unwrap()).unwrap();
            Box::new(EffNet::new(cfg, vb).unwrap())
        }
        "mobilenetv3" => {
            let mut cfg =
                EffNetConfig::mobilenet_v3(arch, g["large"].as_bool().unwrap(), width()).unwrap();
            cfg.head_channels = g["head_channels"].as_u64().unwrap() as usize;
            Box::new(EffNet::new(cfg, vb).unwrap())
        }
        "vit" => {
            let size = |k: &str| g[k].as_u64().unwrap() as usize;
            let cfg = VitConfig {
                arch: arch.to_string(),
                patch: size("patch"),
                embed_dim: size("embed_dim"),
                depth: size("depth"),
                heads: size("heads"),
                mlp_ratio: g["mlp_ratio"].as_f64().unwrap(),
                img_size: size("img_size"),
                block_groups: size("block_groups"),
                drop_path: 0.0,
            };
            Box::new(Vit::new(cfg, vb).unwrap())
        }
        f => panic!("{name}: unknown family {f}"),
    }
}

fn check_case(name: &str, dev: &TestDevice) {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let tol = |what: &str| -> f64 {
        dev.tolerance(
            json["tolerance_l2"][what]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: no tolerance for {what}")),
        )
    };
    let classes = json["num_classes"].as_u64().unwrap() as usize;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev.device);
    let net = backbone(name, &json["graft"], vb.clone());
    let fc = linear(net.feature_dim(), classes, vb.pp(net.classifier_prefix())).unwrap();
    {
        // Strict: every variable has a reference weight and every reference weight a variable.
        let data = varmap.data().lock().unwrap();
        let weights: BTreeMap<&str, &Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("weights.").map(|k| (k, v)))
            .collect();
        let mut ours: Vec<&str> = data.keys().map(String::as_str).collect();
        ours.sort();
        assert_eq!(
            ours,
            weights.keys().copied().collect::<Vec<_>>(),
            "{name}: keys"
        );
        for (k, var) in data.iter() {
            var.set(&dev.put(weights[k.as_str()])).unwrap();
        }
    }
    let groups: Vec<String> = json["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    assert_eq!(groups.len(), net.group_names().len(), "{name}: groups");
    let x = dev.put(&tensors["input"]);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let mut check = |what: &str, ours: &Tensor| {
        let reference = &tensors[&format!("f64.{what}")];
        let e = l2_err(ours, reference);
        let t = tol(what);
        let norm = json["norm_l2"][what].as_f64().unwrap();
        report.push(format!("{what} {:.2e}", e / norm.max(1e-300)));
        if e > t {
            failures.push(format!(
                "{what}: L2 error {e:.3e} > {t:.3e} (reference norm {norm:.3e})"
            ));
        }
    };
    dev.run(|| {
        // Eval: group by group.
        let mut h = x.clone();
        for (i, g) in groups.iter().enumerate() {
            h = net.forward_group(i, &h, Mode::Eval).unwrap();
            check(g, &h);
        }
        let features = net.pool(&h).unwrap();
        check("features", &features);
        check("logits", &fc.forward(&features, Mode::Eval).unwrap());
        // Frozen (no gradient anywhere: the inference kernels, BatchNorm and activation fused into each
        // convolution's epilogue) computes the same features.
        let frozen = net
            .forward_features(&x, Mode::Frozen, groups.len())
            .unwrap();
        check("features", &frozen);
        // Train: logits, loss, every gradient, the BatchNorm statistics the forward moved.
        let features = net.forward_features(&x, Mode::Train, 0).unwrap();
        let logits = fc.forward(&features, Mode::Train).unwrap();
        check("train_logits", &logits);
        let targets = dev.put(&tensors["targets"].to_dtype(DType::U32).unwrap());
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        check("loss", &loss.reshape(1).unwrap());
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut stats = 0;
        for (k, var) in data.iter() {
            if k.ends_with("running_mean") || k.ends_with("running_var") {
                check(&format!("after_train.{k}"), var.as_tensor());
                stats += 1;
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
            check(&format!("grad.{k}"), g);
        }
        let want = tensors
            .keys()
            .filter(|k| k.starts_with("f64.after_train."))
            .count();
        assert_eq!(stats, want, "{name}: BatchNorm statistics checked");
    });
    println!(
        "{name} on {} (relative L2 errors): {}",
        dev.name,
        report.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{name} out of tolerance:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_timm_case_matches_timm_in_eval_and_train() {
    let dev = TestDevice::from_env();
    let names = cases();
    for family in ["convnext", "efficientnet", "mobilenetv3", "vit"] {
        assert!(
            names.iter().any(|n| n.starts_with(family)),
            "no {family} case in {names:?}"
        );
    }
    for name in &names {
        check_case(name, &dev);
    }
}

fn full_size_keys() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("keys.json")).unwrap()).unwrap()
}

/// The variables of graft's `arch` with a 1000-way `head.fc`, as key -> shape.
fn graft_keys(arch: &str) -> (VarMap, BTreeMap<String, Vec<usize>>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = build_backbone(arch, vb.clone()).unwrap();
    linear(net.feature_dim(), 1000, vb.pp(net.classifier_prefix())).unwrap();
    let keys = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    (varmap, keys)
}

#[test]
fn full_size_architectures_have_timms_keys_and_shapes() {
    let json = full_size_keys();
    let models = json["models"].as_object().unwrap();
    assert_eq!(models.len(), 14);
    for (arch, keys) in models {
        // BatchNorm's step counter is not a weight: graft ignores it on load.
        let want: BTreeMap<String, Vec<usize>> = keys
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .map(|(k, v)| (k.clone(), usizes(v)))
            .collect();
        let (_, ours) = graft_keys(arch);
        assert_eq!(ours, want, "{arch}");
    }
}

/// A file in timm's layout for `arch` (every tensor 0.01, `num_batches_tracked` as timm saves it, int64)
/// loads strictly; without `missing` it fails with an error that names it.
fn loads_strictly(arch: &str, probe: &str, missing: &str) {
    let json = full_size_keys();
    let keys = json["models"][arch].as_object().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let tensors: HashMap<String, Tensor> = keys
        .iter()
        .map(|(k, v)| {
            let shape = usizes(v);
            let t = if k.ends_with("num_batches_tracked") {
                Tensor::zeros(shape, DType::I64, &Device::Cpu).unwrap()
            } else {
                Tensor::full(0.01f32, shape, &Device::Cpu).unwrap()
            };
            (k.clone(), t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let (varmap, _) = graft_keys(arch);
    let file = weights::read_weights(&path, &Device::Cpu).unwrap();
    weights::load_into(&varmap, &file, None, None).unwrap();
    let data = varmap.data().lock().unwrap();
    let v = data[probe]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(v.iter().all(|&x| x == 0.01), "{arch}: {probe}");
    drop(data);
    let mut short = tensors.clone();
    assert!(short.remove(missing).is_some(), "{arch}: {missing}");
    candle_core::safetensors::save(&short, &path).unwrap();
    let file = weights::read_weights(&path, &Device::Cpu).unwrap();
    let err = weights::load_into(&varmap, &file, None, None).unwrap_err();
    assert!(err.to_string().contains(missing), "{arch}: {err}");
}

#[test]
fn timm_layout_files_load_strictly() {
    loads_strictly(
        "convnext_atto",
        "stages.2.blocks.5.mlp.fc2.weight",
        "head.norm.bias",
    );
    loads_strictly(
        "efficientnet_b0",
        "blocks.5.3.se.conv_expand.weight",
        "blocks.6.0.bn3.running_var",
    );
    loads_strictly(
        "vit_small_patch16_224",
        "blocks.11.attn.qkv.weight",
        "pos_embed",
    );
    loads_strictly(
        "mobilenetv3_large_100",
        "blocks.5.2.conv_pwl.weight",
        "conv_head.bias",
    );
}

#[test]
fn convnext_finetunes_exports_and_predicts_end_to_end() {
    finetune_export_predict("convnext_atto");
}

/// The full ViT-S/16 at 32 pixels: a 2x2 patch grid, its position embeddings resampled from 14x14; the
/// unfrozen epoch with timm-style layer decay (one optimizer group per block).
#[test]
fn vit_finetunes_exports_and_predicts_end_to_end() {
    finetune_export_predict_with("vit_small_patch16_224", &["--layer-decay", "0.75"]);
}

#[test]
fn efficientnet_finetunes_exports_and_predicts_end_to_end() {
    finetune_export_predict("efficientnet_b0");
}

#[test]
fn mobilenetv3_finetunes_exports_and_predicts_end_to_end() {
    finetune_export_predict("mobilenetv3_small_100");
}

/// Random init (the hub is not reachable here): the architecture through the real CLI, frozen phase on
/// cached features, an unfrozen epoch, export, predict.
fn finetune_export_predict(base: &str) {
    finetune_export_predict_with(base, &[]);
}

/// [`finetune_export_predict`] with `extra` finetune flags.
fn finetune_export_predict_with(base: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::make_folder(&data, &["red", "green"], 4);
    let run = dir.path().join("run");
    let mut args = vec![
        "finetune",
        "--base",
        base,
        "--random-init",
        "--data",
        data.to_str().unwrap(),
        "--image-size",
        "32",
        "--crop-pct",
        "1",
        "--freeze-epochs",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--run-dir",
        run.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    common::graft_ok(&args);
    let model = dir.path().join("model.safetensors");
    common::graft_ok(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    let image = data.join("red").join("000.png");
    let out = common::graft_ok(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--format",
        "json",
        image.to_str().unwrap(),
    ]);
    let pred: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(
        pred["top"][0]["prob"].as_f64().unwrap().is_finite(),
        "{base}: {pred}"
    );
}

/// `--drop-path`: the masks are seeded (two runs from the same weights agree, and a run stopped after
/// one epoch and resumed ends where the uninterrupted one does), they act (a run without them trains
/// otherwise), and an architecture without stochastic depth refuses the flag by name.
#[test]
fn drop_path_is_seeded_resumes_exactly_and_is_refused_where_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::make_folder(&data, &["red", "green"], 4);
    // One random initialisation for every run (`--random-init` draws unseeded).
    let file = dir.path().join("atto.safetensors");
    let varmap = VarMap::new();
    build_backbone(
        "convnext_atto",
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    varmap.save(&file).unwrap();
    let run_with = |name: &str, extra: &[&str]| {
        let run = dir.path().join(name);
        let mut args = vec![
            "finetune",
            "--base",
            "convnext_atto",
            "--weights",
            file.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--image-size",
            "32",
            "--crop-pct",
            "1",
            "--freeze-epochs",
            "0",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--run-dir",
            run.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        common::graft_ok(&args);
        run
    };
    let a = run_with("a", &["--drop-path", "0.5"]);
    let b = run_with("b", &["--drop-path", "0.5"]);
    let off = run_with("off", &[]);
    let split = run_with("split", &["--drop-path", "0.5", "--stop-after", "1"]);
    common::graft_ok(&["finetune", "--resume", split.to_str().unwrap(), "--quiet"]);
    let m = common::metrics_without_timing;
    assert_eq!(m(&a), m(&b));
    assert_eq!(m(&a), m(&split));
    assert_ne!(m(&a)[0]["train_loss"], m(&off)[0]["train_loss"]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["drop_path"], 0.5);
    let err = common::graft_err(
        &[
            "finetune",
            "--base",
            "resnet18",
            "--random-init",
            "--data",
            data.to_str().unwrap(),
            "--drop-path",
            "0.1",
            "--run-dir",
            dir.path().join("r").to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains("--drop-path") && err.contains("resnet18"),
        "{err}"
    );
}
