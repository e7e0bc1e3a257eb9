//! The one training loop: `graft finetune` (and, later, every command that trains) runs through here.
//!
//! The loop is short because the decisions live elsewhere: the schedule is a pure function of the step,
//! early stopping returns a [`Decision`], the freezing plan says which groups train in each epoch, and
//! checkpoints hold everything needed to resume ([`TrainState`] plus weights and optimizer state), written at
//! the end of every epoch. A resumed run restarts at the epoch after the last checkpoint and, because data
//! order, augmentation and dropout are pure functions of (seed, epoch, position), ends with the same
//! weights and metrics as an uninterrupted run.

use crate::data::{self, Augment, Dataset, ImageFolder, Loader, LoaderConfig};
use crate::formats::weights::LoadReport;
use crate::kernels::par::on_pool;
use crate::models::base;
use crate::models::classifier::Classifier;
use crate::models::Mode;
use crate::optim::groups::{discriminative_groups, even_mults, trainable_params};
use crate::optim::schedule::ReduceOnPlateau;
use crate::optim::{clip_grad_norm, OptimState, Optimizer, ScheduleConfig};
use crate::rng::seeded;
use crate::train::checkpoint::{Checkpoint, RunDir, TrainState};
use crate::train::config::{classifier_spec, validate, FinetuneConfig, ScheduleKind};
use crate::train::early_stop::{Decision, EarlyStopping};
use crate::train::loss::cross_entropy;
use crate::train::metrics::{
    count_correct, ConfusionMatrix, EpochMetrics, MetricsLog, RunningStats,
};
use crate::train::progress::{format_summary, Reporter};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub run_dir: PathBuf,
    pub epochs_run: usize,
    pub best_epoch: Option<usize>,
    pub best_value: Option<f64>,
    pub stop_reason: Option<String>,
    /// Validation accuracy of the final (best) weights.
    pub val_acc: f64,
    pub val_loss: f64,
}

/// How a run should behave beyond its config (not saved: a resume may change them).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub quiet: bool,
    /// Stop after this many epochs in this invocation, as if interrupted after a checkpoint (for tests and
    /// for splitting long runs).
    pub stop_after: Option<usize>,
    /// Consulted after each epoch, where early stopping is; its `Stop` ends the run (e.g. a search's pruner).
    pub on_epoch: Option<EpochCallback>,
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

/// The number of frozen groups in each epoch, decided once from the config.
fn frozen_at(cfg: &FinetuneConfig, epoch: usize, n_groups: usize) -> usize {
    if epoch < cfg.freeze_epochs {
        return n_groups;
    }
    let mut frozen = if cfg.unfreeze_at.is_empty() {
        cfg.frozen_prefix
    } else {
        n_groups
    };
    for &(from_epoch, f) in &cfg.unfreeze_at {
        if epoch + 1 >= from_epoch {
            frozen = frozen.min(f);
        }
    }
    frozen.max(cfg.frozen_prefix).min(n_groups)
}

/// The training phase an epoch belongs to: (its first epoch, its number of epochs).
fn phase_of(cfg: &FinetuneConfig, epoch: usize) -> (usize, usize) {
    if epoch < cfg.freeze_epochs {
        (0, cfg.freeze_epochs)
    } else {
        (cfg.freeze_epochs, cfg.epochs)
    }
}

/// The schedule of one phase. A one-cycle run with both a frozen and an unfrozen phase follows fastai's
/// `fine_tune`: the frozen phase warms up over 99% of its steps to `--lr`, the unfrozen phase peaks at half
/// of it, warms up over 30% and starts at a fifth of its peak (div 5). That keeps the first unfrozen steps
/// gentle, where a full restart of the cycle would undo what the frozen phase taught the head. Every other
/// combination runs the chosen schedule at `--lr` over the phase.
fn phase_schedule(
    cfg: &FinetuneConfig,
    first_phase: bool,
    steps: usize,
    steps_per_epoch: usize,
) -> ScheduleConfig {
    let two_phases = cfg.freeze_epochs > 0 && cfg.epochs > 0;
    if cfg.schedule != ScheduleKind::Onecycle || !two_phases {
        return cfg.schedule.build(cfg.lr, steps, steps_per_epoch);
    }
    let (lr, pct, div) = if first_phase {
        (cfg.lr, 0.99, 25.0)
    } else {
        (cfg.lr / 2.0, 0.3, 5.0)
    };
    let mut sched = ScheduleConfig::fit_one_cycle(lr);
    if let ScheduleConfig::OneCycle {
        pct_start,
        div_factor,
        final_div_factor,
        ..
    } = &mut sched
    {
        *pct_start = pct;
        *div_factor = div;
        // fastai ends at lr / div_final with div_final = 1e5, whatever div is.
        *final_div_factor = 1e5 / div;
    }
    sched
}

/// Everything a run needs at hand, built from its config.
struct Session {
    cfg: FinetuneConfig,
    device: Device,
    dataset: Dataset,
    model: Classifier,
    train: Loader,
    /// The training samples in order with the evaluation transform (for cached features).
    train_eval: Loader,
    val: Loader,
    class_weights: Option<Tensor>,
    n_groups: usize,
    steps_per_epoch: usize,
}

impl Session {
    fn build(
        cfg: &FinetuneConfig,
        reporter: &mut Reporter,
    ) -> Result<(Session, Option<LoadReport>)> {
        let device = crate::device::parse_device(&cfg.device)?;
        let base = base::resolve(&cfg.base)?;
        let mut dataset = ImageFolder::open(&cfg.data, cfg.val_split, cfg.seed)?;
        dataset.drop_unreadable()?;
        if dataset.val.is_empty() && cfg.patience.is_some() {
            return Err(Error::Dataset {
                path: cfg.data.clone(),
                reason: "early stopping (--patience) needs validation images: add a val/ folder or use --val-split > 0".into(),
            });
        }
        let spec = classifier_spec(cfg, dataset.classes.clone())?;
        let preprocess = spec.preprocess.clone();
        let mut model = Classifier::new(spec, &device)?;
        model.train_bn = cfg.train_bn;
        model.head.reset_parameters(&mut seeded(cfg.seed))?;
        let report = if cfg.pretrained {
            base.read_weights(cfg.weights.as_deref(), &device)?
                .map(|file| model.load_backbone(&file))
                .transpose()?
        } else {
            None
        };
        if report.is_none() {
            base.seed_random_init(&model.varmap, cfg.seed)?;
        }
        let n = dataset.classes.len();
        let batch_size = cfg.batch_size.min(dataset.train.len());
        let train_cfg = LoaderConfig {
            batch_size,
            shuffle: true,
            // Keep every image (as PyTorch's DataLoader does), except a lone last image: BatchNorm cannot
            // take batch statistics of one sample.
            drop_last: dataset.train.len() % batch_size == 1,
            seed: cfg.seed,
            balanced: cfg.balanced,
            augment: cfg.augment.then(Augment::default),
            ..Default::default()
        };
        let train = Loader::new(
            dataset.train.clone(),
            n,
            preprocess.clone(),
            train_cfg,
            &device,
        )?;
        let train_eval = Loader::new(
            dataset.train.clone(),
            n,
            preprocess.clone(),
            LoaderConfig::eval(cfg.batch_size),
            &device,
        )?;
        let val = Loader::new(
            dataset.val.clone(),
            n,
            preprocess,
            LoaderConfig::eval(cfg.batch_size),
            &device,
        )?;
        let class_weights = if cfg.class_weights {
            Some(Tensor::new(data::class_weights(&dataset), &device)?)
        } else {
            None
        };
        reporter.line(&format!(
            "data: {} classes, {} train / {} val images from {}",
            n,
            dataset.train.len(),
            dataset.val.len(),
            cfg.data.display()
        ));
        let n_groups = model.num_groups();
        let steps_per_epoch = train.batches_per_epoch();
        Ok((
            Session {
                cfg: cfg.clone(),
                device,
                dataset,
                model,
                train,
                train_eval,
                val,
                class_weights,
                n_groups,
                steps_per_epoch,
            },
            report,
        ))
    }

    /// An optimizer over the groups trainable with `frozen` groups frozen, with discriminative rates.
    fn optimizer(&self, frozen: usize) -> Result<Optimizer> {
        let n = self.n_groups;
        let mults = even_mults(1.0 / self.cfg.lr_mult, 1.0, n + 1);
        let model = &self.model;
        let params = trainable_params(&model.varmap);
        // With train_bn, the rank-1 parameters of frozen groups (BatchNorm scales and shifts: the backbones'
        // convolutions have no biases) stay trainable, at their group's rate.
        let bn_affine: std::collections::HashSet<String> = params
            .iter()
            .filter(|(_, v)| self.cfg.train_bn && v.as_tensor().rank() == 1)
            .map(|(k, _)| k.clone())
            .collect();
        let groups = discriminative_groups(
            params,
            |name| {
                model
                    .group_of(name)
                    .filter(|&g| g >= frozen || bn_affine.contains(name))
            },
            &mults,
            true,
        )?;
        self.cfg.optimizer.build(groups)
    }

    fn schedule(&self, epoch: usize) -> (ScheduleConfig, usize, usize) {
        let (start, len) = phase_of(&self.cfg, epoch);
        let steps = len * self.steps_per_epoch;
        let sched = phase_schedule(&self.cfg, start == 0, steps, self.steps_per_epoch);
        (sched, (epoch - start) * self.steps_per_epoch, steps)
    }

    /// What the frozen prefix of `level` groups makes of `loader`'s samples, in order, with their labels
    /// (see [`Classifier::frozen_prefix`]), or `None` once they would take more than `budget` bytes.
    fn prefix_outputs(&self, loader: &Loader, level: usize, budget: f64) -> Result<Option<Cached>> {
        let n = loader.samples().len() as f64;
        let mut outs = Vec::new();
        let mut labels = Vec::new();
        let mut rows = vec![None; loader.samples().len()];
        let mut next_row = 0u32;
        for batch in loader.epoch(0) {
            let batch = batch?;
            let h = on_pool(|| self.model.frozen_prefix(&batch.images, level))?;
            let per_sample = (h.elem_count() / h.dim(0)?.max(1)) as f64 * 4.0;
            if per_sample * n > budget {
                return Ok(None);
            }
            // A sample that failed to decode has no row: later epochs leave it out, as the loader does.
            for &i in &batch.indices {
                rows[i] = Some(next_row);
                next_row += 1;
            }
            outs.push(h);
            labels.push(batch.labels);
        }
        if outs.is_empty() {
            return Err(Error::Dataset {
                path: self.cfg.data.clone(),
                reason: "no image of this split could be decoded".into(),
            });
        }
        Ok(Some(Cached {
            features: Tensor::cat(&outs, 0)?,
            labels: Tensor::cat(&labels, 0)?,
            rows,
        }))
    }

    /// The number of frozen groups whose outputs can be computed once for the epochs ahead: the frozen
    /// prefix, when no random augmentation changes the inputs and no BatchNorm inside it trains.
    fn cache_level(&self, frozen: usize) -> Option<usize> {
        (frozen > 0 && !self.cfg.augment && !self.cfg.train_bn && self.cfg.cache_mb > 0)
            .then_some(frozen.min(self.n_groups))
    }

    /// Every file of the dataset left out so far, once each: those the folder scan refused and those a loader
    /// failed to decode.
    fn skipped_images(&self) -> std::collections::BTreeSet<PathBuf> {
        let scanned = self.dataset.skipped.iter().map(|(p, _)| p.clone());
        let loaders = [&self.train, &self.train_eval, &self.val]
            .into_iter()
            .flat_map(|l| l.skipped().into_iter().map(|(p, _)| p));
        scanned.chain(loaders).collect()
    }

    /// Whether there are validation images (without them: no early stopping, the last weights are kept).
    fn has_val(&self) -> bool {
        !self.dataset.val.is_empty()
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        cross_entropy(
            logits,
            labels,
            self.cfg.label_smoothing,
            self.class_weights.as_ref(),
        )
    }

    /// Validation loss, accuracy and confusion matrix, everything frozen (no graph, running stats untouched).
    fn evaluate(
        &self,
        cached: Option<&ActivationCache>,
        reporter: &mut Reporter,
        epoch: usize,
    ) -> Result<(RunningStats, ConfusionMatrix)> {
        let mut cm = ConfusionMatrix::new(self.dataset.classes.len());
        let mut stats = RunningStats::new();
        if !self.has_val() {
            return Ok((stats, cm));
        }
        let bs = self.cfg.batch_size;
        let mut pass = reporter.pass("val", epoch, self.val.batches_per_epoch());
        let mut handle = |logits: Tensor, labels: Tensor| -> Result<()> {
            let loss = cross_entropy(&logits, &labels, 0.0, None)?.to_scalar::<f32>()? as f64;
            let correct = count_correct(&logits, &labels)?;
            cm.add_batch(&logits, &labels)?;
            stats.add_batch(loss, correct, labels.dim(0)?);
            pass.batch(labels.dim(0)?, loss, correct);
            Ok(())
        };
        match cached.and_then(|c| c.val.as_ref().map(|v| (c.level, v))) {
            Some((level, v)) => {
                let n = v.rows();
                for start in (0..n).step_by(bs) {
                    let len = bs.min(n - start);
                    let x = v.features.narrow(0, start, len)?;
                    let logits = on_pool(|| self.model.forward_from(&x, level, Mode::Frozen))?;
                    handle(logits, v.labels.narrow(0, start, len)?)?;
                }
            }
            None => {
                for batch in self.val.epoch(0) {
                    let batch = batch?;
                    handle(on_pool(|| self.model.predict(&batch.images))?, batch.labels)?;
                }
            }
        }
        pass.finish();
        Ok((stats, cm))
    }
}

/// Outputs of a frozen prefix of `level` groups for the training samples (in sample order) and the validation
/// samples, computed once and reused while the prefix stays frozen (the tch-rs transfer-learning trick, at any
/// depth). Frozen groups run on running statistics and their weights do not move, so the cached outputs are
/// exactly what the prefix would compute again.
struct ActivationCache {
    level: usize,
    train: Cached,
    val: Option<Cached>,
}

/// The cached outputs of one split: `features` and `labels` have one row per decodable sample, in sample
/// order; `rows[i]` is sample `i`'s row (`None` for an image that could not be decoded).
struct Cached {
    features: Tensor,
    labels: Tensor,
    rows: Vec<Option<u32>>,
}

impl Cached {
    /// The rows of `samples` that have one (the batch an uninterrupted loader would give, skipped images left
    /// out), or `None` when none of them has.
    fn batch(&self, samples: &[usize], device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let rows: Vec<u32> = samples.iter().filter_map(|&i| self.rows[i]).collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let idx = Tensor::new(rows, device)?;
        Ok(Some((
            self.features.index_select(&idx, 0)?,
            self.labels.index_select(&idx, 0)?,
        )))
    }

    fn rows(&self) -> usize {
        self.features.dims()[0]
    }
}

impl ActivationCache {
    /// `None` when the activations would not fit in `--cache-mb`: training then runs the whole network.
    fn build(s: &Session, level: usize, reporter: &mut Reporter) -> Result<Option<Self>> {
        let names = s.model.backbone.group_names();
        let what = if level >= s.n_groups {
            "backbone features".to_string()
        } else {
            format!("activations after {}", names[level - 1])
        };
        let too_big = |reporter: &mut Reporter, images: &str| {
            reporter.line(&format!(
                "{what} of the {images} images pass --cache-mb {}: not caching",
                s.cfg.cache_mb
            ));
        };
        let budget = s.cfg.cache_mb as f64 * (1u64 << 20) as f64;
        let Some(train) = s.prefix_outputs(&s.train_eval, level, budget)? else {
            too_big(reporter, "training");
            return Ok(None);
        };
        let val = if s.has_val() {
            let left = budget - (train.features.elem_count() * 4) as f64;
            let Some(v) = s.prefix_outputs(&s.val, level, left)? else {
                too_big(reporter, "validation");
                return Ok(None);
            };
            Some(v)
        } else {
            None
        };
        let bytes =
            (train.features.elem_count() + val.as_ref().map_or(0, |v| v.features.elem_count())) * 4;
        reporter.line(&format!(
            "frozen prefix, no augmentation: {what} computed once ({:.1} MiB)",
            bytes as f64 / (1u64 << 20) as f64
        ));
        Ok(Some(ActivationCache { level, train, val }))
    }
}

/// Saves weights, optimizer state and the train state as one checkpoint file, atomically.
fn save_checkpoint(
    path: &std::path::Path,
    model: &Classifier,
    opt: Option<&Optimizer>,
    state: &TrainState,
) -> Result<()> {
    let mut ck = Checkpoint::new(state)?;
    ck.insert_varmap("model", &model.varmap)?;
    if let Some(opt) = opt {
        ck.insert_prefixed("optim", opt.state().tensors);
    }
    ck.save(path)
}

/// Optimizer rule and scalars for [`TrainState::optimizer`], as the strings `OptimState::metadata` writes
/// (shortest round-trip notation: JSON numbers would not bring every f64 back bit for bit).
fn optim_meta(opt: &Optimizer) -> serde_json::Value {
    serde_json::json!(opt.state().metadata())
}

fn optim_state_from(ck: &Checkpoint, meta: &serde_json::Value) -> Result<OptimState> {
    let metadata: std::collections::HashMap<String, String> = serde_json::from_value(meta.clone())
        .map_err(|e| Error::config("checkpoint optimizer state", e.to_string()))?;
    OptimState::from_metadata(ck.with_prefix("optim").into_iter().collect(), &metadata)
}

/// Runs (or resumes) a fine-tuning run in `run_dir`. A `resume` of a run that has no checkpoint yet starts it
/// from the beginning.
pub fn finetune(
    cfg: &FinetuneConfig,
    run_dir: &RunDir,
    resume: bool,
    opts: &RunOptions,
) -> Result<Outcome> {
    validate(cfg)?;
    let mut reporter = Reporter::new(opts.quiet, cfg.freeze_epochs + cfg.epochs);
    let (s, report) = Session::build(cfg, &mut reporter)?;
    run_session(s, report, reporter, run_dir, resume, opts)
}

/// Runs a fresh fine-tuning run in a new run folder (`dir`, or a dated one under `runs/`), which is created only
/// once the config, the data and the weights have been checked: a bad flag or folder leaves nothing behind.
pub fn finetune_new(
    cfg: &FinetuneConfig,
    dir: Option<&Path>,
    opts: &RunOptions,
) -> Result<Outcome> {
    validate(cfg)?;
    let mut reporter = Reporter::new(opts.quiet, cfg.freeze_epochs + cfg.epochs);
    let (s, report) = Session::build(cfg, &mut reporter)?;
    let run_dir = RunDir::create(dir)?;
    eprintln!("run folder: {}", run_dir.path().display());
    run_session(s, report, reporter, &run_dir, false, opts)
}

fn run_session(
    s: Session,
    report: Option<LoadReport>,
    mut reporter: Reporter,
    run_dir: &RunDir,
    resume: bool,
    opts: &RunOptions,
) -> Result<Outcome> {
    let cfg = &s.cfg.clone();
    let total_epochs = cfg.freeze_epochs + cfg.epochs;
    if let Some(r) = &report {
        reporter.line(&r.summary());
    }
    if !resume {
        run_dir.write_config(cfg)?;
    }

    let mut early = EarlyStopping::new(cfg.monitor, cfg.patience, cfg.min_delta)?;
    let mut plateau: Option<ReduceOnPlateau> = None;
    let mut start_epoch = 0;
    let mut step: u64 = 0;
    let mut opt: Option<Optimizer> = None;
    let mut frozen = usize::MAX;
    let mut bad_steps: u64 = 0;
    let mut metrics_log;
    if resume && !run_dir.has_checkpoint() {
        reporter.line(&format!(
            "{} has no checkpoint yet (it stopped in its first epoch): starting it from the beginning",
            run_dir.path().display()
        ));
    }
    let resume = resume && run_dir.has_checkpoint();
    if resume {
        let path = run_dir.resume_checkpoint()?;
        let ck = Checkpoint::load(&path, &s.device)?;
        let state: TrainState = ck.meta()?;
        ck.restore_varmap("model", &s.model.varmap)?;
        start_epoch = state.epoch;
        step = state.step;
        bad_steps = state.bad_steps;
        if let Some(e) = state.early_stop {
            early = e;
        }
        if let Some(r) = state.rng.get("dropout") {
            s.model.head.set_rng_state(r)?;
        }
        plateau = serde_json::from_value(state.schedule["plateau"].clone()).unwrap_or(None);
        if start_epoch < total_epochs {
            frozen = frozen_at(cfg, start_epoch, s.n_groups);
            let mut o = s.optimizer(frozen)?;
            o.load_state(&optim_state_from(&ck, &state.optimizer)?)?;
            opt = Some(o);
        }
        metrics_log = MetricsLog::resume_with(run_dir.metrics_path(), start_epoch, &state.history)?;
        reporter.line(&format!(
            "resuming {} after epoch {start_epoch} (step {step})",
            run_dir.path().display()
        ));
    } else {
        metrics_log = MetricsLog::create(run_dir.metrics_path())?;
    }

    let mut history = MetricsLog::read(run_dir.metrics_path())?;
    let mut cache: Option<ActivationCache> = None;
    let mut stop_reason = None;
    for (epochs_this_run, epoch) in (start_epoch..total_epochs).enumerate() {
        if opts.stop_after.is_some_and(|n| epochs_this_run >= n) {
            reporter.line(&format!(
                "stopping after {epochs_this_run} epochs as asked (--stop-after)"
            ));
            return Ok(Outcome {
                run_dir: run_dir.path().to_path_buf(),
                epochs_run: epoch,
                best_epoch: early.best().map(|b| b.0),
                best_value: early.best().map(|b| b.1),
                stop_reason: Some("interrupted (--stop-after)".into()),
                val_acc: history.last().map_or(0.0, |m| m.val_acc),
                val_loss: history.last().map_or(f64::NAN, |m| m.val_loss),
            });
        }
        let t0 = Instant::now();
        let f = frozen_at(cfg, epoch, s.n_groups);
        if f != frozen || opt.is_none() {
            let mut o = s.optimizer(f)?;
            if let Some(old) = &opt {
                o.load_state(&old.state())?;
            }
            if f != frozen && frozen != usize::MAX {
                let names = s.model.backbone.group_names();
                reporter.line(&format!(
                    "epoch {}: training {}",
                    epoch + 1,
                    if f >= s.n_groups {
                        "the head only".to_string()
                    } else {
                        format!("from {} on", names[f])
                    }
                ));
            }
            opt = Some(o);
            frozen = f;
        }
        let opt_ref = opt.as_mut().expect("optimizer built above");
        let (sched, phase_step0, phase_steps) = s.schedule(epoch);
        if plateau.is_none() {
            plateau = sched.plateau();
        }
        // Cached activations: the frozen prefix runs once, later epochs train only the rest.
        let level = s.cache_level(frozen);
        if cache.as_ref().map(|c| c.level) != level {
            cache = None;
            if let Some(level) = level {
                cache = ActivationCache::build(&s, level, &mut reporter)?;
            }
        }
        let mut pass = reporter.pass("train", epoch + 1, s.steps_per_epoch);
        let mut lr = 0.0;
        let order_batches: Vec<Vec<usize>> = if cache.is_some() {
            s.train
                .epoch_order(epoch as u64)
                .chunks(s.train.config().batch_size)
                .map(<[usize]>::to_vec)
                .collect()
        } else {
            Vec::new()
        };
        let mut batches = s.train.epoch(epoch as u64);
        // BatchNorm layers that train take batch statistics, which one image does not have: a batch that
        // skipped images left with one is not trained on (the loader already drops a lone last image).
        let bn_trains = frozen < s.n_groups && s.train.config().batch_size > 1;
        #[allow(clippy::needless_range_loop)] // `i` also positions the step in the schedule
        for i in 0..s.steps_per_epoch {
            // The input (the cached features at `level`, or the images) and its labels.
            let (x, labels, level) = if let Some(c) = &cache {
                match c.train.batch(&order_batches[i], &s.device)? {
                    Some((x, y)) => (x, y, Some(c.level)),
                    None => continue,
                }
            } else {
                let Some(batch) = batches.next() else { break };
                let batch = batch?;
                (batch.images, batch.labels, None)
            };
            if bn_trains && labels.dim(0)? == 1 {
                continue;
            }
            let k = phase_step0 + i;
            lr = sched.lr_at(k, phase_steps) * plateau.as_ref().map_or(1.0, |p| p.factor());
            opt_ref.follow_momentum(sched.momentum_at(k, phase_steps))?;
            // Forward, backward and update on the thread pool (see `on_pool`); the batch was fetched
            // outside it. A step whose loss is not finite changes nothing (`None`).
            let outcome = on_pool(|| -> Result<Option<(f64, usize)>> {
                let logits = match level {
                    Some(level) => s.model.forward_from(&x, level, Mode::Train)?,
                    None => s.model.forward(&x, Mode::Train, frozen)?,
                };
                let loss = s.loss(&logits, &labels)?;
                let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !loss_v.is_finite() {
                    return Ok(None);
                }
                let mut grads = loss.backward()?;
                if let Some(max) = cfg.clip_grad_norm {
                    clip_grad_norm(&mut grads, opt_ref.vars().iter(), max)?;
                }
                opt_ref.step(&grads, lr)?;
                Ok(Some((loss_v, count_correct(&logits, &labels)?)))
            })?;
            step += 1;
            match outcome {
                Some((loss_v, correct)) => pass.batch(labels.dim(0)?, loss_v, correct),
                None => {
                    bad_steps += 1;
                    let last = if run_dir.has_checkpoint() {
                        format!("{} (epoch {epoch})", run_dir.last_checkpoint().display())
                    } else {
                        "none yet".to_string()
                    };
                    if bad_steps > cfg.max_bad_steps as u64 {
                        return Err(Error::Diverged {
                            reason: format!(
                                "the loss was not finite in {bad_steps} steps (the last at step {step}, epoch {}), more than --max-bad-steps {}; the last good checkpoint: {last}. Try a lower --lr or --clip-grad-norm",
                                epoch + 1,
                                cfg.max_bad_steps
                            ),
                        });
                    }
                    pass.note(&format!(
                            "warning: step {step} (epoch {}): the loss is not finite; step skipped ({bad_steps} of at most --max-bad-steps {})",
                            epoch + 1,
                            cfg.max_bad_steps
                    ));
                }
            }
        }
        drop(batches);
        let train_stats = pass.stats();
        let images_per_s = pass.images_per_s();
        pass.finish();

        // Evaluation with cached activations is only valid while the prefix has not moved.
        let (val_stats, _) = s.evaluate(cache.as_ref(), &mut reporter, epoch + 1)?;
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss: train_stats.loss(),
            train_acc: train_stats.accuracy(),
            val_loss: val_stats.loss(),
            val_acc: val_stats.accuracy(),
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s,
            extra: Default::default(),
        };
        let decision = if s.has_val() {
            if let Some(p) = plateau.as_mut() {
                p.observe(m.val_loss);
            }
            early.observe(epoch + 1, cfg.monitor.value(&m))
        } else {
            Decision::Continue { improved: false }
        };
        let improved = matches!(decision, Decision::Continue { improved: true });
        let decision = match opts.on_epoch.as_ref().map(|f| (f.0)(epoch + 1, &m)) {
            Some(stop @ Decision::Stop { .. }) => stop,
            _ => decision,
        };
        let state = TrainState {
            epoch: epoch + 1,
            step,
            early_stop: Some(early.clone()),
            rng: [("dropout".to_string(), s.model.head.rng_state())].into(),
            data: serde_json::json!({ "seed": cfg.seed, "next_epoch": epoch + 1 }),
            optimizer: optim_meta(opt_ref),
            schedule: serde_json::json!({ "plateau": plateau }),
            config: serde_json::to_value(cfg)
                .map_err(|e| Error::config("config", e.to_string()))?,
            classes: s.dataset.classes.clone(),
            history: history.iter().cloned().chain([m.clone()]).collect(),
            bad_steps,
        };
        crate::fsutil::kill_point("epoch_end");
        if improved {
            save_checkpoint(&run_dir.best_checkpoint(), &s.model, None, &state)?;
        }
        crate::fsutil::kill_point("after_best");
        save_checkpoint(&run_dir.last_checkpoint(), &s.model, Some(opt_ref), &state)?;
        crate::fsutil::kill_point("after_last");
        metrics_log.append(&m)?;
        reporter.epoch_done(&m, improved);
        history.push(m);
        if let Decision::Stop { reason, .. } = decision {
            reporter.line(&reason);
            stop_reason = Some(reason);
            break;
        }
    }

    // Keras's restore_best_weights: end with the best epoch's weights.
    let best = early.best();
    if best.is_some() && run_dir.best_checkpoint().is_file() {
        let ck = Checkpoint::load(run_dir.best_checkpoint(), &s.device)?;
        ck.restore_varmap("model", &s.model.varmap)?;
    }
    let (val_stats, cm) = s.evaluate(None, &mut reporter, history.len())?;
    crate::train::plots::plot_curves(&history, run_dir.curves_png())?;
    if s.has_val() {
        crate::train::plots::plot_confusion(&cm, &s.dataset.classes, run_dir.confusion_png())?;
    }
    let summary = format_summary(
        &history,
        best.map(|b| b.0),
        stop_reason.as_deref(),
        &cm,
        &s.dataset.classes,
    );
    reporter.line(&summary);
    let skipped = s.skipped_images();
    if !skipped.is_empty() {
        reporter.line(&format!(
            "skipped {} image file(s) that could not be read or were listed twice (each warned about above)",
            skipped.len()
        ));
    }
    let outcome = Outcome {
        run_dir: run_dir.path().to_path_buf(),
        epochs_run: history.len(),
        best_epoch: best.map(|b| b.0),
        best_value: best.map(|b| b.1),
        stop_reason,
        val_acc: val_stats.accuracy(),
        val_loss: val_stats.loss(),
    };
    let json =
        serde_json::to_vec_pretty(&outcome).map_err(|e| Error::config("summary", e.to_string()))?;
    crate::fsutil::write_atomic(&run_dir.summary_path(), &json)?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    /// The config the CLI builds from `flags` (after `graft finetune --base resnet18 --data d`).
    fn config(flags: &[&str]) -> FinetuneConfig {
        let mut argv = vec!["graft", "finetune", "--base", "resnet18", "--data", "d"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Finetune(a) => crate::cli::finetune::config_from_args(&a).unwrap(),
            _ => unreachable!("parsed a finetune command"),
        }
    }

    #[test]
    fn the_default_recipe_is_fastai_fine_tune() {
        let cfg = config(&[]);
        assert_eq!((cfg.freeze_epochs, cfg.epochs, cfg.lr), (1, 5, 2e-3));
        let (steps, spe) = (100, 100);
        let frozen = phase_schedule(&cfg, true, steps, spe);
        // Warm-up over 99% of the frozen phase from lr/25 to lr.
        assert!((frozen.lr_at(0, steps) - 2e-3 / 25.0).abs() < 1e-12);
        assert!((frozen.lr_at(98, steps) - 2e-3).abs() < 2e-6);
        // The unfrozen phase: from (lr/2)/5 up to lr/2 over 30%, down to lr/2/1e5 at the end.
        let unfrozen = phase_schedule(&cfg, false, steps, spe);
        assert!((unfrozen.lr_at(0, steps) - 1e-3 / 5.0).abs() < 1e-12);
        assert!((unfrozen.lr_at(30, steps) - 1e-3).abs() < 1e-12);
        let last = unfrozen.lr_at(steps - 1, steps);
        assert!(last < 1e-3 / 1e3, "ends at {last}");
    }

    #[test]
    fn a_single_phase_or_another_schedule_runs_at_the_given_rate() {
        let probe = config(&["--freeze-epochs", "4", "--epochs", "0", "--lr", "1e-2"]);
        let s = phase_schedule(&probe, true, 40, 10);
        assert!(
            (s.lr_at(10, 40) - 1e-2).abs() < 1e-12,
            "plain fit_one_cycle peaks at 25%"
        );
        let constant = config(&["--schedule", "constant", "--lr", "1e-3"]);
        assert_eq!(phase_schedule(&constant, false, 40, 10).lr_at(7, 40), 1e-3);
    }

    #[test]
    fn frozen_groups_follow_freeze_epochs_prefix_and_gradual_unfreezing() {
        let cfg = config(&["--freeze-epochs", "2", "--unfreeze-at", "4:layer4,6:layer2"]);
        let frozen: Vec<usize> = (0..7).map(|e| frozen_at(&cfg, e, 5)).collect();
        assert_eq!(frozen, [5, 5, 5, 4, 4, 2, 2]);
    }
}
