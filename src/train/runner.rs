//! The one training runner under `graft finetune`, `graft pretrain` and every search trial.
//!
//! A command describes its run as a [`Task`]: its phases, which parameters train in each epoch (a *plan*; a
//! new plan rebuilds the optimizer), the schedule of a phase, the batches of an epoch, the loss of a batch
//! and how to evaluate. The runner owns everything they share: resume from the last checkpoint, the
//! optimizer per plan, the schedule and `ReduceLROnPlateau`, the step on the thread pool with clipping and
//! the skipping of non-finite losses, the saved [`TrainState`], best and last checkpoints with the same
//! contents, the metrics log and TensorBoard event files (per-step loss and learning rate, per-epoch
//! metrics, in `RUN/tensorboard`), progress and the per-epoch line, `--stop-after`, and the summary file.
//!
//! Policies return decisions and the runner acts on them: early stopping and any outside policy (a search's
//! pruner, [`RunOptions::on_epoch`]) speak through the same [`Decision`]; the freezing plan is the task's
//! [`Task::plan`], and what it caches for a plan is its [`Task::prepare`].
//!
//! Determinism: data order, augmentation, dropout and noise are pure functions of (seed, epoch, position),
//! and every piece of state a later epoch reads is in the checkpoint, so a resumed run ends with the weights
//! and metrics of an uninterrupted one.

use crate::formats::checkpoint::Checkpoint;
use crate::kernels::par::on_pool;
use crate::optim::schedule::ReduceOnPlateau;
use crate::optim::{clip_grad_norm, OptimState, Optimizer, ScheduleConfig};
use crate::rng::RngState;
use crate::train::checkpoint::{Position, RunDir, TrainState, RUN_FORMAT, TENSORBOARD_DIR};
use crate::train::early_stop::{Decision, EarlyStopping, Monitor};
use crate::train::ema::{Ema, EMA_PREFIX};
use crate::train::metrics::{EpochMetrics, MetricsLog, RunningStats};
use crate::train::progress::Reporter;
use crate::train::tensorboard::EventWriter;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// How a run should behave beyond its config (not saved: a resume may change them).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub quiet: bool,
    /// Stop after this many epochs in this invocation, as if interrupted after a checkpoint (for tests and
    /// for splitting long runs).
    pub stop_after: Option<usize>,
    /// Consulted after each epoch, where early stopping is; its `Stop` ends the run (e.g. a search's pruner).
    pub on_epoch: Option<EpochCallback>,
    /// A folder where outputs of a frozen prefix are kept and shared with other runs on the same data and
    /// base (a search's trials); see [`crate::train::feature_store`]. Results do not depend on it.
    pub feature_store: Option<std::path::PathBuf>,
}

/// The function behind an [`EpochCallback`].
pub type EpochPolicy = dyn Fn(usize, &EpochMetrics) -> Decision + Send + Sync;

/// A per-epoch policy from outside the run: epoch (1-based) and its metrics in, a [`Decision`] out.
#[derive(Clone)]
pub struct EpochCallback(pub std::sync::Arc<EpochPolicy>);

impl std::fmt::Debug for EpochCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochCallback")
    }
}

/// How a run's phases relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coupling {
    /// Parts of one run (fine-tuning's frozen and unfrozen phases): one early stopping and one plateau over
    /// the whole run, whose `Stop` ends it; the optimizer state carries over when the plan changes; the run
    /// ends with the best epoch's weights when the policy says so.
    Continuous,
    /// Separate trainings in sequence (pretraining's greedy stages): each phase has its own early stopping
    /// (counting its own epochs), plateau and a fresh optimizer; a `Stop` ends the phase, which then hands
    /// its best epoch's weights to the next when the policy says so.
    Independent,
}

/// The policies of a run, from its config.
#[derive(Debug, Clone)]
pub struct Policy {
    pub coupling: Coupling,
    pub monitor: Monitor,
    pub patience: Option<usize>,
    pub min_delta: f64,
    /// End (the run, or an independent phase) with the best epoch's weights (Keras's `restore_best_weights`).
    pub restore_best: bool,
    pub clip_grad_norm: Option<f64>,
    /// Steps with a non-finite loss that are skipped before the run stops with [`Error::Diverged`].
    pub max_bad_steps: usize,
    /// The flag to name in the divergence error.
    pub max_bad_steps_flag: &'static str,
    /// Batches whose gradients are summed into one optimizer step (gradient accumulation; 1: every batch
    /// steps). [`Frame::steps_per_epoch`] counts optimizer steps.
    pub accumulate: usize,
    /// Keep an exponential moving average of the weights with this decay ([`Ema`]): evaluated, kept as best
    /// and ended with instead of the live weights.
    pub ema: Option<f64>,
}

/// One phase of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhasePlan {
    /// `frozen`, `stage1`, ...: in progress lines and, for independent phases, the metrics.
    pub name: String,
    pub epochs: usize,
}

/// Where a step stands: for the task's loss (noise and CD samples are seeded from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepAt {
    /// Epoch of the run, 0-based.
    pub epoch: usize,
    pub phase: usize,
    /// Epochs done in the phase before this one.
    pub phase_epoch: usize,
    /// The batch's position in the epoch (also its position in the schedule).
    pub batch: usize,
}

/// The training loss of a batch.
pub struct BatchLoss {
    pub loss: Tensor,
    pub images: usize,
    /// Correctly classified images, for tasks with labels.
    pub correct: Option<usize>,
}

/// What an evaluation measured.
#[derive(Debug, Clone, Copy)]
pub struct Eval {
    pub loss: f64,
    /// NaN for tasks without labels.
    pub acc: f64,
}

/// The fixed shape of a run, built by the command from its config: what the runner reads of a task that is
/// data, not behaviour.
pub struct Frame {
    /// Every variable of the model (saved under `model.`; a `VarMap` clone shares its variables).
    pub varmap: VarMap,
    pub policy: Policy,
    pub phases: Vec<PhasePlan>,
    pub steps_per_epoch: usize,
    pub device: Device,
}

/// What a command supplies: only what differs between commands.
pub trait Task: Sync {
    /// One batch as the task's loss takes it.
    type Batch: Send + Sync;
    /// The run's config, saved as `config.json` and in every checkpoint.
    type Config: Serialize + DeserializeOwned;
    /// What the run resolved its model to (the architecture and head), saved in every checkpoint so that
    /// what reads the run later (export, eval) never resolves the base again.
    type Record: Serialize + DeserializeOwned;

    fn frame(&self) -> &Frame;
    fn config(&self) -> &Self::Config;
    fn record(&self) -> Self::Record;
    fn varmap(&self) -> &VarMap {
        &self.frame().varmap
    }
    fn policy(&self) -> &Policy {
        &self.frame().policy
    }
    fn phases(&self) -> &[PhasePlan] {
        &self.frame().phases
    }
    fn steps_per_epoch(&self) -> usize {
        self.frame().steps_per_epoch
    }
    fn device(&self) -> &Device {
        &self.frame().device
    }

    /// The plan of `epoch` in `phase`: which parameters train. A plan that differs from the last epoch's
    /// rebuilds the optimizer (and, for [`Task::prepare`], the cache).
    fn plan(&self, epoch: usize, phase: usize) -> usize;
    fn optimizer(&self, plan: usize) -> Result<Optimizer>;
    /// The line announcing a new plan (`previous` is `None` for the first plan of this invocation).
    fn announce(
        &self,
        at: Position,
        epoch: usize,
        previous: Option<usize>,
        plan: usize,
    ) -> Option<String>;
    /// The schedule of `phase`, `steps` optimizer steps long.
    fn schedule(&self, phase: usize, steps: usize) -> ScheduleConfig;
    /// Called before each epoch's training pass, with its plan (e.g. to compute a frozen prefix once).
    fn prepare(&mut self, _plan: usize, _reporter: &mut Reporter) -> Result<()> {
        Ok(())
    }
    /// The batches of `epoch`, each with its position in the epoch; a batch the task cannot train on is left
    /// out (its position is not reused).
    fn batches(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<(usize, Self::Batch)>> + '_>;
    /// The training loss of `batch` (runs on the thread pool, before the backward pass).
    fn loss(&self, batch: &Self::Batch, at: StepAt) -> Result<BatchLoss>;
    /// The loss shown for a batch after its step (default: the training loss).
    fn shown_loss(&self, _batch: &Self::Batch, _at: StepAt, loss: f64) -> Result<f64> {
        Ok(loss)
    }
    /// Validation of `phase` after `epoch` (1-based); `None` without validation data.
    fn evaluate(&self, phase: usize, epoch: usize, reporter: &mut Reporter)
        -> Result<Option<Eval>>;
    /// Named generators to save with each checkpoint and restore on resume.
    fn rng_states(&self) -> BTreeMap<String, RngState> {
        BTreeMap::new()
    }
    fn restore_rngs(&self, _states: &BTreeMap<String, RngState>) -> Result<()> {
        Ok(())
    }
    /// Called when a phase has ended (after its best weights were restored).
    fn end_phase(&self, _run_dir: &RunDir, _phase: usize) -> Result<()> {
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunEnd {
    /// Every epoch's metrics, this invocation's and the earlier ones'.
    pub history: Vec<EpochMetrics>,
    /// The best epoch and its monitored value (of the last phase, for independent phases).
    pub best: Option<(usize, f64)>,
    pub stop_reason: Option<String>,
    /// Stopped by `--stop-after`: the run is not finished and resumes from here.
    pub interrupted: bool,
    /// Epochs of the run done (including earlier invocations).
    pub epochs_done: usize,
}

/// The mutable part of a run, saved in every checkpoint.
struct Progress {
    pos: Position,
    epoch: usize,
    step: u64,
    bad_steps: u64,
    early: EarlyStopping,
    plateau: Option<ReduceOnPlateau>,
    opt: Option<Optimizer>,
    plan: Option<usize>,
    history: Vec<EpochMetrics>,
    /// This invocation's TensorBoard event file.
    events: EventWriter,
    ema: Option<Ema>,
}

fn new_early(p: &Policy) -> Result<EarlyStopping> {
    EarlyStopping::new(p.monitor, p.patience, p.min_delta)
}

/// Runs (or, with `resume`, continues from its last checkpoint) `task` in `run_dir`.
pub fn run<T: Task>(
    task: &mut T,
    run_dir: &RunDir,
    resume: bool,
    opts: &RunOptions,
    reporter: &mut Reporter,
) -> Result<RunEnd> {
    if resume && !run_dir.has_checkpoint() {
        reporter.line(&format!(
            "{} has no checkpoint yet (it stopped in its first epoch): starting it from the beginning",
            run_dir.path().display()
        ));
    }
    let resume = resume && run_dir.has_checkpoint();
    if !resume {
        run_dir.write_config(task.config())?;
    }
    let (mut p, mut metrics_log) = if resume {
        restore(task, run_dir, reporter)?
    } else {
        let p = Progress {
            pos: Position::default(),
            epoch: 0,
            step: 0,
            bad_steps: 0,
            early: new_early(task.policy())?,
            plateau: None,
            opt: None,
            plan: None,
            history: Vec::new(),
            events: EventWriter::create(&run_dir.path().join(TENSORBOARD_DIR))?,
            ema: task
                .policy()
                .ema
                .map(|d| Ema::new(d, task.varmap()))
                .transpose()?,
        };
        (p, MetricsLog::create(run_dir.metrics_path())?)
    };
    let independent = task.policy().coupling == Coupling::Independent;
    let n_phases = task.phases().len();
    let mut stop_reason = None;
    let mut epochs_this_run = 0;
    while p.pos.phase < n_phases {
        let phase_len = task.phases()[p.pos.phase].epochs;
        if p.pos.phase_done || p.pos.phase_epoch >= phase_len {
            end_phase(task, run_dir, &mut p)?;
            continue;
        }
        if opts.stop_after.is_some_and(|n| epochs_this_run >= n) {
            reporter.line(&format!(
                "stopping after {epochs_this_run} epochs as asked (--stop-after)"
            ));
            return Ok(RunEnd {
                best: p.early.best(),
                history: p.history,
                stop_reason: Some("interrupted (--stop-after)".into()),
                interrupted: true,
                epochs_done: p.epoch,
            });
        }
        let decision = train_epoch(task, run_dir, opts, reporter, &mut p, &mut metrics_log)?;
        epochs_this_run += 1;
        if let Decision::Stop { reason, .. } = decision {
            if independent {
                // `train_epoch` marked the phase done; the next turn of the loop ends it.
                reporter.line(&format!("{}: {reason}", task.phases()[p.pos.phase].name));
            } else {
                reporter.line(&reason);
                stop_reason = Some(reason);
                break;
            }
        }
    }
    let best = p.early.best();
    if !independent && task.policy().restore_best && best.is_some() {
        restore_best(task, run_dir)?;
    } else if let Some(ema) = &p.ema {
        ema.apply_to(task.varmap())?;
    }
    Ok(RunEnd {
        history: p.history,
        best,
        stop_reason,
        interrupted: false,
        epochs_done: p.epoch,
    })
}

/// Loads the weights of the best checkpoint, if one was written: its moving average when it has one.
fn restore_best<T: Task>(task: &T, run_dir: &RunDir) -> Result<()> {
    if run_dir.best_checkpoint().is_file() {
        let ck = Checkpoint::load(run_dir.best_checkpoint(), task.device())?;
        ck.restore_varmap(model_prefix(&ck), task.varmap())?;
    }
    Ok(())
}

/// The prefix of the weights a checkpoint's run ended with, or would end with: the moving average (`ema`)
/// when the run kept one, else the live weights (`model`).
pub fn model_prefix(ck: &Checkpoint) -> &'static str {
    let ema = format!("{EMA_PREFIX}.");
    if ck.tensors().keys().any(|k| k.starts_with(&ema)) {
        EMA_PREFIX
    } else {
        "model"
    }
}

/// Ends the current phase and moves to the next; an independent phase hands over its best weights.
fn end_phase<T: Task>(task: &T, run_dir: &RunDir, p: &mut Progress) -> Result<()> {
    if task.policy().coupling == Coupling::Independent {
        if task.policy().restore_best && p.early.best().is_some() {
            restore_best(task, run_dir)?;
        }
        if p.pos.phase_epoch > 0 || p.pos.phase_done {
            task.end_phase(run_dir, p.pos.phase)?;
        }
        p.early = new_early(task.policy())?;
        p.plateau = None;
        p.opt = None;
    }
    p.pos = Position {
        phase: p.pos.phase + 1,
        phase_epoch: 0,
        phase_done: false,
    };
    Ok(())
}

/// The state of `run_dir`'s last checkpoint, restored into `task`, and the metrics log reopened after it.
fn restore<T: Task>(
    task: &T,
    run_dir: &RunDir,
    reporter: &mut Reporter,
) -> Result<(Progress, MetricsLog)> {
    let path = run_dir.resume_checkpoint()?;
    let ck = Checkpoint::load(&path, task.device())?;
    let state: TrainState<serde_json::Value, serde_json::Value> =
        TrainState::from_checkpoint(&ck, &path)?;
    let damaged = |e: Error| Error::bad_file(&path, e.to_string());
    ck.restore_varmap("model", task.varmap())?;
    task.restore_rngs(&state.rng).map_err(damaged)?;
    let pos = state.position;
    let mut p = Progress {
        pos,
        epoch: state.epoch,
        step: state.step,
        bad_steps: state.bad_steps,
        early: match state.early_stop {
            Some(e) => e,
            None => new_early(task.policy())?,
        },
        plateau: state.plateau,
        opt: None,
        plan: None,
        history: state.history.clone(),
        events: EventWriter::create(&run_dir.path().join(TENSORBOARD_DIR))?,
        ema: match task.policy().ema {
            Some(d) => Some(Ema::restored(
                d,
                state.ema_updates,
                ck.with_prefix(EMA_PREFIX),
                task.varmap(),
            )?),
            None => None,
        },
    };
    // The optimizer state continues: within the phase, and for continuous phases into the next one (built for
    // the plan of the epoch that comes next).
    let phases = task.phases();
    let in_phase =
        pos.phase < phases.len() && !pos.phase_done && pos.phase_epoch < phases[pos.phase].epochs;
    let next = if in_phase {
        Some(pos.phase)
    } else if task.policy().coupling == Coupling::Continuous {
        (pos.phase + 1..phases.len()).find(|&ph| phases[ph].epochs > 0)
    } else {
        None
    };
    if let Some(phase) = next {
        let plan = task.plan(state.epoch, phase);
        let mut o = task.optimizer(plan)?;
        let tensors = ck.with_prefix("optim").into_iter().collect();
        let metadata = state.optimizer.clone().into_iter().collect();
        let saved = OptimState::from_metadata(tensors, &metadata).map_err(damaged)?;
        o.load_state(&saved).map_err(damaged)?;
        p.opt = Some(o);
        p.plan = Some(plan);
    }
    let log = MetricsLog::resume_with(run_dir.metrics_path(), state.epoch, &state.history)?;
    reporter.line(&format!(
        "resuming {} after epoch {} ({} epoch {}, step {})",
        run_dir.path().display(),
        state.epoch,
        phases.get(pos.phase).map_or("end", |ph| ph.name.as_str()),
        pos.phase_epoch,
        state.step
    ));
    Ok((p, log))
}

/// Trains one epoch of the current phase, evaluates, checkpoints and logs it; returns the policies' decision.
fn train_epoch<T: Task>(
    task: &mut T,
    run_dir: &RunDir,
    opts: &RunOptions,
    reporter: &mut Reporter,
    p: &mut Progress,
    metrics_log: &mut MetricsLog,
) -> Result<Decision> {
    let t0 = Instant::now();
    let (phase, epoch) = (p.pos.phase, p.epoch);
    let plan = task.plan(epoch, phase);
    if p.plan != Some(plan) || p.opt.is_none() {
        let mut o = task.optimizer(plan)?;
        if let Some(old) = &p.opt {
            o.load_state(&old.state())?;
        }
        if let Some(line) = task.announce(p.pos, epoch, p.plan, plan) {
            reporter.line(&line);
        }
        p.opt = Some(o);
        p.plan = Some(plan);
    }
    let phase_steps = task.phases()[phase].epochs * task.steps_per_epoch();
    let sched = task.schedule(phase, phase_steps);
    if p.plateau.is_none() {
        p.plateau = sched.plateau();
    }
    task.prepare(plan, reporter)?;
    let task: &T = task;
    let pass = train_pass(task, run_dir, reporter, p, &sched, phase_steps)?;
    let eval = match &p.ema {
        Some(ema) => {
            ema.with_average(task.varmap(), || task.evaluate(phase, epoch + 1, reporter))?
        }
        None => task.evaluate(phase, epoch + 1, reporter)?,
    };
    p.epoch += 1;
    p.pos.phase_epoch += 1;
    let policy = task.policy();
    let m = EpochMetrics {
        epoch: p.epoch,
        train_loss: pass.stats.loss(),
        train_acc: if pass.labelled {
            pass.stats.accuracy()
        } else {
            f64::NAN
        },
        val_loss: eval.map_or(f64::NAN, |e| e.loss),
        val_acc: eval.map_or(f64::NAN, |e| e.acc),
        lr: pass.lr,
        seconds: t0.elapsed().as_secs_f64(),
        images_per_s: pass.images_per_s,
        extra: if policy.coupling == Coupling::Independent {
            let name = &task.phases()[phase].name;
            [("phase".to_string(), serde_json::json!(name))].into()
        } else {
            Default::default()
        },
    };
    let decision = match eval {
        Some(e) => {
            if let Some(pl) = p.plateau.as_mut() {
                pl.observe(e.loss);
            }
            let counted = match policy.coupling {
                Coupling::Continuous => p.epoch,
                Coupling::Independent => p.pos.phase_epoch,
            };
            p.early.observe(counted, policy.monitor.value(&m))
        }
        None => Decision::Continue { improved: false },
    };
    let improved = matches!(decision, Decision::Continue { improved: true });
    let decision = match opts.on_epoch.as_ref().map(|f| (f.0)(p.epoch, &m)) {
        Some(stop @ Decision::Stop { .. }) => stop,
        _ => decision,
    };
    if matches!(decision, Decision::Stop { .. }) && policy.coupling == Coupling::Independent {
        p.pos.phase_done = true;
    }
    p.history.push(m.clone());
    save_epoch(task, run_dir, p, improved)?;
    metrics_log.append(&m)?;
    p.events.scalars(
        p.epoch as u64,
        &[
            ("epoch/train_loss", m.train_loss),
            ("epoch/val_loss", m.val_loss),
            ("epoch/train_acc", m.train_acc),
            ("epoch/val_acc", m.val_acc),
            ("epoch/lr", m.lr),
        ],
    )?;
    p.events.flush()?;
    reporter.epoch_done(&m, improved);
    Ok(decision)
}

/// What one training pass measured.
struct Pass {
    stats: RunningStats,
    images_per_s: f64,
    /// The learning rate of the last step.
    lr: f64,
    /// The task counts correct classifications.
    labelled: bool,
}

/// The training pass over one epoch's batches: the schedule's rate and momentum, forward, backward, clipping
/// and the update per optimizer step; a batch whose loss is not finite adds nothing. With
/// [`Policy::accumulate`] `N > 1`, the batches at positions `N k .. N k + N` form optimizer step `k`: their
/// gradients are summed, divided by how many there were, clipped and applied once.
fn train_pass<T: Task>(
    task: &T,
    run_dir: &RunDir,
    reporter: &mut Reporter,
    p: &mut Progress,
    sched: &ScheduleConfig,
    phase_steps: usize,
) -> Result<Pass> {
    let (phase, epoch, spe) = (p.pos.phase, p.epoch, task.steps_per_epoch());
    let policy = task.policy();
    let acc = policy.accumulate.max(1);
    let opt = p
        .opt
        .as_mut()
        .expect("the optimizer is built before the pass");
    let mut pass = reporter.pass(&task.phases()[phase].name, epoch + 1, spe * acc);
    let (mut lr, mut labelled) = (0.0, false);
    let mut pending: Option<(GradStore, usize)> = None;
    let mut batches = task.batches(epoch).peekable();
    while let Some(item) = batches.next() {
        let (i, batch) = item?;
        let at = StepAt {
            epoch,
            phase,
            phase_epoch: p.pos.phase_epoch,
            batch: i,
        };
        // The last batch of its optimizer step (the next one belongs to another, or there is none).
        let closes = !matches!(batches.peek(), Some(Ok((j, _))) if j / acc == i / acc);
        let k = p.pos.phase_epoch * spe + i / acc;
        lr = sched.lr_at(k, phase_steps) * p.plateau.as_ref().map_or(1.0, |pl| pl.factor());
        opt.follow_momentum(sched.momentum_at(k, phase_steps))?;
        // Forward, backward and update on the thread pool (see `on_pool`); the batch was fetched outside it.
        // A batch whose loss is not finite contributes nothing (`None`).
        let (outcome, stepped) = on_pool(|| -> Result<(Option<BatchOut>, bool)> {
            let out = task.loss(&batch, at)?;
            let loss_v = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let finite = loss_v.is_finite();
            let fresh = if finite {
                Some(out.loss.backward()?)
            } else {
                None
            };
            let merged = match (pending.take(), fresh) {
                (Some((mut g, n)), Some(f)) => {
                    g.extend(f)?;
                    Some((g, n + 1))
                }
                (Some(g), None) => Some(g),
                (None, f) => f.map(|f| (f, 1)),
            };
            let mut stepped = false;
            match merged {
                Some((mut grads, n)) if closes => {
                    if n > 1 {
                        scale_grads(&mut grads, opt.vars().iter(), 1.0 / n as f64)?;
                    }
                    if let Some(max) = policy.clip_grad_norm {
                        clip_grad_norm(&mut grads, opt.vars().iter(), max)?;
                    }
                    opt.step(&grads, lr)?;
                    stepped = true;
                }
                merged => pending = merged,
            }
            let out = finite.then_some((loss_v, out.images, out.correct));
            Ok((out, stepped))
        })?;
        if acc == 1 || closes {
            p.step += 1;
        }
        if stepped {
            if let Some(ema) = p.ema.as_mut() {
                ema.update(task.varmap())?;
            }
        }
        match outcome {
            Some((loss_v, images, correct)) => {
                labelled |= correct.is_some();
                let shown = task.shown_loss(&batch, at, loss_v)?;
                pass.batch(images, shown, correct.unwrap_or(0));
                p.events
                    .scalars(p.step, &[("train/loss", shown), ("train/lr", lr)])?;
            }
            None => {
                p.bad_steps += 1;
                pass.note(&bad_step(run_dir, policy, p.bad_steps, p.step, epoch)?);
            }
        }
    }
    let (stats, images_per_s) = (pass.stats(), pass.images_per_s());
    pass.finish();
    Ok(Pass {
        stats,
        images_per_s,
        lr,
        labelled,
    })
}

/// A batch's loss, images and correct classifications.
type BatchOut = (f64, usize, Option<usize>);

/// Multiplies the gradients of `vars` by `factor`.
fn scale_grads<'a>(
    grads: &mut GradStore,
    vars: impl Iterator<Item = &'a candle_core::Var>,
    factor: f64,
) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let scaled = (g * factor)?;
            grads.insert(v.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// Writes the checkpoint of the epoch just ended: `best` when it improved, always `last` (the same contents).
fn save_epoch<T: Task>(task: &T, run_dir: &RunDir, p: &Progress, improved: bool) -> Result<()> {
    let opt = p.opt.as_ref().expect("an epoch trained with an optimizer");
    let state = TrainState {
        format: RUN_FORMAT,
        epoch: p.epoch,
        step: p.step,
        position: p.pos,
        early_stop: Some(p.early.clone()),
        plateau: p.plateau.clone(),
        rng: task.rng_states(),
        optimizer: opt.state().metadata().into_iter().collect(),
        config: task.config(),
        model: task.record(),
        history: p.history.clone(),
        bad_steps: p.bad_steps,
        ema_updates: p.ema.as_ref().map_or(0, Ema::updates),
    };
    let mut ck = Checkpoint::new(&state)?;
    ck.insert_varmap("model", task.varmap())?;
    ck.insert_prefixed("optim", opt.state().tensors);
    if let Some(ema) = &p.ema {
        ck.insert_prefixed(EMA_PREFIX, ema.tensors().clone());
    }
    crate::fsutil::kill_point("epoch_end");
    if improved {
        ck.save(run_dir.best_checkpoint())?;
    }
    crate::fsutil::kill_point("after_best");
    ck.save(run_dir.last_checkpoint())?;
    crate::fsutil::kill_point("after_last");
    Ok(())
}

/// The warning for a skipped step, or [`Error::Diverged`] once more than the allowed steps were skipped.
fn bad_step(
    run_dir: &RunDir,
    policy: &Policy,
    bad: u64,
    step: u64,
    epoch: usize,
) -> Result<String> {
    let flag = policy.max_bad_steps_flag;
    if bad > policy.max_bad_steps as u64 {
        let last = if run_dir.has_checkpoint() {
            format!("{} (epoch {epoch})", run_dir.last_checkpoint().display())
        } else {
            "none yet".to_string()
        };
        return Err(Error::Diverged {
            reason: format!(
                "the loss was not finite in {bad} steps (the last at step {step}, epoch {}), more than {flag} {}; the last good checkpoint: {last}. Try a lower --lr or --clip-grad-norm",
                epoch + 1,
                policy.max_bad_steps
            ),
        });
    }
    Ok(format!(
        "warning: step {step} (epoch {}): the loss is not finite; step skipped ({bad} of at most {flag} {})",
        epoch + 1,
        policy.max_bad_steps
    ))
}

/// Writes a run's outcome as `summary.json`, atomically.
pub fn write_summary(run_dir: &RunDir, outcome: &impl Serialize) -> Result<()> {
    let json =
        serde_json::to_vec_pretty(outcome).map_err(|e| Error::config("summary", e.to_string()))?;
    crate::fsutil::write_atomic(&run_dir.summary_path(), &json)
}
