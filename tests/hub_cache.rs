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

/// `--base timm/ARCH.TAG`: graft's architecture `ARCH`, the weights of that hub repo, and the
/// preprocessing of the repo's `config.json` (timm's `pretrained_cfg`), all from the hub cache.
#[test]
fn a_timm_hub_name_resolves_with_its_repos_preprocessing() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--timm--resnet18.tv_in1k");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(resnet18_weights(), snap.join("model.safetensors")).unwrap();
    std::fs::write(
        snap.join("config.json"),
        r#"{"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": {"tag": "tv_in1k",
            "input_size": [3, 160, 160], "crop_pct": 0.95, "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}"#,
    )
    .unwrap();
    let home = tmp.path().to_str().unwrap();
    let env = [
        ("HF_HOME", home),
        ("HF_HUB_OFFLINE", "1"),
        ("GRAFT_CACHE", home),
    ];
    let out = graft(&["inspect", "--base", "timm/resnet18.tv_in1k"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("input 160x160"), "{stdout}");
    assert!(
        stdout.contains("timm/resnet18.tv_in1k/model.safetensors"),
        "{stdout}"
    );
    assert!(stdout.contains("loaded 102 tensors"), "{stdout}");
    // An architecture graft does not build, and a config.json of another architecture, are named.
    let err = graft_err(&["inspect", "--base", "timm/vgg16.tv_in1k"], &env);
    assert!(err.contains("vgg16") && err.contains("resnet18"), "{err}");
    std::fs::write(
        snap.join("config.json"),
        r#"{"architecture": "resnet50", "pretrained_cfg": {"input_size": [3, 224, 224]}}"#,
    )
    .unwrap();
    let err = graft_err(&["inspect", "--base", "timm/resnet18.tv_in1k"], &env);
    assert!(
        err.contains("config.json") && err.contains("resnet50"),
        "{err}"
    );
}
