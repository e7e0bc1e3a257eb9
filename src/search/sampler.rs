//! Samplers: where the next trial goes, given the space and the trials so far.
//!
//! Every sampler is deterministic in (study seed, trial number, trials so far): trial `k` draws from its
//! own random stream `k` of the study seed, so the random sampler gives trial `k` the same parameters
//! however many workers share the study and in whatever order they ask.

use crate::search::gp::{log_ei, Gp, Hyper};
use crate::search::space::{Domain, Params, Space};
use crate::search::storage::{TrialRecord, TrialState};
use crate::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Which sampler a study uses, with its settings (data; [`SamplerConfig::build`] makes the sampler).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SamplerConfig {
    /// Every point of the grid once, in an order shuffled by the seed; the study ends when all are taken.
    Grid,
    /// Independent uniform draws (log-uniform for log ranges).
    Random,
    /// GP + log expected improvement, see [`BayesConfig`].
    Bayes(BayesConfig),
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig::Bayes(BayesConfig::default())
    }
}

impl std::str::FromStr for SamplerConfig {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "grid" => Ok(SamplerConfig::Grid),
            "random" => Ok(SamplerConfig::Random),
            "bayes" => Ok(SamplerConfig::Bayes(BayesConfig::default())),
            _ => Err(crate::Error::config(
                "--sampler",
                format!("`{s}` is not grid|random|bayes"),
            )),
        }
    }
}

/// Settings of the Bayesian sampler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BayesConfig {
    /// Random trials before the GP takes over (completed trials are counted).
    pub startup_trials: usize,
    /// Quasi-random (shifted Halton) candidates at which log EI is evaluated.
    pub candidates: usize,
    /// Candidates refined by local search (plus the best trial so far).
    pub refine: usize,
    /// Random restarts of the hyperparameter fit (besides the prior's mode and the previous optimum).
    pub restarts: usize,
}

impl Default for BayesConfig {
    fn default() -> Self {
        BayesConfig {
            startup_trials: 10,
            candidates: 2048,
            refine: 5,
            restarts: 2,
        }
    }
}

impl SamplerConfig {
    pub fn build(&self) -> Box<dyn Sampler> {
        match self {
            SamplerConfig::Grid => Box::new(GridSampler),
            SamplerConfig::Random => Box::new(RandomSampler),
            SamplerConfig::Bayes(c) => Box::new(BayesSampler {
                config: c.clone(),
                last_fit: Mutex::new(None),
            }),
        }
    }
}

/// Proposes trial `number`'s parameters; `None` when the sampler has nothing left (the grid is done).
/// `values` of `trials` are to be minimised (the study negates them for maximisation).
pub trait Sampler: Send + Sync {
    fn sample(
        &self,
        space: &Space,
        seed: u64,
        number: u64,
        trials: &[TrialRecord],
    ) -> Result<Option<Params>>;
}

/// Trial `number`'s own random stream of the study seed.
pub fn trial_rng(seed: u64, number: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(number);
    rng
}

/// See [`SamplerConfig::Grid`].
pub struct GridSampler;

impl Sampler for GridSampler {
    fn sample(
        &self,
        space: &Space,
        seed: u64,
        number: u64,
        _: &[TrialRecord],
    ) -> Result<Option<Params>> {
        let mut points = space.grid()?;
        // Fisher-Yates with the study's stream u64::MAX (no trial has that number).
        let mut rng = trial_rng(seed, u64::MAX);
        for i in (1..points.len()).rev() {
            points.swap(i, rng.random_range(0..=i));
        }
        Ok(points.into_iter().nth(number as usize))
    }
}

/// See [`SamplerConfig::Random`].
pub struct RandomSampler;

/// The random sampler's point for trial `number` (one coordinate drawn for every option, active or not, so
/// that a condition does not shift the others' draws).
pub fn random_params(space: &Space, seed: u64, number: u64) -> Params {
    let mut rng = trial_rng(seed, number);
    let u: Vec<f64> = space.params.iter().map(|_| rng.random()).collect();
    space.from_unit(&u)
}

impl Sampler for RandomSampler {
    fn sample(
        &self,
        space: &Space,
        seed: u64,
        number: u64,
        _: &[TrialRecord],
    ) -> Result<Option<Params>> {
        Ok(Some(random_params(space, seed, number)))
    }
}

/// GP-based Bayesian optimisation. Inputs: each numeric option in [0, 1] (log options in log space, ints
/// at their lattice value), each choice one-hot, inactive options imputed (0.5, or all-zero one-hot), fixed
/// options left out. Outputs standardised. Trials still running are added to the GP at the best value so
/// far (the "constant liar"), so parallel workers spread out instead of asking for the same point.
pub struct BayesSampler {
    config: BayesConfig,
    /// The previous fit's hyperparameters: a warm start for the next.
    last_fit: Mutex<Option<Hyper>>,
}

/// The GP features of a point (see [`BayesSampler`]).
fn features(space: &Space, p: &Params) -> Vec<f64> {
    let mut f = Vec::new();
    for q in &space.params {
        let v = p.get(&q.name);
        match &q.domain {
            Domain::Fixed(_) => {}
            Domain::Choice(vs) if vs.len() == 1 => {}
            Domain::Choice(vs) => f.extend(vs.iter().map(|c| f64::from(v == Some(c)))),
            d => f.push(v.and_then(|v| d.to_unit(v)).unwrap_or(0.5)),
        }
    }
    f
}

/// The complete trials with a finite value: what a GP learns from.
fn complete(trials: &[TrialRecord]) -> Vec<&TrialRecord> {
    trials
        .iter()
        .filter(|t| t.state == TrialState::Complete && t.value.is_some_and(f64::is_finite))
        .collect()
}

/// A GP's training data from complete trials: their features and their values standardised (mean 0, sd 1).
fn gp_data(space: &Space, done: &[&TrialRecord]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let ys: Vec<f64> = done.iter().map(|t| t.value.unwrap_or(0.0)).collect();
    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
    let sd = (ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / ys.len() as f64)
        .sqrt()
        .max(1e-12);
    let y = ys.iter().map(|v| (v - mean) / sd).collect();
    let x = done.iter().map(|t| features(space, &t.params)).collect();
    (x, y)
}

/// How much each varied option matters to the objective, from the complete trials: a GP of the kind the
/// Bayesian sampler fits, with one length scale per input, whose inverse squared length scales (ARD
/// relevance; a choice sums its one-hot inputs) are normalised to sum to 1. `None` with fewer than
/// `min_trials` complete trials, or nothing varied.
pub fn importances(
    space: &Space,
    trials: &[TrialRecord],
    min_trials: usize,
) -> Option<Vec<(String, f64)>> {
    let done = complete(trials);
    if done.len() < min_trials.max(2) {
        return None;
    }
    // Which option each GP input belongs to, in the order `features` writes them.
    let mut owner = Vec::new();
    for (i, q) in space.params.iter().enumerate() {
        match &q.domain {
            Domain::Fixed(_) => {}
            Domain::Choice(vs) if vs.len() == 1 => {}
            Domain::Choice(vs) => owner.extend(std::iter::repeat_n(i, vs.len())),
            _ => owner.push(i),
        }
    }
    if owner.is_empty() {
        return None;
    }
    let (x, y) = gp_data(space, &done);
    let gp = Gp::fit(x, y, None, 4, &mut trial_rng(0, 0));
    let mut relevance = vec![0.0; space.params.len()];
    for (j, &i) in owner.iter().enumerate() {
        relevance[i] += (-2.0 * gp.hyper.log_params[j]).exp();
    }
    let total: f64 = relevance.iter().sum::<f64>().max(1e-300);
    let mut out: Vec<(String, f64)> = owner
        .iter()
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|i| (space.params[i].name.clone(), relevance[i] / total))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some(out)
}

/// The unit-cube coordinates of a point (one per option; the centre of a choice's share).
fn unit_coords(space: &Space, p: &Params) -> Vec<f64> {
    space
        .params
        .iter()
        .map(|q| {
            let v = p.get(&q.name);
            match &q.domain {
                Domain::Choice(vs) => v
                    .and_then(|v| vs.iter().position(|c| c == v))
                    .map_or(0.5, |i| (i as f64 + 0.5) / vs.len() as f64),
                d => v.and_then(|v| d.to_unit(v)).unwrap_or(0.5),
            }
        })
        .collect()
}

/// The `i`-th point of the Halton sequence in `d` dimensions, shifted modulo 1 by `shift`
/// (Cranley-Patterson rotation: a different quasi-random set for each trial).
fn halton(i: u64, shift: &[f64]) -> Vec<f64> {
    const PRIMES: [u64; 32] = [
        2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
        97, 101, 103, 107, 109, 113, 127, 131,
    ];
    shift
        .iter()
        .enumerate()
        .map(|(t, s)| {
            let b = PRIMES[t % PRIMES.len()];
            let (mut f, mut r, mut n) = (1.0, 0.0, i + 1);
            while n > 0 {
                f /= b as f64;
                r += f * (n % b) as f64;
                n /= b;
            }
            (r + s).fract()
        })
        .collect()
}

impl Sampler for BayesSampler {
    fn sample(
        &self,
        space: &Space,
        seed: u64,
        number: u64,
        trials: &[TrialRecord],
    ) -> Result<Option<Params>> {
        let done = complete(trials);
        if done.len() < self.config.startup_trials.max(2)
            || features(space, &done[0].params).is_empty()
        {
            return Ok(Some(random_params(space, seed, number)));
        }
        let mut rng = trial_rng(seed, number);
        let (x, y) = gp_data(space, &done);
        let warm = self.last_fit.lock().ok().and_then(|g| g.clone());
        let fitted = Gp::fit(
            x.clone(),
            y.clone(),
            warm.as_ref(),
            self.config.restarts,
            &mut rng,
        );
        if let Ok(mut g) = self.last_fit.lock() {
            *g = Some(fitted.hyper.clone());
        }
        let best = y.iter().copied().fold(f64::INFINITY, f64::min);
        // The constant liar: running trials count as done at the best value so far.
        let pending: Vec<&TrialRecord> = trials
            .iter()
            .filter(|t| t.state == TrialState::Running && t.number != number)
            .collect();
        let gp = if pending.is_empty() {
            fitted
        } else {
            let mut x = x;
            let mut y = y.clone();
            for t in pending {
                x.push(features(space, &t.params));
                y.push(best);
            }
            Gp::with_hyper(x, &y, fitted.hyper)
        };
        let score = |u: &[f64]| -> (f64, Params) {
            let p = space.from_unit(u);
            let (m, v) = gp.predict(&features(space, &p));
            (log_ei(m, v, best), p)
        };
        let d = space.params.len();
        let shift: Vec<f64> = (0..d).map(|_| rng.random()).collect();
        let mut scored: Vec<(f64, Vec<f64>)> = (0..self.config.candidates as u64)
            .map(|i| {
                let u = halton(i, &shift);
                (score(&u).0, u)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.truncate(self.config.refine);
        let best_trial = done
            .iter()
            .zip(&y)
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(t, _)| unit_coords(space, &t.params));
        if let Some(u) = best_trial {
            scored.push((score(&u).0, u));
        }
        // Local refinement: a (1+1) search with a shrinking Gaussian step around each start; a choice
        // coordinate jumps to a random value now and then.
        let mut winner = scored[0].clone();
        for (mut s, mut u) in scored {
            let mut step = 0.1;
            for _ in 0..80 {
                let mut v = u.clone();
                for (t, q) in space.params.iter().enumerate() {
                    v[t] = match q.domain {
                        Domain::Choice(_) => {
                            if rng.random::<f64>() < 1.0 / d as f64 {
                                rng.random()
                            } else {
                                v[t]
                            }
                        }
                        _ => {
                            // Box-Muller normal draw.
                            let (a, b): (f64, f64) =
                                (rng.random::<f64>().max(1e-300), rng.random());
                            let z = (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos();
                            (v[t] + step * z).clamp(0.0, 1.0)
                        }
                    };
                }
                let sv = score(&v).0;
                if sv > s {
                    s = sv;
                    u = v;
                    step = (step * 1.5).min(0.2);
                } else {
                    step = (step * 0.9).max(1e-4);
                }
            }
            if s > winner.0 {
                winner = (s, u);
            }
        }
        Ok(Some(space.from_unit(&winner.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Space {
        Space::from_toml(
            "[x]\nfloat = [0.0, 1.0]\nsteps = 3\n[c]\nchoice = [\"a\", \"b\"]\n[n]\nint = [1, 2]",
            &[],
        )
        .unwrap()
    }

    #[test]
    fn random_params_are_a_pure_function_of_seed_and_trial_number() {
        let s = space();
        assert_eq!(random_params(&s, 3, 7), random_params(&s, 3, 7));
        assert_ne!(random_params(&s, 3, 7), random_params(&s, 3, 8));
        assert_ne!(random_params(&s, 4, 7), random_params(&s, 3, 7));
    }

    #[test]
    fn the_grid_gives_every_point_once_then_ends() {
        let s = space();
        let g = GridSampler;
        let points: Vec<Params> = (0..12)
            .map_while(|k| g.sample(&s, 1, k, &[]).unwrap())
            .collect();
        assert_eq!(points.len(), 12);
        assert!(g.sample(&s, 1, 12, &[]).unwrap().is_none());
        for (i, p) in points.iter().enumerate() {
            assert!(!points[..i].contains(p), "point {i} repeats");
        }
        let other: Vec<Params> = (0..12)
            .map_while(|k| g.sample(&s, 2, k, &[]).unwrap())
            .collect();
        assert_ne!(points, other, "the seed shuffles the order");
    }

    #[test]
    fn the_option_the_objective_depends_on_is_the_important_one() {
        let s = Space::from_toml(
            "[x]\nfloat = [0.0, 1.0]\n[z]\nfloat = [0.0, 1.0]\n[c]\nchoice = [\"a\", \"b\"]",
            &[],
        )
        .unwrap();
        let trials: Vec<TrialRecord> = (0..16)
            .map(|k| {
                let params = random_params(&s, 5, k);
                let x = params["x"].as_f64().unwrap();
                TrialRecord {
                    number: k,
                    state: TrialState::Complete,
                    params,
                    // Only x matters.
                    value: Some((x - 0.3).powi(2) * 10.0),
                    intermediate: Default::default(),
                    message: None,
                    started: 0.0,
                    finished: None,
                    heartbeat: 0.0,
                    worker: "w".into(),
                }
            })
            .collect();
        assert!(importances(&s, &trials[..5], 8).is_none(), "too few trials");
        let imp = importances(&s, &trials, 8).unwrap();
        assert_eq!(imp.len(), 3);
        assert_eq!(imp[0].0, "x", "{imp:?}");
        assert!(imp[0].1 > 0.8, "{imp:?}");
        assert!((imp.iter().map(|p| p.1).sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
