//! Bad input gives a clear error that names the thing at fault, exits non-zero and never panics; nothing
//! already saved is lost.

mod common;

use common::{graft_err, graft_ok, make_folder, resnet18_weights};

#[test]
fn a_missing_weights_file_is_named() {
    let err = graft_err(
        &[
            "inspect",
            "--base",
            "resnet18",
            "--weights",
            "/nonexistent/w.safetensors",
        ],
        &[],
    );
    assert!(err.contains("/nonexistent/w.safetensors"), "{err}");
}

#[test]
fn a_truncated_safetensors_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(resnet18_weights()).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = graft_err(
        &[
            "inspect",
            "--base",
            "resnet18",
            "--weights",
            cut.to_str().unwrap(),
        ],
        &[],
    );
    assert!(err.contains("cut.safetensors"), "{err}");
}

#[test]
fn a_wrong_shaped_tensor_names_the_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t =
        candle_core::safetensors::load(resnet18_weights(), &candle_core::Device::Cpu).unwrap();
    t.insert(
        "layer4.1.bn2.weight".into(),
        candle_core::Tensor::zeros(7, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let bad = tmp.path().join("bad.safetensors");
    candle_core::safetensors::save(&t, &bad).unwrap();
    let err = graft_err(
        &[
            "inspect",
            "--base",
            "resnet18",
            "--weights",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains("layer4.1.bn2.weight") && err.contains("[7]") && err.contains("[512]"),
        "{err}"
    );
}

#[test]
fn weights_of_another_architecture_name_a_missing_tensor() {
    let err = graft_err(
        &[
            "inspect",
            "--base",
            "resnet34",
            "--weights",
            resnet18_weights().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains("layer1.2.conv1.weight") || err.contains("missing"),
        "{err}"
    );
}

#[test]
fn an_unknown_base_lists_the_known_ones() {
    let err = graft_err(&["predict", "--base", "resnet19", "x.png"], &[]);
    assert!(
        err.contains("resnet19") && err.contains("resnet18"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let err = graft_err(
        &[
            "finetune",
            "--base",
            "vgg16",
            "--data",
            tmp.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(err.contains("vgg16"), "{err}");
}

#[test]
fn a_file_that_is_not_an_image_is_named_and_the_others_are_still_classified() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("notes.png");
    std::fs::write(&txt, "this is text").unwrap();
    make_folder(&tmp.path().join("d"), &["a"], 1);
    let good = tmp.path().join("d/a/000.png");
    let w = resnet18_weights();
    let out = common::graft(
        &[
            "predict",
            "--base",
            "resnet18",
            "--weights",
            w.to_str().unwrap(),
            txt.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("notes.png") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("000.png"));
}

#[test]
fn an_unknown_precision_names_the_flag_and_the_choices() {
    for cmd in [
        &["finetune", "--base", "resnet18", "--data", "/nonexistent"][..],
        &["eval", "--model", "m.safetensors", "--data", "/nonexistent"][..],
    ] {
        let mut args = cmd.to_vec();
        args.extend(["--precision", "fp16"]);
        let err = graft_err(&args, &[]);
        assert!(
            err.contains("--precision") && err.contains("f32 or bf16"),
            "{err}"
        );
    }
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let err = graft_err(&["inspect", "--base", "resnet18", "--device", "cuda"], &[]);
    assert!(err.contains("cuda") && err.contains("CUDA"), "{err}");
}

#[test]
fn finetune_refuses_bad_folders_and_runs_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let w = resnet18_weights();
    let w = w.to_str().unwrap();
    // One class.
    let one = tmp.path().join("one");
    make_folder(&one, &["only"], 3);
    let err = graft_err(
        &[
            "finetune",
            "--base",
            "resnet18",
            "--weights",
            w,
            "--data",
            one.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains("one") && err.to_lowercase().contains("class"),
        "{err}"
    );
    // A run folder that cannot be written.
    let two = tmp.path().join("two");
    make_folder(&two, &["a", "b"], 3);
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let bad_run = blocker.join("run");
    let err = graft_err(
        &[
            "finetune",
            "--base",
            "resnet18",
            "--weights",
            w,
            "--data",
            two.to_str().unwrap(),
            "--run-dir",
            bad_run.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains(bad_run.to_str().unwrap()) || err.contains(blocker.to_str().unwrap()),
        "{err}"
    );
    // --resume of a folder that is not a run.
    let err = graft_err(&["finetune", "--resume", two.to_str().unwrap()], &[]);
    assert!(err.contains(two.to_str().unwrap()), "{err}");
}

#[test]
fn a_corrupt_checkpoint_is_named_and_the_run_keeps_its_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    make_folder(&data, &["a", "b"], 4);
    let run = tmp.path().join("run");
    let w = resnet18_weights();
    graft_ok(&[
        "finetune",
        "--base",
        "resnet18",
        "--weights",
        w.to_str().unwrap(),
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
        "--quiet",
        "--run-dir",
        run.to_str().unwrap(),
        "--stop-after",
        "1",
    ]);
    let last = run.join("last.safetensors");
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() - 100]).unwrap();
    let best_before = std::fs::read(run.join("best.safetensors")).unwrap();
    let err = graft_err(&["finetune", "--resume", run.to_str().unwrap()], &[]);
    assert!(err.contains("last.safetensors"), "{err}");
    assert_eq!(
        std::fs::read(run.join("best.safetensors")).unwrap(),
        best_before
    );
    assert!(run.join("metrics.jsonl").is_file());
}
