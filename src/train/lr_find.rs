//! The learning-rate finder: fastai's `Learner.lr_find`, on any [`Task`] of the runner.
//!
//! A mock training from `start_lr` to `end_lr` over `num_it` steps, the rate growing exponentially
//! (`start * (end / start)^(i / num_it)` at step `i`, fastai's `SchedExp`), every parameter group at the same
//! rate times its discriminative multiplier; the loss is smoothed as fastai's `AvgSmoothLoss` (an exponential
//! moving average with `beta = 0.98`, debiased by `1 - beta^n`); it stops early once the smoothed loss
//! passes 4x the best so far (`stop_div`). Afterwards the weights (BatchNorm statistics included) and the
//! generators are restored, so the run that follows is the run it would have been. The suggestions are
//! computed as fastai does, on the recorded points without the first `num_it / 10` and the last 5, cut at the
//! first non-finite loss: [`valley`] (the default), [`slide`], [`minimum`], [`steep`].

use crate::kernels::par::on_pool;
use crate::optim::clip_grad_norm;
use crate::train::ema;
use crate::train::plots::{line_panel, Axes, Canvas, Series, BLACK, TRAIN};
use crate::train::progress::Reporter;
use crate::train::runner::{StepAt, Task};
use crate::{Error, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the finder runs (fastai's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrFindConfig {
    pub start_lr: f64,
    pub end_lr: f64,
    /// Steps of the mock training (at least 6, as fastai enforces).
    pub num_it: usize,
    /// Stop once the smoothed loss passes 4x its best.
    pub stop_div: bool,
}

impl Default for LrFindConfig {
    fn default() -> Self {
        LrFindConfig {
            start_lr: 1e-7,
            end_lr: 10.0,
            num_it: 100,
            stop_div: true,
        }
    }
}

impl LrFindConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.start_lr > 0.0 && self.start_lr < self.end_lr && self.end_lr.is_finite()) {
            return Err(Error::config(
                "--start-lr/--end-lr",
                format!(
                    "need 0 < start < end, got {} and {}",
                    self.start_lr, self.end_lr
                ),
            ));
        }
        Ok(())
    }

    /// The rate of step `i` (0-based).
    pub fn lr_at(&self, i: usize) -> f64 {
        let n = self.num_it.max(6);
        self.start_lr * (self.end_lr / self.start_lr).powf(i as f64 / n as f64)
    }
}

/// A rule that turns the recorded curve into a learning rate.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Suggestion {
    /// The longest valley's point two thirds of the way down (fastai's default).
    Valley,
    /// The interval slide rule.
    Slide,
    /// A tenth of the rate at the minimum loss.
    Minimum,
    /// The steepest descent.
    Steep,
}

impl Suggestion {
    pub const ALL: [Suggestion; 4] = [
        Suggestion::Valley,
        Suggestion::Slide,
        Suggestion::Minimum,
        Suggestion::Steep,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Suggestion::Valley => "valley",
            Suggestion::Slide => "slide",
            Suggestion::Minimum => "minimum",
            Suggestion::Steep => "steep",
        }
    }

    /// The suggested rate and the point `(lr, loss)` to mark on the plot; `None` when the curve is too
    /// short for the rule.
    pub fn apply(self, lrs: &[f64], losses: &[f64]) -> Option<(f64, (f64, f64))> {
        if lrs.is_empty() || lrs.len() != losses.len() {
            return None;
        }
        match self {
            Suggestion::Valley => Some(valley(lrs, losses)),
            Suggestion::Slide => slide(lrs, losses, 15, 0.005, 1.0),
            Suggestion::Minimum => Some(minimum(lrs, losses)),
            Suggestion::Steep => steep(lrs, losses),
        }
    }
}

/// Python's `seq[i]` for a possibly negative `i`.
fn at(v: &[f64], i: i64) -> f64 {
    let n = v.len() as i64;
    v[(if i < 0 { n + i } else { i }).clamp(0, n - 1) as usize]
}

/// fastai's `valley`: the longest decreasing subsequence of the losses, and the point a third plus a sixth
/// of the way along it (its index arithmetic kept, including its off-by-one start).
pub fn valley(lrs: &[f64], losses: &[f64]) -> (f64, (f64, f64)) {
    let n = losses.len();
    let (mut max_start, mut max_end) = (0i64, 0usize);
    let mut lds = vec![1usize; n];
    for i in 1..n {
        for j in 0..i {
            if losses[i] < losses[j] && lds[i] < lds[j] + 1 {
                lds[i] = lds[j] + 1;
            }
            if lds[max_end] < lds[i] {
                max_end = i;
                max_start = max_end as i64 - lds[max_end] as i64;
            }
        }
    }
    let sections = (max_end as i64 - max_start) as f64 / 3.0;
    let idx = max_start + sections as i64 + (sections / 2.0) as i64;
    (at(lrs, idx), (at(lrs, idx), at(losses, idx)))
}

/// numpy's `gradient` with unit spacing: central differences inside, one-sided at the ends.
fn gradient(v: &[f64]) -> Vec<f64> {
    let n = v.len();
    (0..n)
        .map(|i| match (i, n) {
            (_, 1) => 0.0,
            (0, _) => v[1] - v[0],
            (i, n) if i == n - 1 => v[n - 1] - v[n - 2],
            (i, _) => (v[i + 1] - v[i - 1]) / 2.0,
        })
        .collect()
}

/// numpy's `interp(x, xs, ys)` for increasing `xs`.
fn interp(x: f64, xs: &[f64], ys: &[f64]) -> f64 {
    if x <= xs[0] {
        return ys[0];
    }
    for k in 1..xs.len() {
        if x <= xs[k] {
            let t = (x - xs[k - 1]) / (xs[k] - xs[k - 1]);
            return ys[k - 1] + t * (ys[k] - ys[k - 1]);
        }
    }
    ys[ys.len() - 1]
}

/// fastai's `slide`: walk a window of `lr_diff` points down from the end while the loss gradients at its
/// two ends differ by more than `thresh`; the rate at the window's left end.
pub fn slide(
    lrs: &[f64],
    losses: &[f64],
    lr_diff: i64,
    thresh: f64,
    adjust: f64,
) -> Option<(f64, (f64, f64))> {
    let n = losses.len() as i64;
    if n < lr_diff + 1 {
        return None;
    }
    let grad = gradient(losses);
    let (mut r, mut l) = (-1i64, -1 - lr_diff);
    let mut local_min_lr = at(lrs, l);
    while l >= -n && (at(&grad, r) - at(&grad, l)).abs() > thresh {
        local_min_lr = at(lrs, l);
        r -= 1;
        l -= 1;
    }
    let suggestion = local_min_lr * adjust;
    let log_lrs: Vec<f64> = lrs.iter().map(|v| v.log10()).collect();
    let loss = interp(suggestion.log10(), &log_lrs, losses);
    Some((suggestion, (suggestion, loss)))
}

/// Index of the point of `lrs` nearest to `lr` (the first of equals).
fn nearest(lrs: &[f64], lr: f64) -> usize {
    (0..lrs.len())
        .min_by(|&a, &b| (lrs[a] - lr).abs().total_cmp(&(lrs[b] - lr).abs()))
        .unwrap_or(0)
}

/// First index of the smallest value.
fn argmin(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] < v[best] { i } else { best })
}

/// fastai's `minimum`: a tenth of the rate at the lowest loss (marked at that rate).
pub fn minimum(lrs: &[f64], losses: &[f64]) -> (f64, (f64, f64)) {
    let lr_min = lrs[argmin(losses)];
    (lr_min / 10.0, (lr_min, losses[nearest(lrs, lr_min)]))
}

/// fastai's `steep`: the rate where the loss falls fastest against `log(lr)`.
pub fn steep(lrs: &[f64], losses: &[f64]) -> Option<(f64, (f64, f64))> {
    if lrs.len() < 2 {
        return None;
    }
    let grads: Vec<f64> = (1..lrs.len())
        .map(|i| (losses[i] - losses[i - 1]) / (lrs[i].ln() - lrs[i - 1].ln()))
        .collect();
    let lr_steep = lrs[1 + argmin(&grads)];
    Some((lr_steep, (lr_steep, losses[nearest(lrs, lr_steep)])))
}

/// fastai's `AvgSmoothLoss`.
#[derive(Debug, Clone, Default)]
pub struct SmoothLoss {
    count: i32,
    val: f64,
}

impl SmoothLoss {
    const BETA: f64 = 0.98;
    /// Adds a raw loss; returns the debiased smoothed value.
    pub fn push(&mut self, loss: f64) -> f64 {
        self.count += 1;
        self.val = loss + Self::BETA * (self.val - loss);
        self.val / (1.0 - Self::BETA.powi(self.count))
    }
}

/// What the finder recorded and suggests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LrFinding {
    /// Every step's rate and smoothed loss, as recorded.
    pub lrs: Vec<f64>,
    pub losses: Vec<f64>,
    /// Each rule's suggestion (absent when the curve was too short for it) and its point.
    pub suggestions: Vec<(Suggestion, f64, (f64, f64))>,
}

impl LrFinding {
    /// The points the suggestions are computed on: without the first `num_it / 10` and the last 5, cut at
    /// the first non-finite loss (as fastai's `lr_find`).
    fn trimmed(lrs: &[f64], losses: &[f64], num_it: usize) -> (Vec<f64>, Vec<f64>) {
        let lo = num_it.max(6) / 10;
        let hi = lrs.len().saturating_sub(5);
        if lo >= hi {
            return (Vec::new(), Vec::new());
        }
        let cut = (lo..hi).find(|&i| losses[i].is_nan()).unwrap_or(hi);
        (lrs[lo..cut].to_vec(), losses[lo..cut].to_vec())
    }

    /// The finding of a recorded curve (rates and smoothed losses) of a finder of `num_it` steps.
    pub fn from_curve(lrs: Vec<f64>, losses: Vec<f64>, num_it: usize) -> Self {
        let (l, s) = Self::trimmed(&lrs, &losses, num_it);
        let suggestions = Suggestion::ALL
            .iter()
            .filter_map(|&r| r.apply(&l, &s).map(|(lr, pt)| (r, lr, pt)))
            .collect();
        LrFinding {
            lrs,
            losses,
            suggestions,
        }
    }

    /// The suggestion of `rule`, or [`Error::Diverged`] naming why there is none.
    pub fn suggested(&self, rule: Suggestion) -> Result<f64> {
        self.suggestions
            .iter()
            .find(|(r, ..)| *r == rule)
            .map(|&(_, lr, _)| lr)
            .ok_or_else(|| Error::Diverged {
                reason: format!(
                    "the learning-rate finder recorded {} steps before the loss diverged, too few for a {} suggestion; try --start-lr lower or more data",
                    self.lrs.len(),
                    rule.name()
                ),
            })
    }

    /// Writes the smoothed loss against the rate (log axis), with every suggestion marked, to a PNG.
    pub fn plot(&self, num_it: usize, path: &Path) -> Result<()> {
        let (lrs, losses) = Self::trimmed(&self.lrs, &self.losses, num_it);
        let (w, h) = (900i64, 500i64);
        let mut cv = Canvas::new(w as u32, h as u32);
        let curve = Series {
            name: "smoothed loss",
            color: TRAIN,
            points: lrs.iter().map(|v| v.log10()).zip(losses).collect(),
            lines: true,
        };
        let marks: Vec<Series> = self
            .suggestions
            .iter()
            .map(|&(rule, _, (lr, loss))| Series {
                name: rule.name(),
                color: mark_color(rule),
                points: vec![(lr.log10(), loss)],
                lines: false,
            })
            .collect();
        let mut series = vec![curve];
        series.extend(marks);
        // No title: the legend (the curve and four rules) takes the header's width.
        let axes = Axes {
            title: "",
            x_label: "learning rate (log10)",
            integer_x: false,
            percent: false,
        };
        line_panel(&mut cv, (0, 0, w, h), &axes, &series);
        cv.save(path)
    }
}

fn mark_color(rule: Suggestion) -> image::Rgb<u8> {
    match rule {
        Suggestion::Valley => image::Rgb([214, 39, 40]),
        Suggestion::Slide => image::Rgb([44, 160, 44]),
        Suggestion::Minimum => image::Rgb([148, 103, 189]),
        Suggestion::Steep => BLACK,
    }
}

/// Runs the finder on `task` with the plan of the first epoch of `phase`: the trainable parameters, their
/// discriminative multipliers and the optimizer are those that epoch would train with. The task's weights
/// (every variable of its [`VarMap`](candle_nn::VarMap)) and generators are as they were when it returns.
pub fn find<T: Task>(
    task: &mut T,
    phase: usize,
    cfg: &LrFindConfig,
    reporter: &mut Reporter,
) -> Result<LrFinding> {
    cfg.validate()?;
    let first_epoch: usize = task.phases()[..phase].iter().map(|p| p.epochs).sum();
    let plan = task.plan(first_epoch, phase);
    task.prepare(plan, reporter)?;
    let saved = ema::values(task.varmap())?;
    let rngs = task.rng_states();
    let result = mock_training(task, phase, plan, cfg, reporter);
    ema::set_all(task.varmap(), &saved)?;
    task.restore_rngs(&rngs)?;
    let (lrs, losses) = result?;
    Ok(LrFinding::from_curve(lrs, losses, cfg.num_it))
}

/// The steps of the finder: the recorded rates and smoothed losses.
fn mock_training<T: Task>(
    task: &T,
    phase: usize,
    plan: usize,
    cfg: &LrFindConfig,
    reporter: &mut Reporter,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let num_it = cfg.num_it.max(6);
    let mut opt = task.optimizer(plan)?;
    let clip = task.policy().clip_grad_norm;
    let (mut lrs, mut losses) = (Vec::new(), Vec::new());
    let (mut smooth, mut best) = (SmoothLoss::default(), f64::INFINITY);
    let mut pass = reporter.pass("lr-find", 1, num_it);
    'epochs: for epoch in 0.. {
        let mut any = false;
        for item in task.batches(epoch) {
            let (i, batch) = item?;
            any = true;
            let lr = cfg.lr_at(lrs.len());
            let at = StepAt {
                epoch,
                phase,
                phase_epoch: epoch,
                batch: i,
            };
            let (loss, images) = on_pool(|| -> Result<(f64, usize)> {
                let out = task.loss(&batch, at)?;
                let v = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if v.is_finite() {
                    let mut grads = out.loss.backward()?;
                    if let Some(max) = clip {
                        clip_grad_norm(&mut grads, opt.vars().iter(), max)?;
                    }
                    opt.step(&grads, lr)?;
                }
                Ok((v, out.images))
            })?;
            let s = if loss.is_finite() {
                smooth.push(loss)
            } else {
                f64::NAN
            };
            lrs.push(lr);
            losses.push(s);
            pass.batch(images, loss, 0);
            best = best.min(s);
            let diverged = cfg.stop_div && (s > 4.0 * best || s.is_nan());
            if diverged || lrs.len() >= num_it {
                break 'epochs;
            }
        }
        if !any {
            return Err(Error::config("lr-find", "the task has no training batches"));
        }
    }
    pass.finish();
    Ok((lrs, losses))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_grows_as_fastai_sched_exp() {
        let cfg = LrFindConfig::default();
        assert_eq!(cfg.lr_at(0), 1e-7);
        assert!((cfg.lr_at(50) - 1e-7 * 1e8f64.sqrt()).abs() < 1e-12);
        assert!((cfg.lr_at(100) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn smoothing_is_debiased_as_avg_smooth_loss() {
        let mut s = SmoothLoss::default();
        assert!((s.push(2.0) - 2.0).abs() < 1e-12);
        let v = s.push(1.0);
        let expect = (0.98 * 0.02 * 2.0 + 0.02 * 1.0) / (1.0 - 0.98f64.powi(2));
        assert!((v - expect).abs() < 1e-12);
    }

    #[test]
    fn numpy_helpers_match_numpy() {
        assert_eq!(gradient(&[1.0, 4.0, 9.0, 16.0]), vec![3.0, 4.0, 6.0, 7.0]);
        assert_eq!(interp(1.5, &[1.0, 2.0], &[10.0, 20.0]), 15.0);
        assert_eq!(interp(0.0, &[1.0, 2.0], &[10.0, 20.0]), 10.0);
    }
}
