//! Issue 16, through the real binary: bad data, typos, kills and a second process never crash a run or lose
//! a record. Each test builds its small folder in a temp dir; the network is ResNet-18 (golden weights) at
//! 32x32, which trains an epoch in well under a second.

mod common;

use candle_core::Device;
use common::{graft, graft_err, graft_ok, make_folder, resnet18_weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A small run: one frozen epoch (features cached) then `epochs` unfrozen ones, batch 4.
fn flags(data: &Path, run: &Path, epochs: &str) -> Vec<String> {
    let w = resnet18_weights();
    [
        "finetune",
        "--base",
        "resnet18",
        "--weights",
        w.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-size",
        "32",
        "--crop-pct",
        "1",
        "--batch-size",
        "4",
        "--freeze-epochs",
        "1",
        "--epochs",
        epochs,
        "--seed",
        "3",
        "--val-split",
        "0.2",
        "--quiet",
        "--run-dir",
        run.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `base` with `extra`'s flags: a flag already in `base` gets the new value, others are appended.
fn with(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let value = extra.get(i + 1).filter(|v| !v.starts_with("--"));
        match (base.iter().position(|b| b == flag), value) {
            (Some(at), Some(v)) => base[at + 1] = v.to_string(),
            (None, Some(v)) => base.extend([flag.to_string(), v.to_string()]),
            (_, None) => base.push(flag.to_string()),
        }
        i += if value.is_some() { 2 } else { 1 };
    }
    base
}

fn model_tensors(path: &Path) -> BTreeMap<String, Vec<u32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("model."))
        .map(|(k, v)| {
            let v = v
                .flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            (
                k,
                v.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("images_per_s");
            v
        })
        .collect()
}

/// A truncated JPEG: its header reads, its pixels do not.
fn truncated_jpeg(path: &Path) {
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 90]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn one_unreadable_image_is_skipped_and_counted_with_cached_features_and_every_layout() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 9);
    truncated_jpeg(&data.join("a/zz-truncated.jpg"));
    std::fs::write(data.join("b/zz-empty.png"), b"").unwrap();
    for (i, extra) in [
        vec![],
        vec!["--freeze", "stem,layer1"],
        vec!["--balanced"],
        vec!["--freeze-epochs", "0", "--batch-size", "2"],
    ]
    .into_iter()
    .enumerate()
    {
        let run = root.path().join(format!("run{i}"));
        let out = graft(&strs(&with(flags(&data, &run, "1"), &extra)), &[]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{extra:?}\n{stdout}\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            stderr.matches("zz-truncated.jpg").count(),
            1,
            "warned once: {stderr}"
        );
        assert!(stderr.contains("zz-empty.png"), "{stderr}");
        assert!(stdout.contains("skipped 2 image file(s)"), "{stdout}");
        let epochs = if extra.contains(&"--freeze-epochs") {
            1
        } else {
            2
        };
        assert_eq!(metrics(&run).len(), epochs, "{extra:?}");
    }
}

#[test]
fn a_class_whose_every_image_is_unreadable_is_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 4);
    std::fs::create_dir(data.join("c")).unwrap();
    for i in 0..3 {
        std::fs::write(data.join(format!("c/{i}.jpg")), b"not an image").unwrap();
    }
    let run = root.path().join("run");
    let err = graft_err(&strs(&flags(&data, &run, "1")), &[]);
    assert!(
        err.contains("class `c`") && err.contains("none of the"),
        "{err}"
    );
    assert!(!run.exists(), "a refused run leaves no folder");
}

#[test]
fn sizes_that_would_exhaust_memory_are_refused_before_any_allocation() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 2);
    let run = root.path().join("run");
    let base = flags(&data, &run, "1");
    let err = graft_err(&strs(&with(base.clone(), &["--image-size", "100000"])), &[]);
    assert!(
        err.contains("--image-size") && err.contains("too large"),
        "{err}"
    );
    let err = graft_err(
        &strs(&with(base, &["--image-size", "4000", "--batch-size", "32"])),
        &[],
    );
    assert!(
        err.contains("would need about") && err.contains("GiB"),
        "{err}"
    );
    assert!(!run.exists());
}

#[test]
fn numeric_flags_out_of_range_are_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 2);
    let run = root.path().join("run");
    for (flag, value) in [
        ("--clip-grad-norm", "-1"),
        ("--momentum", "1.5"),
        ("--clip-grad-norm", "0"),
        ("--val-split", "1.5"),
        ("--min-delta", "-0.1"),
        ("--patience", "0"),
        ("--label-smoothing", "1"),
        ("--lr", "nan"),
        ("--dropout", "1.5"),
        ("--weight-decay", "-1"),
    ] {
        let mut args = flags(&data, &run, "1");
        args.push(format!("{flag}={value}"));
        let err = graft_err(&strs(&args), &[]);
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert!(!run.exists(), "{flag} {value} left a folder");
    }
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 8);
    let run = root.path().join("run");
    // A sane frozen epoch, then SGD at an absurd rate blows the weights up in the unfrozen one.
    let args = with(
        flags(&data, &run, "3"),
        &[
            "--optimizer",
            "sgd",
            "--schedule",
            "constant",
            "--lr",
            "1e30",
            "--max-bad-steps",
            "2",
        ],
    );
    let out = graft(&strs(&args), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("training diverged") && err.contains("--max-bad-steps 2"),
        "{err}"
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("warning: step"),
        "skips were announced: {said}"
    );
    if run.join("last.safetensors").exists() {
        // What is there is a whole, loadable checkpoint of an earlier epoch.
        let t = model_tensors(&run.join("last.safetensors"));
        assert!(!t.is_empty());
    }
}

#[test]
fn a_second_process_on_a_run_folder_is_refused_in_every_order_and_a_dead_holder_blocks_nobody() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 12);
    let run = root.path().join("run");
    // A long run, so it is still training while the others try.
    let mut first = Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(strs(&with(
            flags(&data, &run, "20"),
            &["--batch-size", "2"],
        )))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = run.join("lock");
    let t0 = std::time::Instant::now();
    while !run.join("last.safetensors").exists() {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        assert!(
            t0.elapsed().as_secs() < 120,
            "the first run never checkpointed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(lock.exists());
    let pid = format!("pid {}", first.id());
    let resume = ["finetune", "--resume", run.to_str().unwrap(), "--quiet"];
    let err = graft_err(&resume, &[]);
    assert!(err.contains("in use by") && err.contains(&pid), "{err}");
    let err = graft_err(&strs(&flags(&data, &run, "1")), &[]);
    assert!(err.contains(&pid) || err.contains("already holds"), "{err}");
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    // Two resumes at once: one wins, the other is refused; the run then ends complete.
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_graft"))
            .args(resume)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let ok = [a.status.success(), b.status.success()];
    let refused: Vec<String> = [&a, &b]
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(ok.contains(&true), "neither resume finished: {refused:?}");
    for r in &refused {
        assert!(r.contains("in use by"), "{r}");
    }
    assert_eq!(metrics(&run).len(), 21);
}

/// Kills the run at `point` (see `graft::fsutil::kill_point`), then resumes (or reruns) it until it ends,
/// and checks it ends as the uninterrupted run did.
#[test]
fn a_kill_at_any_point_ends_after_resume_with_the_same_weights_and_complete_metrics() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 6);
    let reference = root.path().join("reference");
    graft_ok(&strs(&with(
        flags(&data, &reference, "2"),
        &["--val-split", "0.25"],
    )));
    let want_metrics = metrics(&reference);
    let want_last = model_tensors(&reference.join("last.safetensors"));
    assert_eq!(want_metrics.len(), 3);
    let points = [
        "epoch_end@1",     // before the first checkpoint
        "before_rename@2", // config.json written, first checkpoint half written
        "after_best@1",
        "after_last@1", // checkpoint written, metrics line not
        "before_rename@4",
        "after_last@2",
        "epoch_end@3",
        "after_last@3", // the last epoch's record
    ];
    for point in points {
        let run = root.path().join(point.replace('@', "-"));
        let args = with(flags(&data, &run, "2"), &["--val-split", "0.25"]);
        let out = graft(&strs(&args), &[("GRAFT_KILL_AT", point)]);
        assert!(!out.status.success(), "{point}: the run was not killed");
        // Resume; a run killed before it wrote its config is rerun into the same folder.
        let out = if run.join("config.json").exists() {
            graft(
                &["finetune", "--resume", run.to_str().unwrap(), "--quiet"],
                &[],
            )
        } else {
            graft(&strs(&args), &[])
        };
        assert!(
            out.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(metrics(&run), want_metrics, "{point}: metrics differ");
        assert!(
            model_tensors(&run.join("last.safetensors")) == want_last,
            "{point}: weights differ"
        );
        let leftovers: Vec<PathBuf> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
    }
}

#[test]
fn a_run_that_failed_before_its_first_checkpoint_can_be_rerun_into_the_same_folder() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 4);
    let run = root.path().join("run");
    let args = flags(&data, &run, "1");
    let out = graft(&strs(&args), &[("GRAFT_KILL_AT", "epoch_end@1")]);
    assert!(!out.status.success());
    assert!(run.join("run.json").exists() && !run.join("last.safetensors").exists());
    graft_ok(&strs(&args));
    assert_eq!(metrics(&run).len(), 2);
}

#[test]
fn every_optimizer_trains_under_every_schedule() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 3);
    for opt in [
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam",
    ] {
        for sched in [
            "constant",
            "step",
            "exponential",
            "cosine",
            "onecycle",
            "plateau",
        ] {
            let run = root.path().join(format!("{opt}-{sched}"));
            // The dense encoder from random init: the cheapest network with the whole loop.
            let args = [
                "finetune",
                "--base",
                "dense:256,8",
                "--data",
                data.to_str().unwrap(),
                "--image-size",
                "16",
                "--batch-size",
                "2",
                "--freeze-epochs",
                "1",
                "--epochs",
                "1",
                "--optimizer",
                opt,
                "--schedule",
                sched,
                "--quiet",
                "--run-dir",
                run.to_str().unwrap(),
            ];
            let out = graft(&args, &[]);
            assert!(
                out.status.success(),
                "{opt} + {sched}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn the_last_line_is_for_people_and_resume_says_which_flags_it_ignores() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 4);
    let run = root.path().join("run");
    let args = with(flags(&data, &run, "1"), &["--val-split", "0"]);
    let out = graft_ok(&strs(&args));
    let last = out.lines().last().unwrap();
    assert!(!last.contains("Some(") && !last.contains("NaN"), "{out}");
    assert!(last.contains("no validation images"), "{out}");
    let run2 = root.path().join("run2");
    let out = graft_ok(&strs(&with(
        flags(&data, &run2, "1"),
        &["--stop-after", "1"],
    )));
    assert!(!out.contains("Some("), "{out}");
    let out = graft(
        &[
            "finetune",
            "--resume",
            run2.to_str().unwrap(),
            "--lr",
            "0.5",
            "--quiet",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ignoring --lr"), "{stderr}");
    let last = String::from_utf8_lossy(&out.stdout);
    assert!(
        last.contains("best epoch ") && !last.contains("Some("),
        "{last}"
    );
}

#[cfg(unix)]
#[test]
fn symlinks_that_dangle_or_loop_are_reported_and_a_file_reached_twice_is_read_once() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    make_folder(&data, &["a", "b"], 4);
    std::os::unix::fs::symlink(data.join("a/nowhere.png"), data.join("a/dangling.png")).unwrap();
    std::os::unix::fs::symlink(data.join("b/loop.png"), data.join("b/loop.png")).unwrap();
    std::os::unix::fs::symlink(data.join("a/000.png"), data.join("a/again.png")).unwrap();
    let run = root.path().join("run");
    let out = graft(
        &strs(&with(flags(&data, &run, "1"), &["--val-split", "0"])),
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("dangling.png") && stderr.contains("loop.png"),
        "{stderr}"
    );
    assert!(
        stderr.contains("again.png") && stderr.contains("the same file as"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("8 train / 0 val"));
}
