//! Samplers: where the next trial goes, given the space and the trials so far.
//!
//! Every sampler is deterministic in (study seed, trial number, trials so far): trial `k` draws from its
//! own random stream `k` of the study seed, so the random sampler gives trial `k` the same parameters
//! however many workers share the study and in whatever order they ask.

use crate::search::gp::{lbfgs, log_ei, log_ei_with_grad, Gp, Hyper};
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
    /// Local searches of log EI (besides one from the best trial so far): from the best candidate and
    /// from others drawn with probability `∝ EI` (Optuna's roulette), so that several basins are tried.
    pub refine: usize,
    /// Random restarts of the hyperparameter fit besides the warm start from the previous fit.
    pub restarts: usize,
}

impl Default for BayesConfig {
    fn default() -> Self {
        BayesConfig {
            startup_trials: 10,
            candidates: 2048,
            refine: 9,
            restarts: 0,
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
        let acq = Acquisition::new(space, &gp, best);
        let d = space.params.len();
        let shift: Vec<f64> = (0..d).map(|_| rng.random()).collect();
        let scored: Vec<(f64, Vec<f64>)> = (0..self.config.candidates as u64)
            .map(|i| {
                let u = halton(i, &shift);
                (acq.value(&u), u)
            })
            .collect();
        let mut starts = roulette_starts(&scored, self.config.refine, &mut rng);
        if let Some(u) = done
            .iter()
            .zip(&y)
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(t, _)| unit_coords(space, &t.params))
        {
            starts.push(u);
        }
        let winner = starts
            .into_iter()
            .map(|u| acq.local_search(u))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, u)| u)
            .unwrap_or_else(|| scored[0].1.clone());
        Ok(Some(space.from_unit(&winner)))
    }
}

/// The starts of the local search, as Optuna's GPSampler picks them: the best candidate, then `n - 1`
/// others drawn without replacement with probability `∝ exp(log EI)` (so mostly good ones, but from
/// different basins).
fn roulette_starts(scored: &[(f64, Vec<f64>)], n: usize, rng: &mut impl Rng) -> Vec<Vec<f64>> {
    let Some(top) = (0..scored.len()).max_by(|&a, &b| scored[a].0.total_cmp(&scored[b].0)) else {
        return Vec::new();
    };
    let mut weights: Vec<f64> = scored
        .iter()
        .map(|(v, _)| (v - scored[top].0).exp())
        .map(|w| if w.is_finite() { w } else { 0.0 })
        .collect();
    weights[top] = 0.0;
    let mut starts = vec![scored[top].1.clone()];
    while starts.len() < n.max(1) {
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut r = rng.random::<f64>() * total;
        let mut pick = weights.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                pick = i;
                break;
            }
            r -= w;
        }
        if weights[pick] <= 0.0 {
            break;
        }
        weights[pick] = 0.0;
        starts.push(scored[pick].1.clone());
    }
    starts
}

/// Log expected improvement over the unit cube of a space, and its maximisation from a start: L-BFGS on
/// the continuous options (in coordinates divided by their length scales, where the kernel is isotropic,
/// as Optuna preconditions), alternated with an exhaustive search over each discrete option's values,
/// until neither improves.
struct Acquisition<'a> {
    space: &'a Space,
    gp: &'a Gp,
    best: f64,
    /// Per option: its GP input where it is a continuous float (no step), else `None`.
    continuous: Vec<Option<usize>>,
    /// Per option: the unit coordinates of its values where it is discrete (at most 16, evenly spread).
    discrete: Vec<Vec<f64>>,
}

impl<'a> Acquisition<'a> {
    fn new(space: &'a Space, gp: &'a Gp, best: f64) -> Self {
        let mut continuous = Vec::new();
        let mut discrete = Vec::new();
        let mut input = 0;
        for q in &space.params {
            let (c, values, width) = match &q.domain {
                Domain::Fixed(_) => (None, Vec::new(), 0),
                Domain::Choice(vs) => {
                    let units = (0..vs.len())
                        .map(|i| (i as f64 + 0.5) / vs.len() as f64)
                        .collect();
                    (None, units, if vs.len() == 1 { 0 } else { vs.len() })
                }
                Domain::Float { step: None, .. } => (Some(input), Vec::new(), 1),
                dom => {
                    let units = match dom.grid_values(&q.name) {
                        Ok(vs) if vs.len() <= 16 => {
                            vs.iter().filter_map(|v| dom.to_unit(v)).collect()
                        }
                        _ => (0..16).map(|i| (i as f64 + 0.5) / 16.0).collect(),
                    };
                    (None, units, 1)
                }
            };
            continuous.push(c);
            discrete.push(values);
            input += width;
        }
        Acquisition {
            space,
            gp,
            best,
            continuous,
            discrete,
        }
    }

    fn value(&self, u: &[f64]) -> f64 {
        let (m, v) = self
            .gp
            .predict(&features(self.space, &self.space.from_unit(u)));
        log_ei(m, v, self.best)
    }

    /// The value and its gradient with respect to each continuous option's unit coordinate (0 for the
    /// others, and for an option the point leaves inactive).
    fn value_with_grad(&self, u: &[f64]) -> (f64, Vec<f64>) {
        let p = self.space.from_unit(u);
        let (m, v, dm, dv) = self.gp.predict_with_grad(&features(self.space, &p));
        let (a, da_dm, da_dv) = log_ei_with_grad(m, v, self.best);
        let grad = self
            .continuous
            .iter()
            .zip(&self.space.params)
            .map(|(c, q)| match c {
                Some(j) if p.contains_key(&q.name) => da_dm * dm[*j] + da_dv * dv[*j],
                _ => 0.0,
            })
            .collect();
        (a, grad)
    }

    fn local_search(&self, mut u: Vec<f64>) -> (f64, Vec<f64>) {
        let mut value = self.value(&u);
        let cont: Vec<usize> = (0..u.len())
            .filter(|&t| self.continuous[t].is_some())
            .collect();
        let ls = self.gp.length_scales();
        let scale: Vec<f64> = cont
            .iter()
            .map(|&t| ls[self.continuous[t].unwrap_or(0)])
            .collect();
        for _ in 0..20 {
            let mut improved = false;
            if !cont.is_empty() {
                let objective = |z: &[f64]| {
                    let mut v = u.clone();
                    for ((&t, zi), l) in cont.iter().zip(z).zip(&scale) {
                        v[t] = zi * l;
                    }
                    let (a, g) = self.value_with_grad(&v);
                    a.is_finite().then(|| {
                        let g = cont.iter().zip(&scale).map(|(&t, l)| -g[t] * l).collect();
                        (-a, g)
                    })
                };
                let z0: Vec<f64> = cont.iter().zip(&scale).map(|(&t, l)| u[t] / l).collect();
                let bounds: Vec<(f64, f64)> = scale.iter().map(|l| (0.0, 1.0 / l)).collect();
                let (z, neg) = lbfgs(&objective, z0, &bounds, 200, 1e-2);
                if -neg > value + 1e-12 {
                    value = -neg;
                    for ((&t, zi), l) in cont.iter().zip(&z).zip(&scale) {
                        u[t] = (zi * l).clamp(0.0, 1.0);
                    }
                    improved = true;
                }
            }
            for t in 0..u.len() {
                for &c in &self.discrete[t] {
                    let mut v = u.clone();
                    v[t] = c;
                    let a = self.value(&v);
                    if a > value + 1e-12 {
                        value = a;
                        u = v;
                        improved = true;
                    }
                }
            }
            if !improved {
                break;
            }
        }
        (value, u)
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
    fn roulette_starts_begin_with_the_best_and_never_repeat() {
        let scored: Vec<(f64, Vec<f64>)> = (0..50)
            .map(|i| (-((i as f64) - 20.0).abs() / 4.0, vec![i as f64]))
            .collect();
        let starts = roulette_starts(&scored, 9, &mut trial_rng(0, 1));
        assert_eq!(starts.len(), 9);
        assert_eq!(starts[0], vec![20.0]);
        let mut seen: Vec<f64> = starts.iter().map(|s| s[0]).collect();
        seen.sort_by(f64::total_cmp);
        seen.dedup();
        assert_eq!(seen.len(), 9, "{starts:?}");
        // Weighted by EI: the draws stay near the best, but not all at its neighbours.
        assert!(
            starts.iter().all(|s| (s[0] - 20.0).abs() < 25.0),
            "{starts:?}"
        );
    }

    #[test]
    fn the_local_search_climbs_continuous_options_and_lands_discrete_ones_on_their_values() {
        let s = Space::from_toml(
            "[x]\nfloat = [0.0, 1.0]\n[c]\nchoice = [\"a\", \"b\", \"c\"]\n[n]\nint = [1, 4]",
            &[],
        )
        .unwrap();
        // Lowest at x = 0.3, c = "b", n = 3.
        let f = |p: &Params| {
            let x = p["x"].as_f64().unwrap();
            let n = p["n"].as_i64().unwrap() as f64;
            (x - 0.3).powi(2) * 8.0
                + f64::from(p["c"].as_str() != Some("b"))
                + 0.3 * (n - 3.0).powi(2)
        };
        let trials: Vec<TrialRecord> = (0..40)
            .map(|k| {
                let params = random_params(&s, 9, k);
                TrialRecord {
                    number: k,
                    state: TrialState::Complete,
                    value: Some(f(&params)),
                    params,
                    intermediate: Default::default(),
                    message: None,
                    started: 0.0,
                    finished: None,
                    heartbeat: 0.0,
                    worker: "w".into(),
                }
            })
            .collect();
        let done = complete(&trials);
        let (x, y) = gp_data(&s, &done);
        let gp = Gp::fit(x, y.clone(), None, 2, &mut trial_rng(0, 0));
        let best = y.iter().copied().fold(f64::INFINITY, f64::min);
        let acq = Acquisition::new(&s, &gp, best);
        let start = vec![0.9, 0.1, 0.05];
        let (v, u) = acq.local_search(start.clone());
        assert!(v > acq.value(&start), "{v} vs {}", acq.value(&start));
        let p = s.from_unit(&u);
        assert_eq!(p["c"].as_str(), Some("b"), "{p:?}");
        assert!(
            (u[1] - 0.5).abs() < 1e-12,
            "a choice lands on its centre: {u:?}"
        );
        // A local maximum: no small move of x and no other value of c or n does better.
        for (t, alternatives) in [
            (0, vec![u[0] - 1e-3, u[0] + 1e-3]),
            (1, vec![1.0 / 6.0, 5.0 / 6.0]),
            (2, (0..4).map(|i| (i as f64 + 0.5) / 4.0).collect()),
        ] {
            for a in alternatives {
                let mut w = u.clone();
                w[t] = a.clamp(0.0, 1.0);
                assert!(
                    acq.value(&w) <= v + 1e-9,
                    "option {t} at {a}: {} > {v}",
                    acq.value(&w)
                );
            }
        }
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
