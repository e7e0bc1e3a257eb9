//! CPU throughput and peak memory of the three things fine-tuning does, for ResNet-18,
//! EfficientNet-Lite0, ConvNeXt-Atto, ConvNeXt-Tiny and ViT-S/16, as JSON lines that `scripts/bench-pytorch.py` prints the same way for PyTorch
//! (`scripts/bench.sh` runs both and prints the ratio table).
//!
//! ```text
//! cargo bench --bench train_step                      # every configuration below
//! cargo bench --bench train_step -- resnet18 224 train   # filters: any of model, size, mode
//! ```
//! Modes, each at batch 16 (`GRAFT_BENCH_BATCH`):
//! - `forward`: inference, no autograd graph (`Mode::Frozen` over every group, as `torch.no_grad()`);
//! - `train`: a full training step: `Mode::Train` forward, cross-entropy, backward, SGD momentum step;
//! - `frozen`: a frozen-backbone step: the backbone runs frozen, only the classifier is trained.
//!
//! Each configuration runs in a fresh process (this binary again, with `--one`), so the peak resident
//! memory (`VmHWM`) it reports is that configuration's alone. One warm-up batch, then `GRAFT_BENCH_ITERS`
//! (default 5) timed batches; images/s is the batch size over the median batch time. The weights are a
//! fresh initialisation: the cost is the same as with pretrained ones. Without `--bench` (as under
//! `cargo test --all-targets`) it makes one tiny smoke run of each model and mode instead of timing.

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use graft::kernels::precision::{autocast, Precision};
use graft::models::efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
use graft::models::effnet::EffNetConfig;
use graft::models::layers::{linear, Linear};
use graft::models::resnet::{ResNet, ResNetConfig};
use graft::models::vit::VitConfig;
use graft::models::{build_backbone, Backbone, Mode};
use graft::optim::{groups, OptimizerConfig};
use std::process::Command;
use std::time::Instant;

/// The allocator of the `graft` binary (see src/main.rs), with its settings (`main`), so the numbers are
/// the ones users get.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MODELS: [&str; 7] = [
    "resnet18",
    "efficientnet_lite0",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "convnext_atto",
    "convnext_tiny",
    "vit_small_patch16_224",
];
const SIZES: [usize; 2] = [128, 224];
const MODES: [&str; 3] = ["forward", "train", "frozen"];
const CLASSES: usize = 1000;

/// A network with a classifier, behind one call: logits in `mode` with `frozen` groups frozen.
enum Net {
    Residual(Box<ResNet>),
    Lite(Box<EfficientNetLite>),
    /// Any other backbone of `graft::models::build_backbone`, with a linear classifier on its features.
    Other(Box<dyn Backbone>, Linear),
}

impl Net {
    fn build(model: &str, vb: VarBuilder) -> graft::Result<Net> {
        Ok(
            if model.starts_with("convnext")
                || EffNetConfig::is_arch(model)
                || VitConfig::is_arch(model)
            {
                let backbone = build_backbone(model, vb.clone())?;
                let fc = linear(
                    backbone.feature_dim(),
                    CLASSES,
                    vb.pp(backbone.classifier_prefix()),
                )?;
                Net::Other(backbone, fc)
            } else if model.starts_with("resnet") {
                Net::Residual(Box::new(ResNet::with_classifier(
                    ResNetConfig::from_arch(model)?,
                    CLASSES,
                    vb,
                )?))
            } else {
                Net::Lite(Box::new(EfficientNetLite::with_classifier(
                    EfficientNetLiteConfig::from_arch(model)?,
                    CLASSES,
                    vb,
                )?))
            },
        )
    }

    fn groups(&self) -> usize {
        match self {
            Net::Residual(n) => n.group_names().len(),
            Net::Lite(n) => n.group_names().len(),
            Net::Other(n, _) => n.group_names().len(),
        }
    }

    fn logits(&self, x: &Tensor, mode: Mode, frozen: usize) -> graft::Result<Tensor> {
        match self {
            Net::Residual(n) => n.forward_logits(x, mode, frozen),
            Net::Lite(n) => n.forward_logits(x, mode, frozen),
            Net::Other(n, fc) => fc.forward(&n.forward_features(x, mode, frozen)?, mode),
        }
    }
}

/// Peak resident set size of this process in MiB (`VmHWM`), if the kernel reports it.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.)
}

/// Runs one configuration in this process and prints its JSON line.
fn run_one(model: &str, size: usize, mode: &str, batch: usize, iters: usize) -> anyhow::Result<()> {
    // GRAFT_BENCH_DEVICE (default cpu): `cuda` runs the same steps on the GPU (a `--features cuda` build).
    let device_name = std::env::var("GRAFT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = graft::device::parse_device(&device_name)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let net = Net::build(model, vb)?;
    let all = net.groups();
    let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i * 37 % CLASSES as u32).collect();
    let labels = Tensor::new(labels.as_slice(), &dev)?;
    let mut opt = OptimizerConfig::from_kind("momentum")?
        .build(groups::no_decay_groups(groups::trainable_params(&varmap)))?;
    let mut step = || -> graft::Result<()> {
        match mode {
            "forward" => {
                net.logits(&x, Mode::Frozen, all)?;
            }
            "train" | "frozen" => {
                let (m, frozen) = if mode == "train" {
                    (Mode::Train, 0)
                } else {
                    (Mode::Train, all)
                };
                let logits = net.logits(&x, m, frozen)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                let grads = loss.backward()?;
                opt.step(&grads, 0.01)?;
            }
            other => {
                return Err(graft::Error::config(
                    "bench mode",
                    format!("`{other}` is not one of {MODES:?}"),
                ))
            }
        }
        Ok(())
    };
    // Each step on the thread pool, as `graft finetune` runs it (see `graft::kernels::par::on_pool`),
    // in the precision GRAFT_BENCH_PRECISION names (f32 unless set; `bf16` as `--precision bf16`).
    // On a GPU the ops only queue work: each timed step ends when the device has finished it.
    let precision: Precision = std::env::var("GRAFT_BENCH_PRECISION")
        .unwrap_or_else(|_| "f32".into())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let mut step = || {
        autocast(precision, || graft::kernels::par::on_pool(&mut step))?;
        Ok::<(), graft::Error>(dev.synchronize()?)
    };
    step()?; // warm-up
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            step().map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<graft::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let json = serde_json::json!({
        "framework": match precision {
            Precision::F32 => "graft",
            Precision::Bf16 => "graft-bf16",
        },
        "precision": precision.name(),
        "model": model,
        "size": size,
        "batch": batch,
        "mode": mode,
        "device": device_name,
        "images_per_s": (batch as f64 / median * 10.).round() / 10.,
        "ms_per_batch": (median * 1e4).round() / 10.,
        "peak_rss_mib": peak_rss_mib().map(|m| m.round() as u64),
        "iters": times.len(),
        "threads": rayon::current_num_threads(),
    });
    println!("{json}");
    Ok(())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    graft::alloc::keep_freed_memory(); // as the `graft` binary does
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let get = |k: usize| args.get(i + k).cloned().unwrap_or_default();
        let size = get(2).parse().unwrap_or(224);
        let batch = get(4).parse().unwrap_or(16);
        let iters = get(5).parse().unwrap_or(5);
        return run_one(&get(1), size, &get(3), batch, iters);
    }
    let timing = args.iter().any(|a| a == "--bench");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let keep = |s: &str| filters.is_empty() || filters.iter().any(|f| *f == s);
    let (batch, iters, sizes) = if timing {
        (
            env_usize("GRAFT_BENCH_BATCH", 16),
            env_usize("GRAFT_BENCH_ITERS", 5),
            SIZES.to_vec(),
        )
    } else {
        (2, 1, vec![32])
    };
    let exe = std::env::current_exe()?;
    for model in MODELS.iter().filter(|m| keep(m)) {
        for size in sizes.iter().filter(|s| keep(&s.to_string())) {
            for mode in MODES.iter().filter(|m| keep(m)) {
                let status = Command::new(&exe)
                    .args(["--one", model, &size.to_string(), mode])
                    .args([batch.to_string(), iters.to_string()])
                    .status()?;
                if !status.success() {
                    eprintln!("{model} {size} {mode}: failed ({status})");
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}
