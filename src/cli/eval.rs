//! `graft eval --model model.safetensors --data DIR`: accuracy, confusion matrix, per-class scores.

use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};

use crate::data::{Dataset, ImageFolder, Loader, LoaderConfig, Sample, Tta};
use candle_core::Tensor;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A deployment file written by `graft export`.
    #[arg(long)]
    pub model: PathBuf,
    /// Image folder: DIR/<class>/..., or DIR/{train,val,test}/<class>/...
    #[arg(long)]
    pub data: PathBuf,
    /// Which images: `all` (a plain class folder), or `test`, `val`, `train` of a split folder. Default:
    /// test if there is one, else val if there is a val folder, else all. A folder holding split folders
    /// without `train/` (only `test/`, say) is read split by split: `test` is never taken for a class.
    #[arg(long)]
    pub split: Option<String>,
    /// Images per forward pass; with `--tta` each brings its views, so a pass holds up to
    /// batch size x views inputs.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Test-time augmentation: classify each image from the mean softmax probabilities of its views.
    #[arg(long, value_enum, default_value_t = Tta::None)]
    pub tta: Tta,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What convolutions and linear layers multiply in: f32, or bf16 (bf16 inputs, f32 sums).
    #[arg(long, default_value = "f32")]
    pub precision: crate::kernels::precision::Precision,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    crate::kernels::precision::autocast(args.precision, || evaluate(args))
}

/// [`run`] inside its precision scope.
fn evaluate(args: EvalArgs) -> anyhow::Result<()> {
    let device = crate::device::parse_device(&args.device)?;
    let model = crate::export::load_model(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let (split, ds, samples) = read_split(&args.data, args.split.as_deref())?;
    // Map the folder's class names onto the model's label order.
    let classes = &model.spec.classes;
    let mut to_model = Vec::new();
    for name in &ds.classes {
        match classes.iter().position(|c| c == name) {
            Some(i) => to_model.push(i),
            None => bail!(
                "class `{name}` of {} is not one of the model's classes ({})",
                args.data.display(),
                classes.join(", ")
            ),
        }
    }
    let samples: Vec<Sample> = samples
        .into_iter()
        .map(|s| Sample {
            label: to_model[s.label],
            ..s
        })
        .collect();
    let paths: Vec<PathBuf> = samples.iter().map(|s| s.path.clone()).collect();
    let loader = Loader::new(
        samples,
        classes.len(),
        model.spec.preprocess.clone(),
        LoaderConfig {
            tta: args.tta,
            ..LoaderConfig::eval(args.batch_size)
        },
        &device,
    )?;
    // NaN or infinite logits would count as some class and print `NaN` losses: refuse them instead.
    let batches = loader
        .epoch(0)
        .map(|batch| -> crate::Result<(Tensor, Tensor)> {
            let batch = batch?;
            let logits = crate::kernels::par::on_pool(|| model.predict(&batch.images))?;
            if let Some(&row) = crate::formats::finite::non_finite_rows(&logits)?.first() {
                let sample = batch.indices.get(row / args.tta.views());
                let image = sample.and_then(|&i| paths.get(i));
                return Err(crate::Error::NonFiniteOutput {
                    model: args.model.clone(),
                    input: image.map_or_else(
                        || format!("a batch of {split} images"),
                        |p| p.display().to_string(),
                    ),
                });
            }
            Ok((args.tta.scores(&logits)?, batch.labels))
        });
    let (stats, cm) = crate::train::evaluate::classification(classes.len(), batches, |_, _, _| {})?;
    let seen = stats.samples() as usize;
    let loss = stats.loss();
    let skipped = loader.skipped();
    if seen == 0 {
        bail!("no readable images in {} ({split})", args.data.display());
    }
    if args.json {
        let per_class: Vec<_> = cm
            .all_scores()
            .iter()
            .zip(classes)
            .map(|(s, c)| serde_json::json!({"class": c, "precision": s.precision, "recall": s.recall, "f1": s.f1, "support": s.support}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"split": split, "tta": args.tta, "images": seen, "skipped": skipped.len(), "accuracy": cm.accuracy(), "loss": loss, "per_class": per_class})
        );
    } else {
        println!(
            "{} images ({split}) of {}{}: accuracy {:.2}%, loss {:.4}{}",
            seen,
            args.data.display(),
            match args.tta {
                Tta::None => String::new(),
                tta => format!(" with --tta {}", tta.name()),
            },
            cm.accuracy() * 100.0,
            loss,
            if skipped.is_empty() {
                String::new()
            } else {
                format!(", {} unreadable images skipped", skipped.len())
            }
        );
        println!("{}", cm.render(classes));
    }
    Ok(())
}

/// The split folder names `split` can mean under a data folder, in the order they are looked for.
fn split_names(split: &str) -> &'static [&'static str] {
    match split {
        "train" => &["train"],
        "val" => &["val", "valid", "validation"],
        "test" => &["test"],
        _ => &[],
    }
}

/// Resolves `--split` (`None`: the default) on `data` into the split's name, the dataset it was read from and
/// its samples. With `data/train/`, the folder is read as [`ImageFolder`] reads split folders. Without it,
/// `data` is either a plain class folder (split `all`) or holds split folders on their own (`test/` only,
/// say); each such folder is then read as a class folder by itself, so that `test` is not taken for a class
/// of a plain folder. The default split is `test` where there is one, else `val`, else `all`.
fn read_split(data: &Path, split: Option<&str>) -> anyhow::Result<(String, Dataset, Vec<Sample>)> {
    if let Some(other) = split.filter(|s| !matches!(*s, "all" | "train" | "val" | "test")) {
        bail!("--split: `{other}` is not all|train|val|test");
    }
    let folder_of = |split: &str| {
        split_names(split)
            .iter()
            .map(|n| data.join(n))
            .find(|p| p.is_dir())
    };
    if folder_of("train").is_some() {
        let ds = ImageFolder::open(data, 0.0, 0)?;
        let split = split.map(str::to_string).unwrap_or_else(|| {
            if ds.test.is_some() {
                "test".into()
            } else if ds.val_from_folder {
                "val".into()
            } else {
                "all".into()
            }
        });
        let samples = match split.as_str() {
            "all" | "train" => ds.train.clone(),
            "val" => ds.val.clone(),
            _ => ds
                .test
                .clone()
                .context("--split test: the data folder has no test/ folder")?,
        };
        return Ok((split, ds, samples));
    }
    let split = split.map(str::to_string).unwrap_or_else(|| {
        ["test", "val"]
            .into_iter()
            .find(|s| folder_of(s).is_some())
            .unwrap_or("all")
            .to_string()
    });
    let root = match split.as_str() {
        "all" => data.to_path_buf(),
        s => folder_of(s).with_context(|| {
            format!(
                "--split {s}: {} has no {} folder",
                data.display(),
                split_names(s).join("/ or ") + "/"
            )
        })?,
    };
    let ds = ImageFolder::open(&root, 0.0, 0)?;
    let samples = ds.train.clone();
    Ok((split, ds, samples))
}
