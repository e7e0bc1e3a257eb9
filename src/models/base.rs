//! What `--base` names: a model card (`resnet18`), an encoder from random initialisation (`dense:784,300,150`,
//! `conv:32,64,128`), or the encoder of a `graft pretrain` run (`ae:RUN_DIR`). [`resolve`] turns each into
//! the architecture to build, its preprocessing and where its weights come from, so fine-tuning treats all
//! three alike and a comparison between pretrained and random initialisation is one flag away.

use crate::data::Preprocess;
use crate::formats::weights::{self, WeightFile};
use crate::models::card::{self, ModelCard};
use crate::models::encoder::EncoderConfig;
use crate::{Error, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File of a pretraining run that holds the encoder's weights (keys `stage1.weight`, ...).
pub const ENCODER_WEIGHTS: &str = "encoder.safetensors";
/// File of a pretraining run that says how to rebuild and feed the encoder.
pub const ENCODER_INFO: &str = "encoder.json";
/// Prefix of `--base` values that name a pretraining run.
pub const AE_PREFIX: &str = "ae:";
/// Prefix of `--base` values that name a timm model on the hub (`timm/convnext_tiny.fb_in22k_ft_in1k`).
pub const TIMM_PREFIX: &str = "timm/";

/// What a pretraining run writes beside its encoder weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderInfo {
    /// Canonical encoder arch string (`dense:784,300,150:selu`).
    pub arch: String,
    /// The preprocessing the encoder was trained with.
    pub preprocess: Preprocess,
    /// `autoencoder` or `rbm`, for reports.
    pub method: String,
}

/// Where a base's starting weights come from.
#[derive(Debug, Clone)]
pub enum BaseWeights {
    /// The card's hub or package weights (or a local file given with `--weights`).
    Card(Box<ModelCard>),
    /// A pretraining run's encoder.
    File(PathBuf),
    /// Random initialisation only.
    None,
}

/// A resolved `--base`.
#[derive(Debug, Clone)]
pub struct Base {
    /// The name as given, for reports and the classifier spec.
    pub name: String,
    /// Architecture for [`crate::models::build_backbone`].
    pub arch: String,
    /// Default evaluation preprocessing.
    pub preprocess: Preprocess,
    /// Default dropout of a new head (the card's; 0 for encoders).
    pub head_dropout: f32,
    pub weights: BaseWeights,
}

/// Resolves `--base NAME`: a card name, a timm hub name (`timm/ARCH.TAG`), `dense:...`/`conv:...`, or
/// `ae:RUN_DIR`.
pub fn resolve(name: &str) -> Result<Base> {
    if let Some(dir) = name.strip_prefix(AE_PREFIX) {
        let dir = Path::new(dir);
        let info_path = dir.join(ENCODER_INFO);
        let weights = dir.join(ENCODER_WEIGHTS);
        if !info_path.is_file() || !weights.is_file() {
            return Err(Error::bad_file(
                dir,
                format!(
                    "not a finished `graft pretrain` run: {ENCODER_INFO} and {ENCODER_WEIGHTS} are needed"
                ),
            ));
        }
        let text = std::fs::read_to_string(&info_path).map_err(|e| Error::io(&info_path, e))?;
        let info: EncoderInfo =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&info_path, e.to_string()))?;
        EncoderConfig::parse(&info.arch)?;
        return Ok(Base {
            name: name.to_string(),
            arch: info.arch,
            preprocess: info.preprocess,
            head_dropout: 0.0,
            weights: BaseWeights::File(weights),
        });
    }
    if EncoderConfig::is_encoder_arch(name) {
        let cfg = EncoderConfig::parse(name)?;
        // A dense input that is no image size is reported when the preprocessing is checked.
        let (channels, size) = match cfg.implied_input() {
            Some(input) => input,
            None if cfg.is_dense() => (1, 28),
            None => (cfg.widths()[0], 28),
        };
        return Ok(Base {
            name: name.to_string(),
            arch: cfg.arch(),
            preprocess: Preprocess::unit(size, channels),
            head_dropout: 0.0,
            weights: BaseWeights::None,
        });
    }
    let card = card_for(name)?;
    Ok(Base {
        name: card.name.clone(),
        arch: card.arch.clone(),
        preprocess: card.preprocess.clone(),
        head_dropout: card.head_dropout,
        weights: BaseWeights::Card(Box::new(card)),
    })
}

/// The model card `--base NAME` means: a shipped card by name, or [`timm_hub_card`] for `timm/ARCH.TAG`.
pub fn card_for(name: &str) -> Result<ModelCard> {
    if name.starts_with(TIMM_PREFIX) {
        timm_hub_card(name)
    } else {
        card::card(name)
    }
}

/// timm's `pretrained_cfg`, as its hub repos carry it in `config.json` (only what graft reads).
#[derive(Debug, Deserialize)]
struct TimmPretrainedCfg {
    input_size: Vec<usize>,
    crop_pct: Option<f64>,
    interpolation: Option<crate::data::Interpolation>,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
}

#[derive(Debug, Deserialize)]
struct TimmHubConfig {
    architecture: Option<String>,
    pretrained_cfg: Option<TimmPretrainedCfg>,
}

/// The card for a timm hub name `timm/ARCH.TAG`, as timm's `create_model("hf-hub:timm/ARCH.TAG")` sees it:
/// graft's card of architecture `ARCH` (its groups, head and dropout), with the weights of that repo and
/// the preprocessing of the repo's `config.json` where the hub cache has it (tags of one architecture are
/// trained at different sizes and crops); without it, the card's own preprocessing.
pub fn timm_hub_card(name: &str) -> Result<ModelCard> {
    let model = name.strip_prefix(TIMM_PREFIX).unwrap_or(name);
    let arch = model.split('.').next().unwrap_or_default();
    let cards = card::all_cards();
    let mut card = cards
        .iter()
        .find(|c| c.arch == arch && !arch.is_empty())
        .cloned()
        .ok_or_else(|| {
            let mut archs: Vec<&str> = cards.iter().map(|c| c.arch.as_str()).collect();
            archs.dedup();
            Error::config(
                format!("--base {name}"),
                format!(
                    "graft has no architecture `{arch}` (timm/ARCH.TAG, ARCH one of: {})",
                    archs.join(", ")
                ),
            )
        })?;
    card.name = name.to_string();
    card.weights = card::WeightsSource {
        hub: Some(card::HubFile {
            repo: name.to_string(),
            file: "model.safetensors".into(),
        }),
        pypi: None,
    };
    if let Ok(path) = crate::models::hub::hub_get(name, "config.json") {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg: TimmHubConfig =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e.to_string()))?;
        if let Some(a) = cfg.architecture.as_deref().filter(|a| *a != arch) {
            return Err(Error::bad_file(
                &path,
                format!("architecture `{a}`, but `--base {name}` names `{arch}`"),
            ));
        }
        if let Some(p) = cfg.pretrained_cfg {
            let size = match p.input_size.as_slice() {
                [3, h, w] if h == w && *h > 0 => *h,
                other => {
                    return Err(Error::bad_file(
                        &path,
                        format!("pretrained_cfg.input_size {other:?} is not [3, S, S]"),
                    ))
                }
            };
            let pre = &mut card.preprocess;
            pre.input_size = size;
            pre.crop_pct = p.crop_pct.unwrap_or(pre.crop_pct);
            pre.interpolation = p.interpolation.unwrap_or(pre.interpolation);
            pre.mean = p.mean.unwrap_or(pre.mean);
            pre.std = p.std.unwrap_or(pre.std);
        }
    }
    Ok(card)
}

impl Base {
    /// The backbone's layer groups in forward order (without the head).
    pub fn group_names(&self) -> Result<Vec<String>> {
        match &self.weights {
            BaseWeights::Card(card) => Ok(card
                .groups
                .iter()
                .filter(|g| g.as_str() != "head")
                .cloned()
                .collect()),
            _ => {
                let cfg = EncoderConfig::parse(&self.arch)?;
                Ok((1..=cfg.stages()).map(|i| format!("stage{i}")).collect())
            }
        }
    }

    /// Checks that inputs preprocessed by `p` fit the architecture (an encoder's input size and channels).
    pub fn check_preprocess(&self, p: &Preprocess) -> Result<()> {
        if EncoderConfig::is_encoder_arch(&self.arch) {
            EncoderConfig::parse(&self.arch)?.check_input(p.channels, p.input_size)?;
        }
        Ok(())
    }

    /// Redraws a random-init encoder's weights with a generator seeded by `seed`, so that a run from random
    /// initialisation is reproducible (candle's initialisers draw from an unseeded generator). Card
    /// architectures keep their initialisation.
    pub fn seed_random_init(&self, varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
        if EncoderConfig::is_encoder_arch(&self.arch) {
            crate::models::encoder::seeded_init(&EncoderConfig::parse(&self.arch)?, varmap, seed)?;
        }
        Ok(())
    }

    /// The starting weights: the card's (or `local` instead), the pretraining run's encoder, or `None` for
    /// an architecture without weights (random initialisation).
    pub fn read_weights(
        &self,
        local: Option<&Path>,
        device: &Device,
    ) -> Result<Option<WeightFile>> {
        let path = match (&self.weights, local) {
            (BaseWeights::Card(card), local) => {
                crate::models::hub::resolve_or_local(card, local)?.path
            }
            (_, Some(local)) => local.to_path_buf(),
            (BaseWeights::File(p), None) => p.clone(),
            (BaseWeights::None, None) => return Ok(None),
        };
        Ok(Some(weights::read_weights(&path, device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_arch_bases_imply_their_input_and_have_no_weights() {
        let b = resolve("dense:784,300,150").unwrap();
        assert_eq!(b.arch, "dense:784,300,150:selu");
        assert_eq!((b.preprocess.channels, b.preprocess.input_size), (1, 28));
        assert!(matches!(b.weights, BaseWeights::None));
        assert_eq!(b.group_names().unwrap(), vec!["stage1", "stage2"]);
        let c = resolve("conv:8,16:rgb").unwrap();
        assert_eq!(c.preprocess.channels, 3);
        let bad = crate::data::Preprocess::unit(32, 1);
        let msg = b.check_preprocess(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("dense:784,300,150") && msg.contains("32x32"),
            "{msg}"
        );
    }

    #[test]
    fn card_names_still_resolve_and_unknown_ones_list_the_cards() {
        let b = resolve("resnet18").unwrap();
        assert_eq!(b.arch, "resnet18");
        assert!(b.group_names().unwrap().contains(&"layer4".to_string()));
        assert!(resolve("resnet19")
            .unwrap_err()
            .to_string()
            .contains("resnet18"));
    }

    #[test]
    fn an_ae_base_must_be_a_finished_pretraining_run() {
        let dir = std::env::temp_dir().join(format!("graft-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let msg = resolve(&format!("ae:{}", dir.display()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains(ENCODER_INFO), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
