//! Forward throughput of a ResNet in eval mode, random weights, CPU, f32.
//!
//! ```text
//! cargo run --release --example bench_forward -- [arch=resnet18] [size=224] [batch=16] [iters=5]
//! ```
//! Prints images per second of the whole network (logits), then, for the stem's max-pool on the same
//! batch, the time of graft's max-pool op against the same pool composed from candle ops (pad with -inf,
//! max over the 9 shifted stride-2 views), forward and backward.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graft::models::layers::max_pool2d;
use graft::models::resnet::{ResNet, ResNetConfig};
use std::time::Instant;

fn arg<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// 3x3 / stride 2 / padding 1 max-pool composed from differentiable candle ops (even input sizes).
fn composed_max_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let neg = |hh: usize, ww: usize| Tensor::full(f32::NEG_INFINITY, (n, c, hh, ww), x.device());
    // Pad to (h + 2) x (w + 2): one row/column of -inf before and after.
    let rows = Tensor::cat(&[&neg(1, w)?, x, &neg(1, w)?], 2)?;
    let padded = Tensor::cat(&[&neg(h + 2, 1)?, &rows, &neg(h + 2, 1)?], 3)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        for dx in 0..3 {
            // Rows dy, dy + 2, ..: take 2*oh rows from dy, fold pairs, keep the first of each pair.
            let v = padded
                .narrow(2, dy, 2 * oh)?
                .reshape((n, c, oh, 2, w + 2))?
                .narrow(3, 0, 1)?
                .squeeze(3)?
                .narrow(3, dx, 2 * ow)?
                .reshape((n, c, oh, ow, 2))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    Ok(out.unwrap())
}

fn time<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() -> anyhow::Result<()> {
    let arch: String = arg(1, "resnet18".to_string());
    let size: usize = arg(2, 224);
    let batch: usize = arg(3, 16);
    let iters: usize = arg(4, 5);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let net = ResNet::with_classifier(ResNetConfig::from_arch(&arch)?, 1000, vb)?;
    let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
    let secs = time(iters, || {
        net.forward_t(&x, false).unwrap();
    });
    println!(
        "{arch} eval forward, batch {batch} at {size}x{size}: {:.1} ms/batch, {:.1} images/s ({} threads)",
        secs * 1e3,
        batch as f64 / secs,
        rayon::current_num_threads()
    );

    let stem = Var::randn(0f32, 1., (batch, 64, size / 2, size / 2), &dev)?;
    let ours = time(iters, || {
        let y = max_pool2d(stem.as_tensor(), 3, 2, 1).unwrap();
        y.sum_all().unwrap().backward().unwrap();
    });
    let composed = time(iters, || {
        let y = composed_max_pool(stem.as_tensor()).unwrap();
        y.sum_all().unwrap().backward().unwrap();
    });
    let a = max_pool2d(stem.as_tensor(), 3, 2, 1)?;
    let b = composed_max_pool(stem.as_tensor())?;
    let diff: f32 = (a - b)?.abs()?.max_all()?.to_scalar()?;
    println!(
        "max-pool 3x3/2 fwd+bwd on [{batch}, 64, {}, {}]: custom op {:.1} ms, composed ops {:.1} ms (outputs differ by {diff})",
        size / 2,
        size / 2,
        ours * 1e3,
        composed * 1e3
    );
    Ok(())
}
