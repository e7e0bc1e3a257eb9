//! Writes Fashion-MNIST (or any MNIST-style IDX set) as an image folder graft reads:
//! `OUT/train/<class>/<index>.png` and `OUT/test/<class>/<index>.png`, class names in label order.
//!
//! ```text
//! cargo run --release --example fashion_mnist_folder -- --out DIR [--per-class 100] [--size 96]
//!     [--rgb] [--seed 0] [--test-per-class N] [--src /usr/share/datasets/fashion-mnist]
//! ```
//! `--per-class` images of each class are drawn (seeded) from the 60,000 training images; the test
//! folder holds the 10,000 official test images unless `--test-per-class` asks for fewer. The two are
//! never mixed. `scripts/fashion-mnist.sh` installs the data and runs this.

use clap::Parser;
use graft::data::idx::{
    find_mnist_files, read_idx, write_image_folder, FolderSpec, DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
};
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// Output folder (gets train/ and test/).
    #[arg(long)]
    out: PathBuf,
    /// Folder with the four IDX files (`.gz` or not).
    #[arg(long, default_value = DEBIAN_FASHION_MNIST_DIR)]
    src: PathBuf,
    /// Training images per class (default: all 6,000).
    #[arg(long)]
    per_class: Option<usize>,
    /// Test images per class (default: all 1,000).
    #[arg(long)]
    test_per_class: Option<usize>,
    /// Side of the written images (28 keeps the originals).
    #[arg(long, default_value_t = 28)]
    size: u32,
    /// Write RGB (three equal channels) instead of grey.
    #[arg(long)]
    rgb: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let [train_images, train_labels, test_images, test_labels] = find_mnist_files(&args.src)?;
    for (split, images, labels, per_class) in [
        ("train", train_images, train_labels, args.per_class),
        ("test", test_images, test_labels, args.test_per_class),
    ] {
        let (images, labels) = (read_idx(&images)?, read_idx(&labels)?);
        let spec = FolderSpec {
            per_class,
            size: args.size,
            rgb: args.rgb,
            seed: args.seed,
        };
        let out = args.out.join(split);
        let n = write_image_folder(&images, &labels, &FASHION_MNIST_CLASSES, &out, &spec)?;
        println!("{}: {n} images", out.display());
    }
    Ok(())
}
