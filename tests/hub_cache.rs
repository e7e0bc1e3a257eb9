//! `--base resnet18` resolves through the real hf-hub code against a hub cache folder laid out as the
//! hub lays it out (models--timm--resnet18.a1_in1k/{refs/main, snapshots/<commit>/model.safetensors}), with
//! the network unreachable.

mod common;

use common::{graft, graft_err, resnet18_weights};

fn lay_out_hub_cache(hf_home: &std::path::Path) {
    let repo = hf_home.join("hub/models--timm--resnet18.a1_in1k");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(resnet18_weights(), snap.join("model.safetensors")).unwrap();
}

#[test]
fn base_resnet18_resolves_from_the_hub_cache_with_no_network() {
    let tmp = tempfile::tempdir().unwrap();
    lay_out_hub_cache(tmp.path());
    let home = tmp.path().to_str().unwrap();
    // An endpoint nothing listens on: any attempt to reach the network would fail.
    let env = [
        ("HF_HOME", home),
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ("GRAFT_CACHE", home),
    ];
    let out = graft(&["inspect", "--base", "resnet18"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("timm/resnet18.a1_in1k"), "{stdout}");
    assert!(stdout.contains("loaded 102 tensors"), "{stdout}");
    // Offline mode reads the same cache.
    let offline = [
        ("HF_HOME", home),
        ("HF_HUB_OFFLINE", "1"),
        ("GRAFT_CACHE", home),
    ];
    assert!(graft(&["inspect", "--base", "resnet18"], &offline)
        .status
        .success());
}

#[test]
fn an_empty_cache_offline_says_where_it_looked() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().to_str().unwrap();
    let env = [
        ("HF_HOME", home),
        ("HF_HUB_OFFLINE", "1"),
        ("GRAFT_CACHE", home),
    ];
    let err = graft_err(&["inspect", "--base", "resnet34"], &env);
    assert!(
        err.contains("timm/resnet34.a1_in1k") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
