//! EfficientNet-Lite0 with its real ImageNet weights against PyTorch.
//!
//! Expected values come from ../shared/golden/models/efficientnet_lite0/reference_io.safetensors, made
//! with torch 2.15 on CPU by shared/golden/reference/efficientnet_lite0.py from the same checkpoint
//! (see the golden README). The weights are not in the repository: scripts/fetch-weights.sh
//! downloads the original .pth and converts it with graft's own reader into graft's cache; these tests
//! fail (not skip) when it has not been run.
//!
//! `GRAFT_TEST_DEVICE` chooses the device (`cpu`, `cpu-generic`, `cuda`; see `common::TestDevice`); on a GPU
//! the bounds are widened by `common::GPU_TOLERANCE_FACTOR`.

mod common;

use common::TestDevice;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use graft::formats::pth::load_pth;
use graft::models::efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
use graft::models::{Backbone, Mode};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    std::env::var_os("GRAFT_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden")))
}

/// `${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}/weights/<file>`, where the fetch script writes.
fn cached_weights(file: &str) -> PathBuf {
    let cache = std::env::var_os("GRAFT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("graft")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/graft")))
        .expect("neither GRAFT_CACHE, XDG_CACHE_HOME nor HOME is set");
    let path = cache.join("weights").join(file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-weights.sh first",
        path.display()
    );
    path
}

/// Lite0 with its 1000-class classifier and the pretrained weights loaded into its VarMap.
fn pretrained_lite0(device: &Device) -> (VarMap, EfficientNetLite) {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = EfficientNetLite::with_classifier(EfficientNetLiteConfig::lite0(), 1000, vb).unwrap();
    varmap
        .load(cached_weights("efficientnet_lite0.safetensors"))
        .unwrap();
    (varmap, net)
}

/// Largest absolute difference, and the largest absolute reference value (for a relative bound).
fn max_abs_diff(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), reference.dims());
    let ours = &ours.to_device(&Device::Cpu).unwrap();
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap();
    let scale = reference.abs().unwrap().flatten_all().unwrap();
    (
        diff.max(0).unwrap().to_scalar::<f32>().unwrap(),
        scale.max(0).unwrap().to_scalar::<f32>().unwrap(),
    )
}

#[test]
fn pretrained_lite0_matches_pytorch_on_every_reference_input() {
    let td = TestDevice::from_env();
    td.run(|| lite0_matches_pytorch(&td));
}

fn lite0_matches_pytorch(td: &TestDevice) {
    let path = golden_dir().join("models/efficientnet_lite0/reference_io.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reference = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let mut cases: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
    for (key, t) in reference {
        let (case, what) = key
            .split_once('.')
            .unwrap_or_else(|| panic!("key `{key}` is not case.output"));
        cases.entry(case.into()).or_default().insert(what.into(), t);
    }
    assert!(!cases.is_empty(), "no cases in {}", path.display());
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = metadata.metadata().clone().unwrap_or_default();

    let (_, net) = pretrained_lite0(&td.device);
    for (case, outputs) in &cases {
        let input = &td.put(
            outputs
                .get("input")
                .unwrap_or_else(|| panic!("case {case} has no input")),
        );
        // Block by block, to compare the intermediates the reference recorded.
        let mut ours: HashMap<String, Tensor> = HashMap::new();
        let mut h = net.forward_group(0, input, Mode::Eval).unwrap();
        ours.insert("stem".into(), h.clone());
        for b in 0..net.num_blocks() {
            h = net.forward_block(b, &h, Mode::Eval).unwrap();
            ours.insert(format!("block{b}"), h.clone());
        }
        let top = net
            .forward_group(net.group_names().len() - 1, &h, Mode::Eval)
            .unwrap();
        ours.insert(
            "features".into(),
            top.mean(D::Minus1).unwrap().mean(D::Minus1).unwrap(),
        );
        // The group path that training uses must give the same logits.
        let logits = net.forward_logits(input, Mode::Eval, 0).unwrap();
        ours.insert("logits".into(), logits.clone());
        assert!(outputs.contains_key("logits"), "case {case} has no logits");

        for (what, expected) in outputs {
            if what == "input" {
                continue;
            }
            let got = ours.get(what).unwrap_or_else(|| {
                panic!("case {case}: no way to compute reference output `{what}`")
            });
            let (err, scale) = max_abs_diff(got, expected);
            // Logits: absolute bound from the golden README. Intermediates: relative to their range, since
            // activations reach tens while logits stay small.
            let bound = td.tolerance(if what == "logits" {
                1e-3
            } else {
                1e-4 * scale.max(1.) as f64
            }) as f32;
            println!(
                "{case}.{what}: max abs diff {err:.2e} (max |ref| {scale:.2}, bound {bound:.1e})"
            );
            assert!(err <= bound, "{case}.{what}: max abs diff {err} > {bound}");
        }

        if let Some(top5) = metadata.get(&format!("{}_top5", case.split('_').next().unwrap())) {
            let expected: Vec<u32> = serde_json::from_str(top5).unwrap();
            let order = logits
                .squeeze(0)
                .unwrap()
                .arg_sort_last_dim(false)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(&order[..5], &expected[..], "case {case}: top-5 classes");
        }
    }
}

#[test]
fn the_legacy_pth_holds_exactly_the_model_tensors_with_their_shapes() {
    // efficientnet-lite0-57934424.pth is a legacy (non-zip) torch checkpoint whose convolution weights are
    // non-contiguous views; the golden test above proves the values, this one the inventory.
    let tensors = load_pth(cached_weights("efficientnet-lite0-57934424.pth")).unwrap();
    assert_eq!(tensors.len(), 296);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = EfficientNetLite::with_classifier(EfficientNetLiteConfig::lite0(), 1000, vb).unwrap();
    let vars = varmap.data().lock().unwrap();
    let mut counters = 0;
    for (name, t) in &tensors {
        if name.ends_with(".num_batches_tracked") {
            assert_eq!((t.dtype(), t.rank()), (DType::I64, 0), "{name}");
            counters += 1;
            continue;
        }
        let var = vars
            .get(name)
            .unwrap_or_else(|| panic!("{name} is in the checkpoint but not in the model"));
        assert_eq!(t.dims(), var.as_tensor().dims(), "{name}");
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert!(t.is_contiguous(), "{name}");
        assert_eq!(
            net.group_of(name).is_none(),
            name.starts_with("_fc."),
            "{name}"
        );
    }
    assert_eq!(counters, 49, "one num_batches_tracked per BatchNorm");
    assert_eq!(
        tensors.len() - counters,
        vars.len(),
        "every model tensor is in the checkpoint"
    );
}

/// Lite0, Lite1 and Lite2 with their real weights on one random input, against PyTorch's float64 run of the
/// same checkpoints (tests/fixtures/efficientnet_lite_io.safetensors, scripts/efficientnet-lite-reference.py):
/// the scaled stage tables, the 21-block networks and SAME padding at every size they meet.
#[test]
fn pretrained_lite0_1_2_match_pytorch_on_a_random_input() {
    let td = TestDevice::from_env();
    let io = candle_core::safetensors::load(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/efficientnet_lite_io.safetensors"
        ),
        &Device::Cpu,
    )
    .unwrap();
    let x = td.put(&io["input"]);
    td.run(|| {
        for n in 0..3 {
            let name = format!("efficientnet_lite{n}");
            let mut varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &td.device);
            let cfg = EfficientNetLiteConfig::from_arch(&name).unwrap();
            let net = EfficientNetLite::with_classifier(cfg, 1000, vb).unwrap();
            varmap
                .load(cached_weights(&format!("{name}.safetensors")))
                .unwrap();
            let logits = net.forward_logits(&x, Mode::Eval, 0).unwrap();
            let reference = io[&format!("{name}.logits")].to_dtype(DType::F32).unwrap();
            let (diff, scale) = max_abs_diff(&logits, &reference);
            println!("{name}: max |logit - PyTorch f64| = {diff:.2e} (max |logit| {scale:.1})");
            assert!(
                diff < td.tolerance(1e-3) as f32,
                "{name}: logits differ from PyTorch by {diff}"
            );
        }
    });
}
