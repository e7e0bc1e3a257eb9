//! The CPU-side parts of `scripts/gpu-check.sh` (argument handling, the dry run's step list, the JSON it
//! writes), run for real in a temp dir: the GPU steps themselves need a GPU and are not run here.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn gpu_check(args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("bash runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn summary(dir: &Path) -> Value {
    let path = dir.join("gpu-check.json");
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&raw)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}):\n{raw}", path.display()))
}

#[test]
fn dry_run_lists_every_step_and_writes_a_plan() {
    let dir = tempfile::tempdir().unwrap();
    let out = gpu_check(&["--dry-run", "--out", dir.path().to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let steps = ["env", "build", "golden", "finetune", "bench"];
    for s in steps {
        assert!(
            stdout.contains(&format!("step {s}: ")),
            "step {s} missing:\n{stdout}"
        );
    }
    assert!(stdout.contains("GRAFT_TEST_DEVICE=cuda"), "{stdout}");
    let plan = summary(dir.path());
    assert_eq!(plan["dry_run"], true);
    let listed: Vec<&str> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(listed, steps);
    assert!(plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "planned"));
}

#[test]
fn only_and_skip_select_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = gpu_check(&[
        "--dry-run",
        "--out",
        d,
        "--only",
        "golden,bench",
        "--skip",
        "bench",
    ]);
    assert!(out.status.success());
    let plan = summary(dir.path());
    let steps = plan["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{plan}");
    assert_eq!(steps[0]["step"], "golden");
}

#[test]
fn an_unknown_step_or_flag_is_an_error_that_names_it() {
    for args in [&["--dry-run", "--only", "warp"][..], &["--frobnicate"][..]] {
        let out = gpu_check(args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(args.last().unwrap()), "{args:?}: {stderr}");
    }
}

#[test]
fn the_env_step_runs_anywhere_and_writes_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = gpu_check(&["--only", "env", "--out", dir.path().to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let step: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("env.json")).unwrap())
            .unwrap();
    assert_eq!(step["status"], "ok");
    assert!(step["nproc"].as_u64().unwrap() >= 1);
    let all = summary(dir.path());
    assert_eq!(all["dry_run"], false);
    assert_eq!(all["steps"][0]["step"], "env");
}
