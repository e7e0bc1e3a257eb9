//! Forward throughput of EfficientNet-Lite0 on the CPU, in images per second:
//! `cargo run --release --example bench_efficientnet -- [BATCH] [SIZE...]` (default: 16, 224 and 128).
//!
//! Loads the pretrained weights from graft's cache when the fetch script has put them there, otherwise
//! uses a fresh initialisation (the cost is the same). Each configuration runs one warm-up batch, then
//! enough batches to last about three seconds; `eval` records the autograd graph on the weights like
//! evaluation during training does, `frozen` does not.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use graft::models::efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
use graft::models::Mode;
use std::path::PathBuf;
use std::time::Instant;

fn cached_weights() -> Option<PathBuf> {
    let cache = std::env::var_os("GRAFT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("graft")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/graft")))?;
    Some(cache.join("weights/efficientnet_lite0.safetensors")).filter(|p| p.is_file())
}

fn main() -> graft::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are integers: BATCH SIZE..."))
        .collect();
    let batch = args.first().copied().unwrap_or(16);
    let sizes = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![224, 128]
    };

    let dev = Device::Cpu;
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let net = EfficientNetLite::with_classifier(EfficientNetLiteConfig::lite0(), 1000, vb)?;
    match cached_weights() {
        Some(path) => {
            varmap.load(&path)?;
            println!("weights: {}", path.display());
        }
        None => println!(
            "weights: fresh initialisation (run scripts/fetch-efficientnet-lite0.sh for real ones)"
        ),
    }
    println!(
        "threads: {} (rayon), candle: {}",
        rayon::current_num_threads(),
        candle_core::utils::get_num_threads()
    );

    for &size in &sizes {
        let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
        for mode in [Mode::Eval, Mode::Frozen] {
            net.forward_logits(&x, mode, 0)?; // warm-up
            let start = Instant::now();
            let mut batches = 0;
            while batches < 2 || start.elapsed().as_secs_f64() < 3.0 {
                let logits = net.forward_logits(&x, mode, 0)?;
                logits.sum_all()?.to_scalar::<f32>()?;
                batches += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "efficientnet_lite0 {mode:?} batch {batch} {size}x{size}: {:.1} images/s ({:.0} ms/batch, {batches} batches)",
                (batches * batch) as f64 / secs,
                1000. * secs / batches as f64
            );
        }
    }
    Ok(())
}
