//! `graft predict`: top-k classes for each image.

use super::BaseArgs;
use crate::data::Tta;
use crate::models::pretrained::Pretrained;
use anyhow::{bail, Context};
use candle_core::Tensor;
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub base: BaseArgs,
    /// A deployment file written by `graft export` (instead of --base).
    #[arg(long, conflicts_with_all = ["base", "weights"])]
    pub model: Option<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Test-time augmentation: classify each image from the mean softmax probabilities of its views.
    #[arg(long, value_enum, default_value_t = Tta::None)]
    pub tta: Tta,
    /// Output format: human-readable text, or one JSON object per image.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// What convolutions and linear layers multiply in: f32, or bf16 (bf16 inputs, f32 sums).
    #[arg(long, default_value = "f32")]
    pub precision: crate::kernels::precision::Precision,
    /// Images to classify.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
pub enum Format {
    Text,
    Json,
}

/// One predicted class.
#[derive(Debug, Serialize)]
pub struct Top {
    pub index: usize,
    pub class: String,
    pub prob: f32,
}

/// The `--format json` record for one image.
#[derive(Debug, Serialize)]
pub struct Prediction {
    pub path: String,
    /// The test-time augmentation the probabilities average over.
    pub tta: Tta,
    pub top: Vec<Top>,
}

/// The `k` most likely classes of each row of `probs` (`[N, K]` `f32` probabilities).
pub fn top_k(probs: &Tensor, classes: &[String], k: usize) -> anyhow::Result<Vec<Vec<Top>>> {
    let rows: Vec<Vec<f32>> = probs.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            idx.into_iter()
                .take(k)
                .map(|i| Top {
                    index: i,
                    class: classes.get(i).cloned().unwrap_or_else(|| i.to_string()),
                    prob: row[i],
                })
                .collect()
        })
        .collect())
}

/// Prints predictions in the chosen format.
pub fn print_predictions(preds: &[Prediction], format: Format) -> anyhow::Result<()> {
    for p in preds {
        match format {
            Format::Json => println!("{}", serde_json::to_string(p)?),
            Format::Text => {
                match p.tta {
                    Tta::None => println!("{}", p.path),
                    tta => println!("{}  (--tta {})", p.path, tta.name()),
                }
                for t in &p.top {
                    println!("  {:>6.2}%  {:>4}  {}", t.prob * 100.0, t.index, t.class);
                }
            }
        }
    }
    Ok(())
}

/// The two kinds of model predict runs: a pretrained base with its ImageNet classifier, or an export.
enum Model {
    Base(Box<Pretrained>),
    Export(Box<crate::models::classifier::Classifier>),
}

impl Model {
    fn preprocess(&self) -> &crate::data::Preprocess {
        match self {
            Model::Base(m) => m.preprocess(),
            Model::Export(m) => &m.spec.preprocess,
        }
    }
    fn classes(&self) -> &[String] {
        match self {
            Model::Base(m) => &m.classes,
            Model::Export(m) => &m.spec.classes,
        }
    }
    /// The file the weights came from, for error messages.
    fn source<'a>(&'a self, export: Option<&'a std::path::Path>) -> &'a std::path::Path {
        match self {
            Model::Base(m) => &m.report.file,
            Model::Export(_) => export.unwrap_or(std::path::Path::new("<model>")),
        }
    }
    fn logits(&self, x: &Tensor) -> crate::Result<Tensor> {
        match self {
            Model::Base(m) => m.logits(x),
            Model::Export(m) => m.predict(x),
        }
    }
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    crate::kernels::precision::autocast(args.precision, || predict(args))
}

/// [`run`] inside its precision scope.
fn predict(args: PredictArgs) -> anyhow::Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let device = crate::device::parse_device(&args.base.device)?;
    let model = match (&args.model, args.base.base.as_deref()) {
        (Some(path), _) => Model::Export(Box::new(
            crate::export::load_model(path, &device)
                .with_context(|| format!("loading model {}", path.display()))?,
        )),
        (None, Some(base)) => {
            let card = crate::models::base::card_for(base)?;
            Model::Base(Box::new(
                Pretrained::load(&card, args.base.weights.as_deref(), &device)
                    .with_context(|| format!("loading base `{base}`"))?,
            ))
        }
        (None, None) => bail!("give --base NAME (e.g. --base resnet18) or --model FILE"),
    };
    let mut preds = Vec::new();
    let (mut failed, mut non_finite) = (0, 0);
    for path in &args.images {
        let views = match crate::data::load_tta_tensor(path, model.preprocess(), args.tta, &device)
        {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        let logits = crate::kernels::par::on_pool(|| model.logits(&views))?;
        // NaN or infinite logits give `NaN%` scores; that is an error for this image, not a prediction.
        if !crate::formats::finite::non_finite_rows(&logits)?.is_empty() {
            let e = crate::Error::NonFiniteOutput {
                model: model.source(args.model.as_deref()).to_path_buf(),
                input: path.display().to_string(),
            };
            eprintln!("error: {e}");
            non_finite += 1;
            continue;
        }
        let probs = args.tta.mean_probs(&logits)?;
        let top = top_k(&probs, model.classes(), args.top_k)?.remove(0);
        preds.push(Prediction {
            path: path.display().to_string(),
            tta: args.tta,
            top,
        });
    }
    print_predictions(&preds, args.format)?;
    let n = args.images.len();
    match (failed, non_finite) {
        (0, 0) => {}
        (f, 0) => bail!("{f} of {n} images could not be read"),
        (0, b) => bail!("{b} of {n} images gave NaN or infinite scores"),
        (f, b) => bail!("{f} of {n} images could not be read and {b} gave NaN or infinite scores"),
    }
    Ok(())
}
