//! Saving an optimizer's state, loading it into a fresh optimizer and continuing gives exactly (bit for bit)
//! the parameters of an uninterrupted run, for every optimizer kind; and a resume after the set of trainable
//! parameters changed starts the newly trainable ones fresh.

use candle_core::{DType, Device, Tensor, Var};
use graft::optim::{GroupSpec, OptimState, Optimizer, OptimizerConfig, ParamGroup, ScheduleConfig};

const STEPS: usize = 10;
const SPLIT: usize = 4;

/// A small regression problem: `mean((x w + b - t)^2)` with fixed inputs.
struct Problem {
    x: Tensor,
    t: Tensor,
}

fn problem() -> Problem {
    let x: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
    let t: Vec<f32> = (0..12).map(|i| ((i * 5 % 7) as f32 - 3.0) / 2.0).collect();
    Problem {
        x: Tensor::from_vec(x, (6, 4), &Device::Cpu).unwrap(),
        t: Tensor::from_vec(t, (6, 2), &Device::Cpu).unwrap(),
    }
}

fn fresh_params() -> (Var, Var) {
    let w: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) / 10.0).collect();
    (
        Var::from_tensor(&Tensor::from_vec(w, (4, 2), &Device::Cpu).unwrap()).unwrap(),
        Var::from_tensor(&Tensor::new(&[0.1f32, -0.2], &Device::Cpu).unwrap()).unwrap(),
    )
}

/// Weights in a decaying group, the bias in a no-decay group at half the learning rate.
fn groups(w: &Var, b: &Var) -> Vec<ParamGroup> {
    graft::optim::groups::group_params(
        [("w".to_string(), w.clone()), ("b".to_string(), b.clone())],
        |name, _| {
            Some(if name == "b" {
                GroupSpec::new("bias").lr_mult(0.5).weight_decay(0.0)
            } else {
                GroupSpec::new("weights")
            })
        },
    )
    .unwrap()
}

fn loss(p: &Problem, w: &Var, b: &Var) -> Tensor {
    let pred =
        p.x.matmul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
    (pred - &p.t).unwrap().sqr().unwrap().mean_all().unwrap()
}

/// Steps `range` of a one-cycle run, cycling the momentum where the rule has one.
fn train(opt: &mut Optimizer, p: &Problem, w: &Var, b: &Var, range: std::ops::Range<usize>) {
    let schedule = ScheduleConfig::OneCycle {
        max_lr: 0.05,
        pct_start: 0.3,
        div_factor: 25.0,
        final_div_factor: 1e4,
        anneal: Default::default(),
        three_phase: false,
        cycle_momentum: true,
        base_momentum: 0.85,
        max_momentum: 0.95,
        style: Default::default(),
    };
    for step in range {
        if opt.momentum().is_some() {
            opt.set_momentum(schedule.momentum_at(step, STEPS).unwrap())
                .unwrap();
        }
        let grads = loss(p, w, b).backward().unwrap();
        opt.step(&grads, schedule.lr_at(step, STEPS)).unwrap();
    }
}

fn bits(v: &Var) -> Vec<u32> {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn configs() -> Vec<OptimizerConfig> {
    let mut all: Vec<OptimizerConfig> = graft::optim::config::KINDS
        .iter()
        .map(|k| OptimizerConfig::from_kind(k).unwrap())
        .collect();
    for json in [
        r#"{"kind":"sgd","weight_decay":0.01}"#,
        r#"{"kind":"momentum","dampening":0.1,"weight_decay":0.01}"#,
        r#"{"kind":"adagrad","lr_decay":0.01,"initial_accumulator_value":0.1,"weight_decay":0.01}"#,
        r#"{"kind":"rmsprop","centered":true,"momentum":0.9,"weight_decay":0.01}"#,
        r#"{"kind":"adam","amsgrad":true,"weight_decay":0.01}"#,
        r#"{"kind":"adamw","amsgrad":true}"#,
        r#"{"kind":"nadam","decoupled_weight_decay":true,"weight_decay":0.01}"#,
    ] {
        all.push(serde_json::from_str(json).unwrap());
    }
    all
}

#[test]
fn save_load_and_continue_equals_an_uninterrupted_run_for_every_optimizer() {
    let p = problem();
    let dir = tempfile::tempdir().unwrap();
    for (config, fused) in configs()
        .into_iter()
        .flat_map(|c| [(c.clone(), true), (c, false)])
    {
        let (w, b) = fresh_params();
        let mut opt = config.build(groups(&w, &b)).unwrap();
        opt.set_fused(fused);
        train(&mut opt, &p, &w, &b, 0..STEPS);

        let (w1, b1) = fresh_params();
        let mut first = config.build(groups(&w1, &b1)).unwrap();
        first.set_fused(fused);
        train(&mut first, &p, &w1, &b1, 0..SPLIT);
        let path = dir.path().join(format!("{}.safetensors", config.kind()));
        first.state().save(&path).unwrap();
        let (w_saved, b_saved) = (
            w1.as_tensor().copy().unwrap(),
            b1.as_tensor().copy().unwrap(),
        );
        drop(first);

        let (w2, b2) = (
            Var::from_tensor(&w_saved).unwrap(),
            Var::from_tensor(&b_saved).unwrap(),
        );
        let mut resumed = config.build(groups(&w2, &b2)).unwrap();
        resumed.set_fused(fused);
        resumed
            .load_state(&OptimState::load(&path, &Device::Cpu).unwrap())
            .unwrap();
        train(&mut resumed, &p, &w2, &b2, SPLIT..STEPS);

        assert_eq!(
            bits(&w2),
            bits(&w),
            "{config:?} (fused {fused}): weights differ after resume"
        );
        assert_eq!(
            bits(&b2),
            bits(&b),
            "{config:?} (fused {fused}): bias differs after resume"
        );
        assert_ne!(
            bits(&w),
            bits(&fresh_params().0),
            "{config:?}: training did not move the weights"
        );
    }
}

#[test]
fn state_file_keeps_scalars_bit_for_bit() {
    let (w, b) = fresh_params();
    let mut opt = OptimizerConfig::from_kind("nadam")
        .unwrap()
        .build(groups(&w, &b))
        .unwrap();
    train(&mut opt, &problem(), &w, &b, 0..3);
    let state = opt.state();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nadam.safetensors");
    state.save(&path).unwrap();
    let back = OptimState::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.rule, "nadam");
    assert_eq!(back.scalars, state.scalars);
    assert_eq!(state.scalars["w.step"], 3.0);
    assert!(state.scalars["w.mu_product"] < 1.0);
    let mut names: Vec<&String> = back.tensors.keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["b.exp_avg", "b.exp_avg_sq", "w.exp_avg", "w.exp_avg_sq"]
    );
    assert!(!dir.path().join("nadam.safetensors.tmp").exists());
}

#[test]
fn a_parameter_unfrozen_after_the_save_starts_fresh() {
    let p = problem();
    let config = OptimizerConfig::from_kind("adam").unwrap();
    let (w, b) = fresh_params();
    // First phase: the bias is frozen (in no group).
    let mut opt = config
        .build(vec![ParamGroup::new(
            "weights",
            vec![("w".to_string(), w.clone())],
        )])
        .unwrap();
    train(&mut opt, &p, &w, &b, 0..3);
    let state = opt.state();
    assert!(!state.scalars.contains_key("b.step"));

    // Second phase: both trainable; the bias has no saved state and starts at step 1.
    let mut opt = config.build(groups(&w, &b)).unwrap();
    opt.load_state(&state).unwrap();
    let b_before = b.as_tensor().copy().unwrap();
    let grads = loss(&p, &w, &b).backward().unwrap();
    opt.step(&grads, 0.01).unwrap();
    let after = opt.state();
    assert_eq!(after.scalars["w.step"], 4.0);
    assert_eq!(after.scalars["b.step"], 1.0);

    // ... and moves exactly as a brand-new optimizer would move it.
    let b_fresh = Var::from_tensor(&b_before).unwrap();
    let mut fresh = config
        .build(vec![ParamGroup::new(
            "bias",
            vec![("b".to_string(), b_fresh.clone())],
        )
        .with_lr_mult(0.5)
        .with_weight_decay(0.0)])
        .unwrap();
    let mut store = candle_core::backprop::GradStore::default();
    store.insert(
        b_fresh.as_tensor(),
        grads.get(b.as_tensor()).unwrap().clone(),
    );
    fresh.step(&store, 0.01).unwrap();
    assert_eq!(bits(&b_fresh), bits(&b));
}

#[test]
fn a_parameter_without_gradient_keeps_its_value_and_state() {
    let (w, b) = fresh_params();
    let mut opt = OptimizerConfig::from_kind("momentum")
        .unwrap()
        .build(groups(&w, &b))
        .unwrap();
    let mut grads = loss(&problem(), &w, &b).backward().unwrap();
    grads.remove(b.as_tensor());
    let b_before = bits(&b);
    opt.step(&grads, 0.1).unwrap();
    assert_eq!(bits(&b), b_before);
    let state = opt.state();
    assert!(state.tensors.contains_key("w.momentum_buffer"));
    assert!(!state.tensors.contains_key("b.momentum_buffer"));
}

#[test]
fn state_of_another_optimizer_or_an_incomplete_state_is_rejected() {
    let (w, b) = fresh_params();
    let mut adam = OptimizerConfig::from_kind("adam")
        .unwrap()
        .build(groups(&w, &b))
        .unwrap();
    train(&mut adam, &problem(), &w, &b, 0..2);
    let mut state = adam.state();

    let mut sgd = OptimizerConfig::from_kind("momentum")
        .unwrap()
        .build(groups(&w, &b))
        .unwrap();
    let err = sgd.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("adam") && err.contains("sgd"), "{err}");

    state.tensors.remove("w.exp_avg_sq");
    let err = adam.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("w.exp_avg_sq"), "{err}");

    let mut state = adam.state();
    state.tensors.insert(
        "w.exp_avg".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = adam.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("w.exp_avg") && err.contains("shape"), "{err}");
}

#[test]
fn fused_and_tensor_op_steps_agree_in_f32_for_every_optimizer() {
    let p = problem();
    for config in configs() {
        let run = |fused: bool| {
            let (w, b) = fresh_params();
            let mut opt = config.build(groups(&w, &b)).unwrap();
            opt.set_fused(fused);
            train(&mut opt, &p, &w, &b, 0..STEPS);
            let w: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            w
        };
        let (fused, ops) = (run(true), run(false));
        let worst = fused
            .iter()
            .zip(&ops)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "{config:?}: fused and tensor-op runs differ by {worst}"
        );
    }
}
