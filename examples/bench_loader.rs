//! Loader throughput: images per second at 224x224 from a generated JPEG folder and PNG folder, for
//! the first epoch (decode + resize + cache fill) and the cached epochs after it, with training
//! augmentation and with the evaluation transform.
//!
//! ```text
//! cargo run --release --example bench_loader -- [--images 256] [--width 320] [--height 240]
//!     [--size 224] [--batch 32] [--epochs 3] [--threads N] [--crop-pct 0.875] [--folder DIR]
//! ```
//! Batches are only produced, not trained on, so this is the loader's own ceiling.

use candle_core::Device;
use clap::Parser;
use graft::data::{ImageFolder, Loader, LoaderConfig, Preprocess};
use image::{ImageFormat, Rgb, RgbImage};
use std::path::Path;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 256)]
    images: usize,
    #[arg(long, default_value_t = 320)]
    width: u32,
    #[arg(long, default_value_t = 240)]
    height: u32,
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    epochs: u64,
    /// rayon threads (default: all cores)
    #[arg(long)]
    threads: Option<usize>,
    /// Measure this existing image folder instead of generated ones.
    #[arg(long)]
    folder: Option<std::path::PathBuf>,
    /// crop_pct of the evaluation transform (1.0 feeds images of the input size as they are).
    #[arg(long, default_value_t = 0.875)]
    crop_pct: f64,
}

/// A photo-like test image: smooth gradients, a few shapes and mild noise (pure noise would make PNGs
/// unrealistically large and JPEGs unrealistically slow).
fn synthetic(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 16) as i32 - 8;
        let cx = (x as i32 - (w / 2) as i32 + (seed % 50) as i32).pow(2);
        let cy = (y as i32 - (h / 2) as i32).pow(2);
        let disc = if cx + cy < ((w.min(h) / 3) as i32).pow(2) {
            80
        } else {
            0
        };
        let px = |base: i32| (base + disc + noise).clamp(0, 255) as u8;
        Rgb([
            px((x * 255 / w) as i32),
            px((y * 255 / h) as i32),
            px(((x + y + seed) % 256) as i32 / 2),
        ])
    })
}

fn write_folder(root: &Path, format: ImageFormat, ext: &str, args: &Args) -> u64 {
    let mut bytes = 0;
    for i in 0..args.images {
        let dir = root.join(format!("class{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{i:05}.{ext}"));
        synthetic(args.width, args.height, i as u32)
            .save_with_format(&path, format)
            .unwrap();
        bytes += std::fs::metadata(&path).unwrap().len();
    }
    bytes
}

/// CPU seconds this process has used (user + system), from /proc on Linux; `None` elsewhere. On a
/// shared machine wall-clock throughput depends on the neighbours, CPU time per image much less.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn run(root: &Path, label: &str, config: LoaderConfig, args: &Args) {
    let data = ImageFolder::open(root, 0.0, 0).unwrap();
    let p = Preprocess {
        crop_pct: args.crop_pct,
        ..Preprocess::imagenet(args.size)
    };
    let loader = Loader::new(data.train, data.classes.len(), p, config, &Device::Cpu).unwrap();
    let mut line = format!("{label:>22}:");
    for epoch in 0..args.epochs {
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        let mut n = 0;
        for batch in loader.epoch(epoch) {
            n += batch.unwrap().indices.len();
        }
        let secs = start.elapsed().as_secs_f64();
        let name = if epoch == 0 { "first" } else { "cached" };
        line += &format!("  {name} {:7.1} img/s", n as f64 / secs);
        if let (Some(a), Some(b)) = (cpu_start, cpu_seconds()) {
            line += &format!(" ({:6.0} img/cpu-s)", n as f64 / (b - a).max(0.01));
        }
    }
    println!("{line}");
}

fn main() {
    let args = Args::parse();
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .unwrap();
    }
    if let Some(folder) = &args.folder {
        println!(
            "{}, -> {}x{}, batch {}",
            folder.display(),
            args.size,
            args.size,
            args.batch
        );
        run(
            folder,
            "train (augment)",
            LoaderConfig::train(args.batch, 0),
            &args,
        );
        run(folder, "eval", LoaderConfig::eval(args.batch), &args);
        return;
    }
    let root = std::env::temp_dir().join(format!("graft-bench-loader-{}", std::process::id()));
    println!(
        "{} images of {}x{} -> {}x{}, batch {}, {} rayon threads",
        args.images,
        args.width,
        args.height,
        args.size,
        args.size,
        args.batch,
        rayon::current_num_threads()
    );
    for (format, ext) in [(ImageFormat::Jpeg, "jpg"), (ImageFormat::Png, "png")] {
        let dir = root.join(ext);
        let bytes = write_folder(&dir, format, ext, &args);
        println!(
            "{ext}: {:.1} KiB per file",
            bytes as f64 / args.images as f64 / 1024.0
        );
        let train = LoaderConfig::train(args.batch, 0);
        run(&dir, &format!("{ext} train (augment)"), train, &args);
        let eval = LoaderConfig::eval(args.batch);
        run(&dir, &format!("{ext} eval"), eval, &args);
    }
    std::fs::remove_dir_all(&root).unwrap();
}
