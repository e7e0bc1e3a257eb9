//! Time of single CPU layer ops outside a network: training BatchNorm + ReLU (forward; backward), the
//! residual add + ReLU's backward and max-pool (forward; backward), at ResNet-18's shapes for batch 16
//! at 128x128 (the stem's output, the first stage's maps, the last stage's).
//!
//! Run: `cargo bench --bench layer_ops` (optionally `-- bwd` or any substring of a line's name to pick
//! lines; `GRAFT_SIMD=base` to compare against the baseline instruction set, see `graft::kernels::simd`).
//!
//! A backward is timed as `loss.backward()` of `sum(op(x) * r)` for a fixed random `r`, so each includes
//! the multiply's own backward: the `harness` line times that part alone.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graft::kernels::{add_relu, max_pool2d};
use graft::models::layers::{batch_norm, Activation};
use graft::models::Mode;
use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Milliseconds per call of `f` over 10 calls after one warm-up, unless the filters exclude `name`.
fn time(filters: &[String], name: &str, mut f: impl FnMut() -> candle_core::Result<()>) {
    if !filters.is_empty() && !filters.iter().any(|x| name.contains(x.as_str())) {
        return;
    }
    let calls = 10;
    let mut run = || -> candle_core::Result<f64> {
        f()?;
        let t = Instant::now();
        for _ in 0..calls {
            f()?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / calls as f64)
    };
    match run() {
        Ok(ms) => println!("{name:<28} {ms:8.3} ms"),
        Err(e) => println!("{name:<28} failed: {e}"),
    }
}

fn main() -> candle_core::Result<()> {
    graft::alloc::keep_freed_memory(); // as the `graft` binary does
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dev = Device::Cpu;
    println!("simd level: {:?}", graft::kernels::simd::level());
    for (c, h) in [(64usize, 112usize), (64, 64), (64, 32), (512, 4)] {
        let shape = (16, c, h, h);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
        let r = Tensor::randn(0f32, 1., shape, &dev)?;
        let vm = VarMap::new();
        let bn = batch_norm(c, 1e-5, VarBuilder::from_varmap(&vm, DType::F32, &dev))
            .map_err(candle_core::Error::wrap)?;
        let bn_relu = || {
            bn.forward_act(&x, Mode::Train, Activation::Relu)
                .map_err(candle_core::Error::wrap)
        };
        time(&filters, &format!("bn+relu fwd {c}x{h}"), || {
            bn_relu().map(drop)
        });
        let loss = (bn_relu()? * &r)?.sum_all()?;
        time(&filters, &format!("bn+relu bwd {c}x{h}"), || {
            loss.backward().map(drop)
        });
        let loss = (x.as_tensor() * &r)?.sum_all()?;
        time(&filters, &format!("harness bwd {c}x{h}"), || {
            loss.backward().map(drop)
        });
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
        let loss = (add_relu(&x, &b)? * &r)?.sum_all()?;
        time(&filters, &format!("add_relu bwd {c}x{h}"), || {
            loss.backward().map(drop)
        });
        if h >= 64 {
            time(&filters, &format!("maxpool fwd {c}x{h}"), || {
                max_pool2d(&x, 3, 2, 1)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            });
            let rp = Tensor::randn(0f32, 1., (16, c, h / 2, h / 2), &dev)?;
            let loss =
                (max_pool2d(&x, 3, 2, 1).map_err(candle_core::Error::wrap)? * &rp)?.sum_all()?;
            time(&filters, &format!("maxpool bwd {c}x{h}"), || {
                loss.backward().map(drop)
            });
        }
    }
    Ok(())
}
