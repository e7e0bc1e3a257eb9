//! The learning-rate finder's smoothing and suggestions against fastai's own functions
//! (tests/fixtures/lr_find_reference.json, written by scripts/lr-find-reference.py).

use graft::train::lr_find::{LrFinding, SmoothLoss, Suggestion};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    raw: Vec<Option<f64>>,
    num_it: usize,
    lrs: Vec<f64>,
    losses: Vec<Option<f64>>,
    suggestions: std::collections::BTreeMap<String, (f64, (f64, f64))>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/lr_find_reference.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn smoothing_matches_avg_smooth_loss() {
    for c in cases() {
        let mut s = SmoothLoss::default();
        for (raw, want) in c.raw.iter().zip(&c.losses) {
            match (raw, want) {
                (Some(r), Some(w)) => assert!(close(s.push(*r), *w), "{}", c.name),
                _ => break,
            }
        }
    }
}

#[test]
fn every_suggestion_matches_fastai() {
    for c in cases() {
        let losses = c.losses.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
        let finding = LrFinding::from_curve(c.lrs.clone(), losses, c.num_it);
        for rule in Suggestion::ALL {
            let (lr, (px, py)) = c.suggestions[rule.name()];
            let got = finding
                .suggestions
                .iter()
                .find(|(r, ..)| *r == rule)
                .unwrap_or_else(|| panic!("{}: no {} suggestion", c.name, rule.name()));
            assert!(
                close(got.1, lr),
                "{} {}: {} vs fastai {}",
                c.name,
                rule.name(),
                got.1,
                lr
            );
            assert!(
                close(got.2 .0, px) && close(got.2 .1, py),
                "{} {} point",
                c.name,
                rule.name()
            );
            assert!(close(finding.suggested(rule).unwrap(), lr));
        }
    }
}

mod common;
use common::{graft_ok, make_folder, metrics_without_timing, model_tensors};

/// `--lr auto` records the finder's rate in the run's config; that config reruns the same run without the
/// finder (so the finder left weights, optimizer and generators as they were), and `graft lr-find` on the
/// same flags suggests the same rate and draws the curve.
#[test]
fn lr_auto_records_the_found_rate_and_leaves_the_run_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["blue", "red"], 8);
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
        "1",
        "--batch-size",
        "4",
        "--hidden",
        "8",
        "--seed",
        "3",
        "--quiet",
        "--val-split",
        "0.2",
    ];
    let run = tmp.path().join("auto");
    let mut args = vec![
        "finetune",
        "--lr",
        "auto",
        "--run-dir",
        run.to_str().unwrap(),
    ];
    args.extend(flags);
    graft_ok(&args);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert!(config["lr_find"].is_null());
    let lr = config["lr"].as_f64().unwrap();
    assert_eq!(config["lr_found"]["lr"].as_f64(), Some(lr));
    assert_eq!(config["lr_found"]["rule"], "valley");
    assert_eq!(config["lr_found"]["phase"], "frozen");
    assert!((1e-7..10.0).contains(&lr), "{lr}");
    assert!(run.join("lr_find.png").is_file());

    let again = tmp.path().join("again");
    let cfg_path = run.join("config.json");
    graft_ok(&[
        "finetune",
        "--config",
        cfg_path.to_str().unwrap(),
        "--quiet",
        "--run-dir",
        again.to_str().unwrap(),
    ]);
    assert_eq!(metrics_without_timing(&run), metrics_without_timing(&again));
    assert_eq!(
        model_tensors(&run.join("last.safetensors")),
        model_tensors(&again.join("last.safetensors"))
    );

    let plot = tmp.path().join("curve.png");
    let mut args = vec!["lr-find", "--plot", plot.to_str().unwrap()];
    args.extend(flags);
    let out = graft_ok(&args);
    assert!(
        out.contains(&format!("suggested: --lr {lr:.3e} (valley)")),
        "{out}"
    );
    assert!(image::open(&plot).unwrap().width() > 100);
}
