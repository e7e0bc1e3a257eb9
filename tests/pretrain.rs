//! Greedy layer-wise pretraining end to end on small synthetic folders: stages train one at a time, a resumed
//! run ends where an uninterrupted one does, reconstruction improves, the encoder starts a classifier in
//! `graft finetune --base ae:RUN_DIR`, and bad arch strings or image sizes are refused with clear errors.

mod common;

use candle_core::Device;
use common::{graft_err, graft_ok, make_folder};
use graft::models::encoder::EncoderConfig;
use graft::pretrain::config::{Method, Noise, PretrainConfig, Sparsity};
use graft::pretrain::model::StackedAutoencoder;
use graft::pretrain::{init_weights, pretrain};
use graft::train::checkpoint::RunDir;
use graft::train::config::ScheduleKind;
use graft::train::metrics::MetricsLog;
use graft::train::runner::RunOptions;
use std::collections::BTreeMap;
use std::path::Path;

fn config(data: &Path, arch: &str) -> PretrainConfig {
    PretrainConfig {
        arch: EncoderConfig::parse(arch).unwrap().arch(),
        data: data.to_path_buf(),
        val_split: 0.25,
        image_size: 8,
        batch_size: 8,
        stage_epochs: 1,
        lr: 1e-2,
        seed: 3,
        ..PretrainConfig::default()
    }
}

fn quiet(stop_after: Option<usize>) -> RunOptions {
    RunOptions {
        quiet: true,
        stop_after,
        ..RunOptions::default()
    }
}

/// The `model.*` tensors of a checkpoint, by key without the prefix.
fn checkpoint_model(path: &Path) -> BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix("model.")?.to_string();
            Some((k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        })
        .collect()
}

fn group(tensors: &BTreeMap<String, Vec<f32>>, stage: usize) -> Vec<(String, Vec<f32>)> {
    tensors
        .iter()
        .filter(|(k, _)| {
            k.starts_with(&format!("stage{stage}."))
                || k.starts_with(&format!("decoder.stage{stage}."))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn greedy_stages_train_one_at_a_time_with_the_stages_below_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 8);
    let mut cfg = config(&data, "dense:64,16,8");
    cfg.finetune_epochs = 1;
    // The weights every stage starts from: the seeded initialisation.
    let fresh = StackedAutoencoder::new(
        EncoderConfig::parse(&cfg.arch).unwrap(),
        false,
        &Device::Cpu,
    )
    .unwrap();
    init_weights(&fresh, cfg.seed).unwrap();
    let init: BTreeMap<String, Vec<f32>> = fresh
        .varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();

    let run = RunDir::create(Some(&tmp.path().join("run"))).unwrap();
    pretrain(&cfg, &run, false, &quiet(Some(1))).unwrap();
    let after1 = checkpoint_model(&run.last_checkpoint());
    assert_ne!(
        group(&after1, 1),
        group(&init, 1),
        "stage 1 trained in epoch 1"
    );
    assert_eq!(
        group(&after1, 2),
        group(&init, 2),
        "stage 2 untouched while stage 1 trains"
    );

    pretrain(&cfg, &run, true, &quiet(Some(1))).unwrap();
    let after2 = checkpoint_model(&run.last_checkpoint());
    assert_eq!(
        group(&after2, 1),
        group(&after1, 1),
        "stage 1 frozen while stage 2 trains"
    );
    assert_ne!(
        group(&after2, 2),
        group(&after1, 2),
        "stage 2 trained in epoch 2"
    );
    assert!(
        !run.path().join("encoder.safetensors").exists(),
        "not finished yet"
    );

    // Finishing the run writes the encoder (no decoder keys) and a grid per stage.
    pretrain(&cfg, &run, true, &quiet(None)).unwrap();
    let enc = candle_core::safetensors::load(run.path().join("encoder.safetensors"), &Device::Cpu)
        .unwrap();
    let mut keys: Vec<&String> = enc.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "stage1.bias",
            "stage1.weight",
            "stage2.bias",
            "stage2.weight"
        ]
    );
    for f in [
        "recon-stage1.png",
        "recon-stage2.png",
        "recon-finetune.png",
        "curves.png",
        "encoder.json",
    ] {
        assert!(run.path().join(f).is_file(), "{f}");
    }
}

#[test]
fn a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 8);
    let mut cfg = config(&data, "conv:4,6:sigmoid");
    cfg.stage_epochs = 2;
    cfg.finetune_epochs = 1;
    cfg.schedule = ScheduleKind::Plateau;
    cfg.noise = Some(Noise::Gaussian { std: 0.1 });
    cfg.sparsity = Some(Sparsity::Kl {
        target: 0.1,
        weight: 0.1,
    });
    let whole = RunDir::create(Some(&tmp.path().join("whole"))).unwrap();
    pretrain(&cfg, &whole, false, &quiet(None)).unwrap();
    let split = RunDir::create(Some(&tmp.path().join("split"))).unwrap();
    pretrain(&cfg, &split, false, &quiet(Some(1))).unwrap();
    pretrain(&cfg, &split, true, &quiet(Some(2))).unwrap();
    pretrain(&cfg, &split, true, &quiet(None)).unwrap();
    assert_eq!(
        checkpoint_model(&whole.last_checkpoint()),
        checkpoint_model(&split.last_checkpoint())
    );
    let metrics = MetricsLog::read(split.metrics_path()).unwrap();
    assert_eq!(metrics.len(), 5);
    assert_eq!(metrics[4].extra["phase"], "finetune");
}

/// Writes `n` 8x8 grey PNGs straight into `root` (no class folders): a bright horizontal and a bright
/// vertical bar at seeded positions on a dark background, images an autoencoder can learn to compress.
fn make_bars(root: &Path, n: usize) {
    std::fs::create_dir_all(root).unwrap();
    let mut state = 99u32;
    for i in 0..n {
        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
        let (row, col) = ((state >> 24) % 8, (state >> 16) % 8);
        let img = image::GrayImage::from_fn(8, 8, |x, y| {
            image::Luma([if y == row || x == col { 230 } else { 20 }])
        });
        img.save(root.join(format!("{i:03}.png"))).unwrap();
    }
}

#[test]
fn reconstruction_loss_falls_on_a_small_synthetic_set() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bars");
    make_bars(&data, 48);
    for (arch, method, tied) in [
        ("dense:64,16", Method::Autoencoder, false),
        ("dense:64,16", Method::Autoencoder, true),
        ("conv:8", Method::Autoencoder, false),
        ("dense:64,24:sigmoid", Method::Rbm, true),
    ] {
        let mut cfg = config(&data, arch);
        cfg.method = method;
        cfg.tied = tied;
        cfg.stage_epochs = 8;
        cfg.batch_size = 4;
        if method == Method::Rbm {
            cfg.lr = 0.1;
            cfg.optimizer = graft::optim::OptimizerConfig::from_kind("momentum").unwrap();
        }
        let run = RunDir::create(Some(
            &tmp.path()
                .join(format!("{}-{tied}", arch.replace([':', ','], "_"))),
        ))
        .unwrap();
        pretrain(&cfg, &run, false, &quiet(None)).unwrap();
        let m = MetricsLog::read(run.metrics_path()).unwrap();
        let (first, last) = (m[0].val_loss, m.last().unwrap().val_loss);
        assert!(
            last < 0.8 * first,
            "{arch} {method:?}: val loss {first} -> {last}"
        );
    }
}

#[test]
fn a_folder_without_class_subfolders_pretrains_and_rgb_conv_works() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("flat");
    make_folder(&tmp.path().join("src"), &["a"], 6);
    std::fs::create_dir_all(&data).unwrap();
    for e in std::fs::read_dir(tmp.path().join("src/a")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, data.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg = config(&data, "conv:4:rgb");
    cfg.channels = 3;
    cfg.val_split = 0.0;
    let run = RunDir::create(Some(&tmp.path().join("run"))).unwrap();
    let out = pretrain(&cfg, &run, false, &quiet(None)).unwrap();
    assert!(out.encoder.unwrap().is_file());
}

/// `graft finetune --base ae:AE` on `data` into `run`: one frozen epoch (head only), then `epochs` unfrozen.
fn finetune_from(ae: &Path, data: &Path, epochs: usize, run: &Path) {
    let base = format!("ae:{}", ae.display());
    let epochs = epochs.to_string();
    graft_ok(&[
        "finetune",
        "--base",
        &base,
        "--data",
        data.to_str().unwrap(),
        "--batch-size",
        "4",
        "--freeze-epochs",
        "1",
        "--epochs",
        &epochs,
        "--quiet",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
}

#[test]
fn the_exported_encoder_starts_a_classifier_in_finetune() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 8);
    let d = data.to_str().unwrap();
    let run = tmp.path().join("ae");
    let r = run.to_str().unwrap();
    graft_ok(&[
        "pretrain",
        "--arch",
        "dense:64,16,8",
        "--data",
        d,
        "--image-size",
        "8",
        "--batch-size",
        "8",
        "--stage-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--tied",
        "--noise",
        "dropout:0.2",
        "--quiet",
        "--run-dir",
        r,
    ]);
    // Head only (the encoder stays frozen), so the classifier's encoder must be the pretrained one exactly.
    let ft = tmp.path().join("ft");
    finetune_from(&run, &data, 0, &ft);
    let model = tmp.path().join("model.safetensors");
    graft_ok(&[
        "export",
        ft.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    let exported = candle_core::safetensors::load(&model, &Device::Cpu).unwrap();
    let encoder =
        candle_core::safetensors::load(run.join("encoder.safetensors"), &Device::Cpu).unwrap();
    for (k, v) in &encoder {
        let diff = (exported[k].clone() - v)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{k}");
    }
    let out = graft_ok(&["eval", "--model", model.to_str().unwrap(), "--data", d]);
    assert!(
        out.contains('%') || out.to_lowercase().contains("accuracy"),
        "{out}"
    );

    // The same architecture from random initialisation is one flag away.
    graft_ok(&[
        "finetune",
        "--base",
        "dense:64,16,8",
        "--data",
        d,
        "--batch-size",
        "4",
        "--freeze-epochs",
        "0",
        "--epochs",
        "1",
        "--quiet",
        "--run-dir",
        tmp.path().join("rand").to_str().unwrap(),
    ]);
}

#[test]
fn bad_arch_strings_and_mismatched_image_sizes_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 2);
    let d = data.to_str().unwrap();
    let err = graft_err(&["pretrain", "--arch", "dense:784,x", "--data", d], &[]);
    assert!(err.contains("dense:784,x") && err.contains("`x`"), "{err}");
    let err = graft_err(&["pretrain", "--arch", "mlp:3,4", "--data", d], &[]);
    assert!(err.contains("mlp:3,4"), "{err}");
    let err = graft_err(
        &[
            "pretrain",
            "--arch",
            "dense:784,100",
            "--data",
            d,
            "--image-size",
            "32",
        ],
        &[],
    );
    assert!(
        err.contains("dense:784,100") && err.contains("32x32"),
        "{err}"
    );
    let err = graft_err(
        &[
            "finetune",
            "--base",
            "dense:784,100",
            "--data",
            d,
            "--image-size",
            "32",
            "--run-dir",
            tmp.path().join("r1").to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains("dense:784,100") && err.contains("1024"),
        "{err}"
    );
    let err = graft_err(
        &[
            "pretrain",
            "--arch",
            "dense:64,16:selu",
            "--method",
            "rbm",
            "--data",
            d,
            "--image-size",
            "8",
        ],
        &[],
    );
    assert!(err.contains("sigmoid"), "{err}");
    let err = graft_err(
        &[
            "finetune",
            "--base",
            "ae:/nonexistent/run",
            "--data",
            d,
            "--run-dir",
            tmp.path().join("r2").to_str().unwrap(),
        ],
        &[],
    );
    assert!(err.contains("encoder.json"), "{err}");
}

#[test]
fn a_stage_stopped_early_hands_its_best_epoch_to_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 8);
    // `--min-delta 100`: no epoch after the first improves, so patience 1 stops the stage after epoch 2 and
    // the best weights are those after epoch 1.
    let mut stopped = config(&data, "dense:64,16");
    stopped.stage_epochs = 4;
    stopped.patience = Some(1);
    stopped.min_delta = 100.0;
    let run = RunDir::create(Some(&tmp.path().join("stopped"))).unwrap();
    let out = pretrain(&stopped, &run, false, &quiet(None)).unwrap();
    assert_eq!(out.epochs_run, 2, "patience 1 stops after the second epoch");

    // One epoch alone reaches the same weights (constant schedule, seeded order and noise).
    let mut one = config(&data, "dense:64,16");
    one.stage_epochs = 1;
    let run1 = RunDir::create(Some(&tmp.path().join("one"))).unwrap();
    pretrain(&one, &run1, false, &quiet(None)).unwrap();

    let encoder = |dir: &Path| -> BTreeMap<String, Vec<f32>> {
        candle_core::safetensors::load(dir.join("encoder.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    };
    let (a, b) = (encoder(run.path()), encoder(run1.path()));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, va) in &a {
        let diff = va
            .iter()
            .zip(&b[k])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-6,
            "{k}: the stopped stage kept another epoch's weights ({diff})"
        );
    }
}

/// The classes `predict --format json` gives each image, by file.
fn predicted_classes(model: &Path, images: &[std::path::PathBuf]) -> BTreeMap<String, String> {
    let mut args = vec![
        "predict".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--format".into(),
        "json".into(),
        "--top-k".into(),
        "1".into(),
    ];
    args.extend(images.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    graft_ok(&args)
        .lines()
        .map(|l| {
            let p: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                p["path"].as_str().unwrap().to_string(),
                p["top"][0]["class"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_run_from_a_pretraining_folder_exports_evaluates_and_predicts_after_the_folder_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 8);
    let d = data.to_str().unwrap();
    let ae = tmp.path().join("ae");
    let mut cfg = config(&data, "dense:64,16,8");
    cfg.finetune_epochs = 0;
    pretrain(
        &cfg,
        &RunDir::create(Some(&ae)).unwrap(),
        false,
        &quiet(None),
    )
    .unwrap();
    let ft = tmp.path().join("ft");
    finetune_from(&ae, &data, 1, &ft);
    let images: Vec<_> = ["a", "b"]
        .iter()
        .flat_map(|c| std::fs::read_dir(data.join(c)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    let export = |name: &str| {
        let out = tmp.path().join(name);
        graft_ok(&[
            "export",
            ft.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    };
    let eval = |model: &Path| -> serde_json::Value {
        serde_json::from_str(&graft_ok(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            d,
            "--json",
        ]))
        .unwrap()
    };
    let before = export("before.safetensors");
    let (eval_before, predicted_before) = (eval(&before), predicted_classes(&before, &images));

    // The pretraining folder moves away: the run's checkpoints carry the model as it was resolved.
    std::fs::rename(&ae, tmp.path().join("ae-moved")).unwrap();
    let after = export("after.safetensors");
    let eval_after = eval(&after);
    assert_eq!(eval_after["accuracy"], eval_before["accuracy"]);
    assert_eq!(eval_after["loss"], eval_before["loss"]);
    assert_eq!(predicted_classes(&after, &images), predicted_before);
    let correct = predicted_before
        .iter()
        .filter(|(path, class)| Path::new(path).parent().unwrap().ends_with(class.as_str()))
        .count();
    let predict_acc = correct as f64 / images.len() as f64;
    let eval_acc = eval_after["accuracy"].as_f64().unwrap();
    assert!(
        (predict_acc - eval_acc).abs() < 1e-9,
        "predict {predict_acc} vs eval {eval_acc}"
    );
}

#[test]
fn a_run_with_its_output_piped_prints_one_line_per_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 8);
    let d = data.to_str().unwrap();
    for (cmd, epochs) in [
        (
            vec![
                "pretrain",
                "--arch",
                "dense:64,16,8",
                "--image-size",
                "8",
                "--stage-epochs",
                "2",
                "--finetune-epochs",
                "1",
            ],
            5,
        ),
        (
            vec![
                "finetune",
                "--base",
                "dense:64,16,8",
                "--freeze-epochs",
                "1",
                "--epochs",
                "2",
            ],
            3,
        ),
    ] {
        let run = tmp.path().join(cmd[0]);
        let mut args = cmd.clone();
        args.extend([
            "--data",
            d,
            "--batch-size",
            "2",
            "--run-dir",
            run.to_str().unwrap(),
        ]);
        // Not quiet: the test harness pipes stdout and stderr, as a log file or CI would.
        let out = common::graft(&args, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let epoch_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("epoch ")).collect();
        let per_epoch: Vec<&str> = epoch_lines
            .iter()
            .copied()
            .filter(|l| l.contains("train loss"))
            .collect();
        assert_eq!(per_epoch.len(), epochs, "{}: {text}", cmd[0]);
        for l in &epoch_lines {
            assert!(
                l.contains("train loss") || l.contains(": training"),
                "{}: a per-batch line: {l}\n{text}",
                cmd[0]
            );
        }
    }
}
