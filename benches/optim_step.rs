//! Time of one optimizer step over ResNet-18-shaped f32 parameters (11,689,512 values in 62 tensors), on the
//! CPU (or `GRAFT_BENCH_DEVICE=cuda` in a CUDA build).
//!
//! Run: `cargo bench --bench optim_step` (optionally `-- adam sgd` to pick kinds, `GRAFT_BENCH_STEPS=N`).
//! Prints milliseconds per step for each optimizer kind, with the fused CPU pass (the default) and with candle
//! tensor ops, and the time of the cheapest conceivable step (`p - 0.1 g` as tensor ops, written back with
//! `Var::set`) for scale.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use graft::optim::{groups, OptimizerConfig};
use std::time::Instant;

/// torchvision resnet18's parameter shapes (BatchNorm buffers excluded).
fn resnet18_shapes() -> Vec<(String, Vec<usize>)> {
    let mut s: Vec<(String, Vec<usize>)> = Vec::new();
    let bn = |s: &mut Vec<(String, Vec<usize>)>, name: &str, c: usize| {
        s.push((format!("{name}.weight"), vec![c]));
        s.push((format!("{name}.bias"), vec![c]));
    };
    s.push(("conv1.weight".into(), vec![64, 3, 7, 7]));
    bn(&mut s, "bn1", 64);
    let mut cin = 64;
    for (layer, cout) in [(1, 64), (2, 128), (3, 256), (4, 512)] {
        for block in 0..2 {
            let p = format!("layer{layer}.{block}");
            let first_in = if block == 0 { cin } else { cout };
            s.push((format!("{p}.conv1.weight"), vec![cout, first_in, 3, 3]));
            bn(&mut s, &format!("{p}.bn1"), cout);
            s.push((format!("{p}.conv2.weight"), vec![cout, cout, 3, 3]));
            bn(&mut s, &format!("{p}.bn2"), cout);
            if block == 0 && cin != cout {
                s.push((format!("{p}.downsample.0.weight"), vec![cout, cin, 1, 1]));
                bn(&mut s, &format!("{p}.downsample.1"), cout);
            }
        }
        cin = cout;
    }
    s.push(("fc.weight".into(), vec![1000, 512]));
    s.push(("fc.bias".into(), vec![1000]));
    s
}

fn device() -> Device {
    match std::env::var("GRAFT_BENCH_DEVICE").as_deref() {
        Ok(name) => graft::device::parse_device(name).expect("GRAFT_BENCH_DEVICE"),
        Err(_) => Device::Cpu,
    }
}

fn sync(dev: &Device) {
    dev.synchronize().expect("device synchronize");
}

fn main() {
    let dev = device();
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` this runs once as a quick smoke test
    // over the small tensors only.
    let timing = std::env::args().any(|a| a == "--bench");
    let steps: usize = if timing {
        std::env::var("GRAFT_BENCH_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10)
    } else {
        1
    };
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut shapes = resnet18_shapes();
    if !timing {
        shapes.retain(|(_, s)| s.iter().product::<usize>() < 100_000);
    }
    let params: Vec<(String, Var)> = shapes
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                Var::randn(0f32, 0.05, s.as_slice(), &dev).unwrap(),
            )
        })
        .collect();
    let total: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut grads = GradStore::default();
    for (_, v) in &params {
        grads.insert(
            v.as_tensor(),
            Tensor::randn(0f32, 1e-3, v.shape(), &dev).unwrap(),
        );
    }
    println!(
        "{}ResNet-18 parameters: {total} f32 values in {} tensors on {dev:?}; {steps} timed steps after 2 warm-up steps",
        if timing { "" } else { "smoke run (timings need `cargo bench`), small " },
        params.len()
    );

    // Floor: one elementwise pass and a write-back per tensor.
    let floor = {
        let run = || {
            for (_, v) in &params {
                let g = grads.get(v.as_tensor()).unwrap();
                let p = (v.as_detached_tensor() - g.affine(0.1, 0.0).unwrap()).unwrap();
                v.set(&p).unwrap();
            }
        };
        run();
        sync(&dev);
        let t0 = Instant::now();
        for _ in 0..steps {
            run();
        }
        sync(&dev);
        t0.elapsed().as_secs_f64() * 1e3 / steps as f64
    };
    println!("floor, one tensor-op pass p - 0.1 g and Var::set: {floor:.1} ms/step");

    println!(
        "{:<12} {:>14} {:>16}",
        "kind", "fused ms/step", "tensor-op ms/step"
    );
    for kind in graft::optim::config::KINDS {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == kind) {
            continue;
        }
        let config = OptimizerConfig::from_kind(kind).unwrap();
        let mut times = [0.0; 2];
        for (i, fused) in [true, false].into_iter().enumerate() {
            let mut opt = config
                .build(groups::no_decay_groups(params.clone()))
                .unwrap();
            opt.set_fused(fused);
            for _ in 0..2 {
                opt.step(&grads, 1e-3).unwrap();
            }
            sync(&dev);
            let t0 = Instant::now();
            for _ in 0..steps {
                opt.step(&grads, 1e-3).unwrap();
            }
            sync(&dev);
            times[i] = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        }
        println!("{kind:<12} {:>14.1} {:>16.1}", times[0], times[1]);
    }
}
