//! Parity with timm for the timm-layout architectures: every case in tests/fixtures/timm (made by
//! scripts/timm-golden.py with timm 1.0.31 / torch 2.15: reduced depths and widths, random weights) is run in
//! eval mode (each layer group, the features, the logits) and in train mode (logits, the cross-entropy loss
//! and the gradient of every parameter), each checked against timm's float64 run within the case's
//! tolerance, which the script set from timm's own float32 error. The full-size architectures must have
//! exactly timm's keys and shapes, and a file in timm's layout loads strictly.
//!
//! `GRAFT_TEST_DEVICE` chooses the device, as in tests/resnet_golden.rs.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::TestDevice;
use graft::formats::weights;
use graft::models::convnext::{ConvNext, ConvNextConfig};
use graft::models::layers::linear;
use graft::models::{Backbone, Mode};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/timm"))
}

/// ||ours - reference|| / ||reference||, in f64.
fn rel_l2(ours: &Tensor, reference: &Tensor) -> f64 {
    let a = ours
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = reference.to_dtype(DType::F64).unwrap();
    assert_eq!(a.dims(), b.dims(), "shape");
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    let (num, den) = (
        num.to_scalar::<f64>().unwrap(),
        den.to_scalar::<f64>().unwrap(),
    );
    (num / den.max(1e-300)).sqrt()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
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
            json["tolerance_max_rel_l2"][what]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: no tolerance for {what}")),
        )
    };
    let cfg = ConvNextConfig {
        arch: format!("convnext_{name}"),
        depths: usizes(&json["arch_kwargs"]["depths"]),
        dims: usizes(&json["arch_kwargs"]["dims"]),
        conv_mlp: json["conv_mlp"].as_bool().unwrap(),
        drop_path: 0.0,
    };
    let classes = json["num_classes"].as_u64().unwrap() as usize;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev.device);
    let net = ConvNext::new(cfg, vb.clone()).unwrap();
    let fc = linear(net.feature_dim(), classes, vb.pp("head.fc")).unwrap();
    {
        // Strict: every variable has a reference weight and every reference weight a variable.
        let data = varmap.data().lock().unwrap();
        let weights: BTreeMap<&str, &Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("weights.").map(|k| (k, v)))
            .collect();
        let ours: Vec<&str> = data.keys().map(String::as_str).collect();
        let mut ours_sorted = ours.clone();
        ours_sorted.sort();
        assert_eq!(
            ours_sorted,
            weights.keys().copied().collect::<Vec<_>>(),
            "{name}: keys"
        );
        for (k, var) in data.iter() {
            var.set(&dev.put(weights[k.as_str()])).unwrap();
        }
    }
    let x = dev.put(&tensors["input"]);
    let mut report = Vec::new();
    let mut check = |what: &str, ours: &Tensor| {
        let r = rel_l2(ours, &tensors[&format!("f64.{what}")]);
        let t = tol(what);
        report.push(format!("{what} {r:.2e} (tol {t:.2e})"));
        assert!(r <= t, "{name} {what}: rel L2 {r:.3e} > {t:.3e}");
    };
    dev.run(|| {
        // Eval: group by group.
        let groups = ["stem", "stage1", "stage2", "stage3", "stage4", "features"];
        let mut h = x.clone();
        for (i, g) in groups.iter().enumerate() {
            h = net.forward_group(i, &h, Mode::Eval).unwrap();
            check(g, &h);
        }
        check("logits", &fc.forward(&h, Mode::Eval).unwrap());
        // Train: logits, loss, every gradient.
        let features = net.forward_features(&x, Mode::Train, 0).unwrap();
        let logits = fc.forward(&features, Mode::Train).unwrap();
        check("train_logits", &logits);
        let targets = dev.put(&tensors["targets"].to_dtype(DType::U32).unwrap());
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        check("loss", &loss.reshape(1).unwrap());
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        for (k, var) in data.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
            check(&format!("grad.{k}"), g);
        }
    });
    println!("{name} on {}: {}", dev.name, report.join(", "));
}

#[test]
fn convnext_matches_timm_in_eval_and_train() {
    let dev = TestDevice::from_env();
    check_case("convnext_reduced", &dev);
}

#[test]
fn convnext_with_conv_mlp_matches_timm_in_eval_and_train() {
    let dev = TestDevice::from_env();
    check_case("convnext_reduced_convmlp", &dev);
}

fn full_size_keys() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("keys.json")).unwrap()).unwrap()
}

/// The variables of graft's `arch` with a 1000-way `head.fc`, as key -> shape.
fn graft_keys(arch: &str) -> (VarMap, BTreeMap<String, Vec<usize>>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = ConvNext::new(ConvNextConfig::from_arch(arch).unwrap(), vb.clone()).unwrap();
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
fn full_size_convnexts_have_timms_keys_and_shapes() {
    let json = full_size_keys();
    let models = json["models"].as_object().unwrap();
    assert_eq!(models.len(), 6);
    for (arch, keys) in models {
        let want: BTreeMap<String, Vec<usize>> = keys
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), usizes(v)))
            .collect();
        let (_, ours) = graft_keys(arch);
        assert_eq!(ours, want, "{arch}");
    }
}

#[test]
fn a_timm_layout_convnext_file_loads_strictly() {
    let json = full_size_keys();
    let keys = json["models"]["convnext_atto"].as_object().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let tensors: HashMap<String, Tensor> = keys
        .iter()
        .map(|(k, v)| {
            let shape = usizes(v);
            let t = Tensor::full(0.01f32, shape, &Device::Cpu).unwrap();
            (k.clone(), t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let (varmap, _) = graft_keys("convnext_atto");
    let file = weights::read_weights(&path, &Device::Cpu).unwrap();
    weights::load_into(&varmap, &file, None, None).unwrap();
    let data = varmap.data().lock().unwrap();
    let v = data["stages.2.blocks.5.mlp.fc2.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(v.iter().all(|&x| x == 0.01));
    drop(data);
    // One tensor missing: an error that names it.
    let mut short = tensors.clone();
    short.remove("head.norm.bias");
    candle_core::safetensors::save(&short, &path).unwrap();
    let file = weights::read_weights(&path, &Device::Cpu).unwrap();
    let err = weights::load_into(&varmap, &file, None, None).unwrap_err();
    assert!(err.to_string().contains("head.norm.bias"), "{err}");
}

#[test]
fn convnext_finetunes_exports_and_predicts_end_to_end() {
    // Random init (the hub is not reachable here): the architecture through the real CLI, frozen phase on
    // cached features, an unfrozen epoch, export, predict.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::make_folder(&data, &["red", "green"], 4);
    let run = dir.path().join("run");
    common::graft_ok(&[
        "finetune",
        "--base",
        "convnext_atto",
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
    ]);
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
        "{pred}"
    );
}
