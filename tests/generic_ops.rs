//! The path a GPU takes, checked on the CPU: every layer and optimizer step run once on graft's CPU kernels
//! and once with them switched off (`graft::device::with_generic_ops`, the composed candle ops that CUDA
//! runs), from the same weights and inputs; outputs, gradients, running statistics and updated parameters
//! must agree to float rounding. No GPU is needed: what differs on a GPU is candle's own CUDA kernels, which
//! `scripts/gpu-check.sh` covers through the golden tests.
//!
//! The networks run in f64, so that the comparison shows the two paths compute the same function rather
//! than how f32 rounding grows through a randomly initialised network (with batch 2, ResNet-18's f32
//! gradients differ by about 1.2e-4 relative L2 between the paths, all from summation order; in f64 they
//! agree to about 1e-13). Tolerance: relative L2 error [`REL_L2_F64`]. The optimizers run in f32 (their fused
//! kernels' main type), tolerance [`REL_L2_F32`]. f32 on the generic path against PyTorch is what
//! `GRAFT_TEST_DEVICE=cpu-generic` on the golden tests checks.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graft::device::with_generic_ops;
use graft::models::efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
use graft::models::resnet::{ResNet, ResNetConfig};
use graft::models::{Backbone, Mode};
use graft::optim::config::OptimizerConfig;
use graft::optim::groups::single_group;
use std::collections::BTreeMap;

const REL_L2_F64: f64 = 1e-9;
const REL_L2_F32: f64 = 1e-5;
/// The norm below which a reference tensor counts as zero (see [`rel_l2`]).
const ZERO_FLOOR: f64 = 1e-3;

fn rel_l2(ours: &Tensor, reference: &Tensor) -> f64 {
    let norm = |t: &Tensor| -> f64 {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let r = norm(reference);
    let d = norm(&(ours - reference).unwrap());
    // A tensor whose true value is zero (EfficientNet's projection BatchNorm biases: every path from them
    // meets a 1x1 convolution and a training BatchNorm, which removes a per-channel constant) holds only
    // rounding noise on both paths, about 1e-13 in norm: its gap is measured against ZERO_FLOOR instead,
    // i.e. absolutely (a gap of 1e-12 on such a tensor passes at REL_L2_F64).
    d / r.max(ZERO_FLOOR)
}

/// Fails listing every `(name, gap)` above `tol`; prints the worst.
fn assert_close(what: &str, gaps: &[(String, f64)], tol: f64) {
    let worst = gaps.iter().map(|(_, g)| *g).fold(0., f64::max);
    println!("{what}: {} tensors, worst rel_l2 {worst:.2e}", gaps.len());
    let bad: Vec<_> = gaps
        .iter()
        .filter(|(_, g)| g.is_nan() || *g > tol)
        .map(|(n, g)| format!("{n}: {g:.3e}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: generic path differs:\n{}",
        bad.join("\n")
    );
}

/// A varmap's tensors by name, copied (a later step must not change them).
fn snapshot(varmap: &VarMap) -> BTreeMap<String, Tensor> {
    let vars = varmap.data().lock().unwrap();
    vars.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

/// Sets every variable of `varmap` to `values` (same names).
fn restore(varmap: &VarMap, values: &BTreeMap<String, Tensor>) {
    let vars = varmap.data().lock().unwrap();
    for (k, v) in vars.iter() {
        v.set(&values[k]).unwrap();
    }
}

/// A network as its number of layer groups and its `forward_logits(x, mode, frozen_groups)`.
type Net<'a> = (usize, Box<dyn Fn(&Tensor, Mode, usize) -> Tensor + 'a>);

/// What one network run yields: named outputs, gradients of a probe loss, and the variables afterwards.
struct Run {
    outputs: BTreeMap<String, Tensor>,
    grads: BTreeMap<String, Tensor>,
    after: BTreeMap<String, Tensor>,
}

/// Runs `net` from `start` in train mode (logits, the gradient of every variable, updated running
/// statistics), in eval mode and fully frozen (each logits).
/// `logits(x, mode, frozen_groups)` is the network's `forward_logits`; it has `groups` layer groups.
fn run(net: &Net, varmap: &VarMap, start: &BTreeMap<String, Tensor>, x: &Tensor) -> Run {
    restore(varmap, start);
    let (groups, logits) = (net.0, &net.1);
    let mut outputs = BTreeMap::new();
    let train = logits(x, Mode::Train, 0);
    let probe = Tensor::arange(0f64, train.elem_count() as f64, x.device())
        .unwrap()
        .reshape(train.dims())
        .unwrap()
        .sin()
        .unwrap();
    let grads = (&train * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    outputs.insert("train logits".to_string(), train);
    outputs.insert("eval logits".to_string(), logits(x, Mode::Eval, 0));
    outputs.insert("frozen logits".to_string(), logits(x, Mode::Eval, groups));
    let vars = varmap.data().lock().unwrap();
    let grads = vars
        .iter()
        .filter_map(|(k, v)| grads.get(v.as_tensor()).map(|g| (k.clone(), g.clone())))
        .collect();
    drop(vars);
    Run {
        outputs,
        grads,
        after: snapshot(varmap),
    }
}

fn compare_paths(net: &Net, varmap: &VarMap, x: &Tensor) {
    let start = snapshot(varmap);
    let kernels = run(net, varmap, &start, x);
    let generic = with_generic_ops(|| run(net, varmap, &start, x));
    let gaps = |a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>| -> Vec<(String, f64)> {
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "the two paths give different sets of tensors"
        );
        a.iter()
            .map(|(k, t)| (k.clone(), rel_l2(&b[k], t)))
            .collect()
    };
    assert_close(
        "outputs",
        &gaps(&kernels.outputs, &generic.outputs),
        REL_L2_F64,
    );
    assert!(!kernels.grads.is_empty());
    assert_close(
        "gradients",
        &gaps(&kernels.grads, &generic.grads),
        REL_L2_F64,
    );
    assert_close(
        "variables after",
        &gaps(&kernels.after, &generic.after),
        REL_L2_F64,
    );
}

#[test]
fn resnet18_generic_path_matches_the_cpu_kernels_forward_backward_and_running_stats() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let net = ResNet::with_classifier(ResNetConfig::resnet18(), 10, vb).unwrap();
    // Non-square, odd height: the strided convolutions leave different remainders on the two axes.
    let x = Tensor::randn(0f64, 1., (2, 3, 37, 32), &Device::Cpu).unwrap();
    let groups = net.group_names().len();
    let logits = |x: &Tensor, m, f| net.forward_logits(x, m, f).unwrap();
    compare_paths(&(groups, Box::new(logits)), &varmap, &x);
}

#[test]
fn efficientnet_lite0_generic_path_matches_the_cpu_kernels_forward_backward_and_running_stats() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    // Without the head's dropout: its random mask would differ between the two runs.
    let mut cfg = EfficientNetLiteConfig::lite0();
    cfg.dropout = 0.;
    let net = EfficientNetLite::with_classifier(cfg, 10, vb).unwrap();
    let x = Tensor::randn(0f64, 1., (2, 3, 33, 30), &Device::Cpu).unwrap();
    let groups = net.group_names().len();
    let logits = |x: &Tensor, m, f| net.forward_logits(x, m, f).unwrap();
    compare_paths(&(groups, Box::new(logits)), &varmap, &x);
}

#[test]
fn every_optimizer_steps_the_same_on_the_generic_path_as_fused_on_the_cpu() {
    let p0 = Tensor::randn(0f32, 1., (3, 700), &Device::Cpu).unwrap();
    let g1 = Tensor::randn(0f32, 1., (3, 700), &Device::Cpu).unwrap();
    let g2 = Tensor::randn(0f32, 1., (3, 700), &Device::Cpu).unwrap();
    for kind in [
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam",
    ] {
        let steps = || {
            let p = Var::from_tensor(&p0).unwrap();
            let mut opt = OptimizerConfig::from_kind(kind)
                .unwrap()
                .build(single_group([("p".to_string(), p.clone())]))
                .unwrap();
            for g in [&g1, &g2, &g1] {
                let mut store = candle_core::backprop::GradStore::default();
                store.insert(p.as_tensor(), g.clone());
                opt.step(&store, 0.01).unwrap();
            }
            p.as_tensor().copy().unwrap()
        };
        let fused = steps();
        let generic = with_generic_ops(steps);
        let moved = rel_l2(&fused, &p0);
        assert!(moved > 1e-4, "{kind}: the parameter did not move");
        assert_close(
            kind,
            &[("p".to_string(), rel_l2(&generic, &fused))],
            REL_L2_F32,
        );
    }
}
