//! Throughput of a ResNet on the CPU in f32 with random weights, and of graft's CPU kernels against the
//! candle ops they replace.
//!
//! ```text
//! cargo run --release --example bench_forward -- [arch=resnet18] [size=224] [batch=16] [iters=5] [forward|train]
//! ```
//! Prints images per second of the whole network (logits) in `Mode::Eval` and `Mode::Frozen`. With
//! `forward` it stops there; with `train` it adds one training step (forward + backward, `Mode::Train`)
//! and stops. Without a fifth argument it goes on to the kernels, on the same batch size: the stem's
//! 3x3/2 max-pool (graft's op against `max_pool2d_composed`) and a 3x3 depthwise convolution (graft's op
//! against candle's grouped conv2d), forward and forward + backward. Times are the best of `iters` runs.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graft::kernels::{depthwise_conv2d, max_pool2d, max_pool2d_composed};
use graft::models::resnet::{ResNet, ResNetConfig};
use graft::models::Mode;
use std::time::Instant;

fn arg<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Best wall time of `iters` runs after one warm-up: on a shared machine the minimum is the least noisy.
fn time<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    f();
    (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
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

    let secs = time(iters, || {
        net.forward_logits(&x, Mode::Frozen, 5).unwrap();
    });
    println!(
        "{arch} frozen forward, batch {batch} at {size}x{size}: {:.1} ms/batch, {:.1} images/s",
        secs * 1e3,
        batch as f64 / secs
    );
    if std::env::args().nth(5).as_deref() == Some("train") {
        let secs = time(iters, || {
            let loss = net
                .forward_t(&x, true)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            loss.backward().unwrap();
        });
        println!(
            "{arch} train forward + backward, batch {batch} at {size}x{size}: {:.1} ms/batch, {:.1} images/s",
            secs * 1e3,
            batch as f64 / secs
        );
    }
    if std::env::args().nth(5).is_some() {
        return Ok(());
    }
    let stem = Var::randn(0f32, 1., (batch, 64, size / 2, size / 2), &dev)?;
    let ours = time(iters, || {
        let y = max_pool2d(stem.as_tensor(), 3, 2, 1).unwrap();
        y.sum_all().unwrap().backward().unwrap();
    });
    let composed = time(iters, || {
        let y = max_pool2d_composed(stem.as_tensor(), 3, 2, 1).unwrap();
        y.sum_all().unwrap().backward().unwrap();
    });
    let a = max_pool2d(stem.as_tensor(), 3, 2, 1)?;
    let b = max_pool2d_composed(stem.as_tensor(), 3, 2, 1)?;
    let diff: f32 = (a - b)?.abs()?.max_all()?.to_scalar()?;
    println!(
        "max-pool 3x3/2 fwd+bwd on [{batch}, 64, {}, {}]: custom op {:.1} ms, composed ops {:.1} ms (outputs differ by {diff})",
        size / 2,
        size / 2,
        ours * 1e3,
        composed * 1e3
    );

    // Depthwise 3x3 (EfficientNet-Lite0's second block at this input size): graft's kernel vs candle's
    // grouped conv2d, forward alone and forward + backward.
    let (c, hw) = (96, size / 2);
    let xd = Var::randn(0f32, 1., (batch, c, hw, hw), &dev)?;
    let wd = Var::randn(0f32, 0.1, (c, 1, 3, 3), &dev)?;
    for (label, stride) in [("stride 1", 1), ("stride 2", 2)] {
        let ours_fwd = time(iters, || {
            depthwise_conv2d(xd.as_tensor(), wd.as_tensor(), 1, stride).unwrap();
        });
        let candle_fwd = time(iters, || {
            xd.as_tensor()
                .conv2d(wd.as_tensor(), 1, stride, 1, c)
                .unwrap();
        });
        let ours_both = time(iters, || {
            let y = depthwise_conv2d(xd.as_tensor(), wd.as_tensor(), 1, stride).unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        let candle_both = time(iters, || {
            let y = xd
                .as_tensor()
                .conv2d(wd.as_tensor(), 1, stride, 1, c)
                .unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        println!(
            "depthwise 3x3 {label} on [{batch}, {c}, {hw}, {hw}]: graft {:.1} ms fwd / {:.1} ms fwd+bwd, candle grouped {:.1} ms fwd / {:.1} ms fwd+bwd",
            ours_fwd * 1e3,
            ours_both * 1e3,
            candle_fwd * 1e3,
            candle_both * 1e3
        );
    }
    Ok(())
}
