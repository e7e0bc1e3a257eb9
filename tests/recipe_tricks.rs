//! The training tricks of the default recipe's toolbox, end to end: the weights' moving average (`--ema`)
//! and batch mixing (`--mixup`, `--cutmix`) resume exactly, and the average is what is evaluated and exported.

mod common;
use common::{graft_ok, make_folder, metrics_without_timing};
use std::collections::BTreeMap;
use std::path::Path;

fn tensors(path: &Path, prefix: &str) -> BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix(prefix)?.to_string();
            let v = v
                .flatten_all()
                .ok()?
                .to_dtype(candle_core::DType::F32)
                .ok()?;
            Some((k, v.to_vec1::<f32>().unwrap()))
        })
        .collect()
}

#[test]
fn ema_and_mixing_resume_exactly_and_the_average_is_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "green", "red"], 8);
    let d = data.to_str().unwrap();
    let flags = [
        "--base",
        "dense:256,16",
        "--image-size",
        "16",
        "--data",
        d,
        "--freeze-epochs",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--seed",
        "9",
        "--ema",
        "0.9",
        "--mixup",
        "0.4",
        "--cutmix",
        "1.0",
        "--quiet",
    ];
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["finetune", "--run-dir", dir.to_str().unwrap()];
        args.extend(flags);
        args.extend(extra);
        graft_ok(&args);
    };
    let whole = tmp.path().join("whole");
    run(&whole, &[]);
    let split = tmp.path().join("split");
    run(&split, &["--stop-after", "1"]);
    graft_ok(&["finetune", "--resume", split.to_str().unwrap(), "--quiet"]);
    assert_eq!(
        metrics_without_timing(&whole),
        metrics_without_timing(&split)
    );
    let last = |r: &Path| r.join("last.safetensors");
    for prefix in ["model.", "ema."] {
        let (a, b) = (
            tensors(&last(&whole), prefix),
            tensors(&last(&split), prefix),
        );
        assert!(!a.is_empty(), "no {prefix} tensors");
        assert_eq!(a, b, "{prefix}");
    }
    assert_ne!(
        tensors(&last(&whole), "model."),
        tensors(&last(&whole), "ema."),
        "the average differs from the live weights"
    );

    let out = tmp.path().join("model.safetensors");
    graft_ok(&[
        "export",
        whole.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let best = if whole.join("best.safetensors").is_file() {
        whole.join("best.safetensors")
    } else {
        last(&whole)
    };
    let ema = tensors(&best, "ema.");
    let exported = tensors(&out, "");
    for (k, v) in &ema {
        let e = exported
            .get(k)
            .or_else(|| exported.get(&format!("model.{k}")))
            .unwrap_or_else(|| panic!("{k} not exported"));
        assert_eq!(e, v, "{k}");
    }
}

/// Without BatchNorm or dropout, batches of 2 accumulated in pairs train as batches of 4: the same samples
/// per step, the mean of two means, the same schedule.
#[test]
fn accumulating_two_batches_of_two_steps_as_one_batch_of_four() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "red"], 8);
    let d = data.to_str().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let mut args = vec![
            "finetune",
            "--base",
            "dense:256,16",
            "--image-size",
            "16",
            "--data",
            d,
            "--val-split",
            "0",
            "--freeze-epochs",
            "0",
            "--epochs",
            "2",
            "--dropout",
            "0",
            "--seed",
            "4",
            "--quiet",
            "--run-dir",
            dir.to_str().unwrap(),
        ];
        args.extend(extra);
        graft_ok(&args);
        tensors(&dir.join("last.safetensors"), "model.")
    };
    let four = run("four", &["--batch-size", "4", "--lr", "0.05"]);
    let pairs = run(
        "pairs",
        &["--batch-size", "2", "--accumulate", "2", "--lr", "0.05"],
    );
    let start = run("none", &["--batch-size", "4", "--lr", "1e-12"]);
    let mut most = 0f32;
    for (k, a) in &four {
        let b = &pairs[k];
        let moved = a
            .iter()
            .zip(&start[k])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-4 * moved.max(1e-3) + 1e-6,
            "{k}: differs by {diff}, moved {moved}"
        );
        most = most.max(moved);
    }
    assert!(most > 1e-2, "training moved the weights ({most})");
}
