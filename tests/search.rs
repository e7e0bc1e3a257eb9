//! `graft search` through the real binary on a tiny generated image folder: trials are real fine-tuning
//! runs of a small dense encoder on 8x8 images.

mod common;

use graft::search::{sqlite::SqliteStorage, Storage, TrialState};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SPACE: &str = r#"
[lr]
float = [1e-3, 1e-1]
log = true
[optimizer]
choice = ["adamw", "momentum"]
[momentum]
float = [0.5, 0.9]
when = { optimizer = "momentum" }
"#;

fn search_args<'a>(space: &'a str, data: &'a str, study: &'a str, trials: &'a str) -> Vec<&'a str> {
    vec![
        "search",
        "--space",
        space,
        "--base",
        "dense:256,16",
        "--data",
        data,
        "--trials",
        trials,
        "--sampler",
        "random",
        "--seed",
        "3",
        "--study",
        study,
        "--",
        "--image-size",
        "16",
        "--freeze-epochs",
        "0",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--val-split",
        "0.25",
        "--schedule",
        "constant",
    ]
}

fn trials(study: &Path) -> Vec<graft::search::TrialRecord> {
    SqliteStorage::open(study.join("study.sqlite"), "default")
        .unwrap()
        .trials()
        .unwrap()
}

#[test]
fn a_search_runs_its_trials_shows_them_and_survives_a_killed_worker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::make_folder(&data, &["a", "b"], 8);
    let space = dir.path().join("space.toml");
    std::fs::write(&space, SPACE).unwrap();
    let (space, data_s) = (space.to_str().unwrap(), data.to_str().unwrap());

    let study = dir.path().join("study");
    common::graft_ok(&search_args(space, data_s, study.to_str().unwrap(), "3"));
    let t = trials(&study);
    assert_eq!(t.len(), 3);
    assert!(t.iter().all(|t| t.state == TrialState::Complete), "{t:?}");
    assert!(
        t.iter().all(|t| t.intermediate.len() == 3),
        "one report per epoch"
    );
    let json = common::graft_ok(&[
        "search",
        "show",
        study.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let values: Vec<f64> = rows.iter().map(|r| r["value"].as_f64().unwrap()).collect();
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "best (lowest val_loss) first: {values:?}"
    );
    assert!(study.join("best-config.json").is_file());
    assert!(study.join("history.png").is_file() && study.join("params.png").is_file());
    assert!(common::graft_ok(&["search", "show", study.to_str().unwrap()]).contains("complete"));

    // Kill -9 a search while a trial runs, rerun it: exactly 5 trials, numbered 0..5, all finished.
    let killed = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(search_args(space, data_s, killed.to_str().unwrap(), "5"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let file = killed.join("study.sqlite");
        let running = file.is_file()
            && graft::search::sqlite::exists(&file, "default").unwrap_or(false)
            && trials(&killed)
                .iter()
                .any(|t| t.state == TrialState::Running && t.number >= 1);
        if running || t0.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        trials(&killed)
            .iter()
            .any(|t| t.state == TrialState::Running),
        "killed mid-trial"
    );
    common::graft_ok(&search_args(space, data_s, killed.to_str().unwrap(), "5"));
    let t = trials(&killed);
    let numbers: Vec<u64> = t.iter().map(|t| t.number).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4]);
    assert!(t.iter().all(|t| t.state == TrialState::Complete), "{t:?}");
    // The random sampler's trial k is the same whoever ran it.
    assert_eq!(
        t[..3].iter().map(|t| &t.params).collect::<Vec<_>>(),
        trials(&study).iter().map(|t| &t.params).collect::<Vec<_>>()
    );
}

#[test]
fn a_bad_space_or_flag_is_reported_before_any_trial_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::make_folder(&data, &["a", "b"], 4);
    let space = dir.path().join("space.toml");
    std::fs::write(&space, "[learning_rate]\nfloat = [0.1, 1.0]\n").unwrap();
    let study = dir.path().join("s");
    let args = search_args(
        space.to_str().unwrap(),
        data.to_str().unwrap(),
        study.to_str().unwrap(),
        "2",
    );
    let err = common::graft_err(&args, &[]);
    assert!(
        err.contains("learning_rate") && err.contains("lr_mult"),
        "{err}"
    );
    std::fs::write(&space, SPACE).unwrap();
    let mut args = search_args(
        space.to_str().unwrap(),
        data.to_str().unwrap(),
        study.to_str().unwrap(),
        "2",
    );
    args.extend(["--batch-size", "x"]);
    let err = common::graft_err(&args, &[]);
    assert!(err.contains("--batch-size"), "{err}");
}
