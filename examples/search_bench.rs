//! Benchmark of graft's samplers on standard test functions, one JSON line per seed:
//! `cargo run --release --example search_bench -- --function branin|hartmann6|mixed --sampler random|bayes|grid
//! --trials N --seeds 20`. `scripts/search-bench-optuna.py` prints the same lines for Optuna's samplers.
//!
//! - branin: x1 in [-5, 10], x2 in [0, 15]; minimum 0.397887.
//! - hartmann6: x in [0, 1]^6; minimum -3.32237.
//! - mixed (graft's own, to exercise a categorical, a log scale, an int and a condition):
//!   opt in {adam, sgd, rmsprop}, lr log-uniform in [1e-5, 1], x in [0, 1], n int in [1, 8], momentum in
//!   [0, 1] only when opt = sgd;
//!   f = offset(opt) + (log10 lr - centre(opt))²/4 + (x - 0.7)² + 0.05 (n - 3)² + [sgd] 2 (momentum - 0.9)²
//!   with centre = adam -3, sgd -1.5, rmsprop -2.5 and offset = adam 0.3, sgd 0, rmsprop 0.5; minimum 0.

use graft::search::{MemoryStorage, Params, SamplerConfig, Space, Study, StudySpec, TrialState};

fn branin(p: &Params) -> f64 {
    let (x1, x2) = (p["x1"].as_f64().unwrap(), p["x2"].as_f64().unwrap());
    let pi = std::f64::consts::PI;
    let b = 5.1 / (4.0 * pi * pi);
    let c = 5.0 / pi;
    (x2 - b * x1 * x1 + c * x1 - 6.0).powi(2) + 10.0 * (1.0 - 1.0 / (8.0 * pi)) * x1.cos() + 10.0
}

fn hartmann6(p: &Params) -> f64 {
    const A: [[f64; 6]; 4] = [
        [10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
        [0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
        [3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
        [17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
    ];
    const P: [[f64; 6]; 4] = [
        [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
        [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
        [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
        [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
    ];
    const ALPHA: [f64; 4] = [1.0, 1.2, 3.0, 3.2];
    let x: Vec<f64> = (0..6)
        .map(|i| p[&format!("x{i}")].as_f64().unwrap())
        .collect();
    -(0..4)
        .map(|i| {
            let s: f64 = (0..6).map(|j| A[i][j] * (x[j] - P[i][j]).powi(2)).sum();
            ALPHA[i] * (-s).exp()
        })
        .sum::<f64>()
}

fn mixed(p: &Params) -> f64 {
    let opt = p["opt"].as_str().unwrap();
    let (centre, offset) = match opt {
        "adam" => (-3.0, 0.3),
        "sgd" => (-1.5, 0.0),
        _ => (-2.5, 0.5),
    };
    let lr = p["lr"].as_f64().unwrap();
    let x = p["x"].as_f64().unwrap();
    let n = p["n"].as_i64().unwrap() as f64;
    let mut f =
        offset + (lr.log10() - centre).powi(2) / 4.0 + (x - 0.7).powi(2) + 0.05 * (n - 3.0).powi(2);
    if opt == "sgd" {
        f += 2.0 * (p["momentum"].as_f64().unwrap() - 0.9).powi(2);
    }
    f
}

fn space(function: &str) -> &'static str {
    match function {
        "branin" => "[x1]\nfloat = [-5.0, 10.0]\nsteps = 6\n[x2]\nfloat = [0.0, 15.0]\nsteps = 5\n",
        "hartmann6" => {
            "[x0]\nfloat = [0.0, 1.0]\nsteps = 2\n[x1]\nfloat = [0.0, 1.0]\nsteps = 2\n\
             [x2]\nfloat = [0.0, 1.0]\nsteps = 2\n[x3]\nfloat = [0.0, 1.0]\nsteps = 2\n\
             [x4]\nfloat = [0.0, 1.0]\nsteps = 2\n[x5]\nfloat = [0.0, 1.0]\nsteps = 2\n"
        }
        "mixed" => {
            "[opt]\nchoice = [\"adam\", \"sgd\", \"rmsprop\"]\n[lr]\nfloat = [1e-5, 1.0]\nlog = true\nsteps = 4\n\
             [x]\nfloat = [0.0, 1.0]\nsteps = 3\n[n]\nint = [1, 8]\nstep = 3\n\
             [momentum]\nfloat = [0.0, 1.0]\nsteps = 2\nwhen = { opt = \"sgd\" }\n"
        }
        other => panic!("unknown function `{other}`: branin|hartmann6|mixed"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let function = flag("--function", "branin");
    let sampler = flag("--sampler", "bayes");
    let default_trials = match function.as_str() {
        "hartmann6" => "50",
        _ => "30",
    };
    let trials: usize = flag("--trials", default_trials)
        .parse()
        .expect("--trials N");
    let seeds: u64 = flag("--seeds", "20").parse().expect("--seeds N");
    let first_seed: u64 = flag("--first-seed", "0").parse().expect("--first-seed N");
    let f: fn(&Params) -> f64 = match function.as_str() {
        "branin" => branin,
        "hartmann6" => hartmann6,
        "mixed" => mixed,
        other => panic!("unknown function `{other}`"),
    };
    for seed in first_seed..first_seed + seeds {
        let spec = StudySpec {
            space: Space::from_toml(space(&function), &[]).expect("the benchmark spaces parse"),
            sampler: sampler.parse::<SamplerConfig>().expect("--sampler"),
            seed,
            ..StudySpec::default()
        };
        let study =
            Study::open(Box::new(MemoryStorage::default()), spec).expect("a study in memory");
        let t0 = std::time::Instant::now();
        let mut n = 0;
        while let Some(t) = study.ask(Some(trials)).expect("ask") {
            study
                .tell(t.number, TrialState::Complete, Some(f(&t.params)))
                .expect("tell");
            n += 1;
        }
        let best = study
            .best()
            .expect("trials")
            .and_then(|t| t.value)
            .unwrap_or(f64::NAN);
        println!(
            "{}",
            serde_json::json!({"function": function, "sampler": sampler, "seed": seed, "trials": n, "best": best,
                "seconds": (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0})
        );
    }
}
