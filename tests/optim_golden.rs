//! graft's optimizers against `torch.optim`, from the trajectories in `$GRAFT_GOLDEN/optim/*.json`
//! (default `../shared/golden`, made with torch 2.15 by `reference/optim_vectors.py`).
//!
//! Every file and every configuration in it is run: the optimizer is built from the recorded `torch_class`
//! and `hyperparams` only, so new configurations, hyperparameters, problem sizes and step counts need no code
//! here. A configuration graft cannot build is a failure, not a skip.
//!
//! `GRAFT_TEST_DEVICE` chooses the device (`cpu`, `cpu-generic`, `cuda`; see `common::TestDevice`); on a GPU
//! the tolerances are widened by `common::GPU_TOLERANCE_FACTOR`.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::TestDevice;
use graft::optim::{groups, OptimizerConfig};
use serde_json::Value;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    std::env::var_os("GRAFT_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden")))
}

/// Every `optim/*.json`, sorted; there must be at least one.
fn golden_files() -> Vec<PathBuf> {
    let dir = golden_dir().join("optim");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no optimizer vectors in {}",
        dir.display()
    );
    files
}

fn floats(v: &Value) -> Result<Vec<f64>, String> {
    v.as_array()
        .ok_or_else(|| format!("expected a list, got {v}"))?
        .iter()
        .map(|x| x.as_f64().ok_or_else(|| format!("{x} is not a number")))
        .collect()
}

fn matrix(v: &Value) -> Result<Vec<Vec<f64>>, String> {
    v.as_array()
        .ok_or_else(|| format!("expected a matrix, got {v}"))?
        .iter()
        .map(floats)
        .collect()
}

/// The least-squares problem of a file: `0.5/n ||A theta - y||^2`.
struct Problem {
    a: Tensor,
    y: Tensor,
    n: usize,
}

impl Problem {
    fn from_json(p: &Value, dtype: DType, device: &Device) -> Result<Self, String> {
        let a = matrix(&p["A"])?;
        let y = floats(&p["y"])?;
        let (n, d) = (a.len(), a.first().map_or(0, Vec::len));
        if n == 0 || y.len() != n || a.iter().any(|r| r.len() != d) {
            return Err(format!("A is {n}x{d} but y has {} entries", y.len()));
        }
        let flat: Vec<f64> = a.into_iter().flatten().collect();
        let a = Tensor::from_vec(flat, (n, d), device).and_then(|t| t.to_dtype(dtype));
        let y = Tensor::from_vec(y, n, device).and_then(|t| t.to_dtype(dtype));
        Ok(Problem {
            a: a.map_err(|e| e.to_string())?,
            y: y.map_err(|e| e.to_string())?,
            n,
        })
    }

    /// The loss at `theta`, with a graph back to it.
    fn loss(&self, theta: &Var) -> candle_core::Result<Tensor> {
        let pred = self
            .a
            .matmul(&theta.as_tensor().unsqueeze(1)?)?
            .squeeze(1)?;
        (pred - &self.y)?
            .sqr()?
            .sum_all()?
            .affine(0.5 / self.n as f64, 0.0)
    }
}

fn max_abs_diff(t: &Tensor, want: &[f64]) -> Result<f64, String> {
    let got: Vec<f64> = t
        .to_dtype(DType::F64)
        .and_then(|t| t.to_vec1())
        .map_err(|e| e.to_string())?;
    if got.len() != want.len() {
        return Err(format!("{} values, expected {}", got.len(), want.len()));
    }
    Ok(got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max))
}

/// Where the gradient of each step comes from.
#[derive(Clone, Copy, Debug)]
enum Grads {
    /// The gradients PyTorch recorded.
    Recorded,
    /// candle autograd on the file's problem.
    Autograd,
}

/// Runs one configuration and returns the largest parameter error over all steps.
fn run_case(
    device: &Device,
    case: &Value,
    problem: &Problem,
    dtype: DType,
    grads_from: Grads,
    fused: bool,
    tol: f64,
) -> Result<f64, String> {
    let class = case["torch_class"].as_str().ok_or("no torch_class")?;
    let hyper = case["hyperparams"].as_object().ok_or("no hyperparams")?;
    let (config, lr) = OptimizerConfig::from_torch(class, hyper).map_err(|e| e.to_string())?;
    let lr = lr.ok_or("hyperparams give no lr")?;
    let theta0 = floats(&case["params_before_step1"])?;
    let grads = case["grads"].as_array().ok_or("no grads")?;
    let params = case["params"].as_array().ok_or("no params")?;
    let losses = floats(&case["loss"])?;
    if grads.len() != params.len() || losses.len() != params.len() || params.is_empty() {
        return Err(format!(
            "{} grads, {} params, {} losses",
            grads.len(),
            params.len(),
            losses.len()
        ));
    }
    let theta = Tensor::from_vec(theta0.clone(), theta0.len(), device)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| Var::from_tensor(&t))
        .map_err(|e| e.to_string())?;
    let mut opt = config
        .build(groups::single_group([("theta".to_string(), theta.clone())]))
        .map_err(|e| e.to_string())?;
    opt.set_fused(fused);
    let mut worst: f64 = 0.0;
    for (t, (g, want)) in grads.iter().zip(params).enumerate() {
        let store = match grads_from {
            Grads::Recorded => {
                let g = Tensor::new(floats(g)?.as_slice(), device)
                    .and_then(|g| g.to_dtype(dtype))
                    .map_err(|e| e.to_string())?;
                let mut store = GradStore::default();
                store.insert(theta.as_tensor(), g);
                store
            }
            Grads::Autograd => {
                let loss = problem.loss(&theta).map_err(|e| e.to_string())?;
                let loss_err = (loss
                    .to_dtype(DType::F64)
                    .and_then(|l| l.to_scalar::<f64>())
                    .map_err(|e| e.to_string())?
                    - losses[t])
                    .abs();
                if loss_err > tol {
                    return Err(format!("step {}: loss off by {loss_err:e}", t + 1));
                }
                let store = loss.backward().map_err(|e| e.to_string())?;
                let grad = store
                    .get(theta.as_tensor())
                    .ok_or("autograd gave no gradient")?;
                let grad_err = max_abs_diff(grad, &floats(g)?)?;
                if grad_err > tol {
                    return Err(format!(
                        "step {}: autograd gradient off by {grad_err:e}",
                        t + 1
                    ));
                }
                store
            }
        };
        opt.step(&store, lr).map_err(|e| e.to_string())?;
        let err = max_abs_diff(theta.as_tensor(), &floats(want)?)?;
        if err > tol || err.is_nan() {
            return Err(format!(
                "step {}: parameters off by {err:e} (tolerance {tol:e})",
                t + 1
            ));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// Walks every file and configuration, with the fused CPU pass and with candle tensor ops; returns
/// (cases run, failures).
fn walk(grads_from: Grads) -> (usize, Vec<String>) {
    let td = TestDevice::from_env();
    td.run(|| walk_on(&td, grads_from))
}

fn walk_on(td: &TestDevice, grads_from: Grads) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut cases = 0;
    for file in golden_files() {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let doc: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let (dtype, tol) = match doc["dtype"].as_str() {
            Some("float64") => (DType::F64, td.tolerance(1e-10)),
            Some("float32") => (DType::F32, td.tolerance(1e-5)),
            other => {
                failures.push(format!("{name}: unsupported dtype {other:?}"));
                continue;
            }
        };
        let problem = match Problem::from_json(&doc["problem"], dtype, &td.device) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{name}: problem: {e}"));
                continue;
            }
        };
        let Some(configs) = doc["optimizers"].as_array().filter(|c| !c.is_empty()) else {
            failures.push(format!("{name}: no optimizers"));
            continue;
        };
        for case in configs {
            cases += 1;
            for fused in [true, false] {
                let label = format!(
                    "{name}/{} ({grads_from:?} gradients, {})",
                    case["name"].as_str().unwrap_or("?"),
                    if fused { "fused" } else { "tensor ops" }
                );
                match run_case(&td.device, case, &problem, dtype, grads_from, fused, tol) {
                    Ok(worst) => eprintln!("{label}: max abs error {worst:e}"),
                    Err(e) => failures.push(format!("{label}: {e}")),
                }
            }
        }
    }
    (cases, failures)
}

#[test]
fn every_golden_optimizer_matches_pytorch_with_recorded_gradients() {
    let (cases, failures) = walk(Grads::Recorded);
    assert!(cases > 0, "no optimizer configurations found");
    assert!(
        failures.is_empty(),
        "{} of {cases} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_golden_optimizer_matches_pytorch_with_candle_autograd() {
    let (cases, failures) = walk(Grads::Autograd);
    assert!(cases > 0, "no optimizer configurations found");
    assert!(
        failures.is_empty(),
        "{} of {cases} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
