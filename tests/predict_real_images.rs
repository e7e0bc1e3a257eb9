//! `graft predict` with the real ImageNet EfficientNet-Lite0 weights (fetched by
//! scripts/fetch-efficientnet-lite0.sh into graft's cache) and the model card's preprocessing, on the
//! photographs in ../shared/golden/images: chelsea is a tiger cat (282), coffee an espresso (967).

mod common;

use common::{golden, graft_ok};

#[test]
fn efficientnet_lite0_sees_a_cat_and_an_espresso() {
    let weights = graft::models::hub::cached_weights_path("efficientnet_lite0");
    assert!(
        weights.is_file(),
        "{} is missing: run scripts/fetch-efficientnet-lite0.sh first",
        weights.display()
    );
    let images = golden().join("images");
    let chelsea = images.join("chelsea.png");
    let coffee = images.join("coffee.png");
    let out = graft_ok(&[
        "predict",
        "--base",
        "efficientnet_lite0",
        "--format",
        "json",
        "--top-k",
        "5",
        chelsea.to_str().unwrap(),
        coffee.to_str().unwrap(),
    ]);
    let preds: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 2);
    let top1 = |p: &serde_json::Value| p["top"][0]["index"].as_u64().unwrap();
    assert_eq!(top1(&preds[0]), 282, "chelsea: {}", preds[0]);
    assert_eq!(preds[0]["top"][0]["class"], "tiger cat");
    assert_eq!(top1(&preds[1]), 967, "coffee: {}", preds[1]);
    let p = preds[1]["top"][0]["prob"].as_f64().unwrap();
    assert!(p > 0.9, "espresso probability {p} (PyTorch: about 0.95)");
}
