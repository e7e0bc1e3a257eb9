//! `graft finetune`: a backbone with a new head, trained on a folder of labelled images through the one
//! runner ([`crate::train::runner`]).
//!
//! What fine-tuning adds to the runner: two phases (the backbone frozen, then unfrozen) that form one run,
//! the freezing plan of each epoch ([`frozen_at`]: `--freeze-epochs`, `--freeze`, `--unfreeze-at`) with
//! discriminative learning rates, fastai's `fine_tune` schedule, the classification loss, validation, and the
//! activation cache of a frozen prefix. The base is resolved once, at the start of a fresh run, into a
//! [`ClassifierSpec`] that every checkpoint carries; a resume builds the model from that spec.

use crate::data::{self, Dataset, ImageFolder, Loader, LoaderConfig};
use crate::formats::checkpoint::Checkpoint;
use crate::kernels::par::on_pool;
use crate::kernels::precision::{autocast, bf16_supported, Precision};
use crate::models::base::{self, Base};
use crate::models::classifier::{Classifier, ClassifierSpec};
use crate::models::Mode;
use crate::optim::groups::{
    discriminative_groups, even_mults, layer_decay_mults, trainable_params,
};
use crate::optim::{Optimizer, ScheduleConfig};
use crate::rng::{seeded, RngState};
use crate::train::checkpoint::{Position, RunDir, TrainState};
use crate::train::config::{
    check_memory, classifier_spec, validate, FinetuneConfig, LrFound, ScheduleKind,
};
use crate::train::feature_store::{FeatureStore, Key, Stored};
use crate::train::loss::cross_entropy;
use crate::train::lr_find::{self, LrFindConfig, LrFinding};
use crate::train::metrics::{count_correct, ConfusionMatrix, RunningStats};
use crate::train::mixing::Mixing;
use crate::train::progress::{format_summary, Reporter};
use crate::train::runner::{
    self, BatchLoss, Coupling, Eval, Frame, PhasePlan, Policy, RunOptions, StepAt, Task,
};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Mixed into the seed for stochastic depth's masks, so they are not the mixing's draws.
const DROP_PATH_STREAM: u64 = 0xD809_9A7B;

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
    dataset: Dataset,
    model: Classifier,
    train: Loader,
    /// The training samples in order with the evaluation transform (for cached features).
    train_eval: Loader,
    val: Loader,
    class_weights: Option<Tensor>,
    n_groups: usize,
    frame: Frame,
    /// Groups frozen in the epoch being trained (the plan [`Task::prepare`] was last given).
    frozen: usize,
    cache: Option<ActivationCache>,
    /// Where computed prefix outputs are shared with other runs ([`RunOptions::feature_store`]).
    store: Option<PathBuf>,
    /// Images the feature store's entries say could not be decoded (for the final count).
    stored_skips: std::sync::Mutex<std::collections::BTreeSet<PathBuf>>,
}

/// Where the model of a session comes from.
enum ModelSource {
    /// A fresh run: the resolved base, its starting weights read once.
    Base(Base),
    /// A resumed run: the spec its checkpoint carries (the weights come from the checkpoint).
    Checkpoint(ClassifierSpec),
}

/// One training batch: the input (images, or a frozen prefix's cached outputs at `level`) and its labels.
struct Batch {
    x: Tensor,
    labels: Tensor,
    level: Option<usize>,
}

impl Session {
    fn build(
        cfg: &FinetuneConfig,
        source: ModelSource,
        reporter: &mut Reporter,
    ) -> Result<Session> {
        let device = crate::device::parse_device(&cfg.device)?;
        let mut dataset = ImageFolder::open(&cfg.data, cfg.val_split, cfg.seed)?;
        dataset.drop_unreadable()?;
        if dataset.val.is_empty() && cfg.patience.is_some() {
            return Err(Error::Dataset {
                path: cfg.data.clone(),
                reason: "early stopping (--patience) needs validation images: add a val/ folder or use --val-split > 0".into(),
            });
        }
        let model = build_model(cfg, &source, &dataset.classes, &device, reporter)?;
        let preprocess = model.spec.preprocess.clone();
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
            augment: cfg.augmentation(),
            ..Default::default()
        };
        let loader = |samples: &Vec<data::Sample>, c: LoaderConfig| {
            Loader::new(samples.clone(), n, preprocess.clone(), c, &device)
        };
        let train = loader(&dataset.train, train_cfg)?;
        let train_eval = loader(&dataset.train, LoaderConfig::eval(cfg.batch_size))?;
        let val = loader(&dataset.val, LoaderConfig::eval(cfg.batch_size))?;
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
        let steps = train.batches_per_epoch().div_ceil(cfg.accumulate.max(1));
        let frame = frame(cfg, steps, device, model.varmap.clone());
        Ok(Session {
            cfg: cfg.clone(),
            dataset,
            model,
            train,
            train_eval,
            val,
            class_weights,
            n_groups,
            frame,
            frozen: usize::MAX,
            cache: None,
            store: None,
            stored_skips: Default::default(),
        })
    }

    /// What the frozen prefix of `level` groups makes of `loader`'s samples, in order, with their labels
    /// (see [`Classifier::frozen_prefix`]), or `None` once they would take more than `budget` bytes. Read
    /// from the feature store when it has them, and kept there when it has not.
    fn prefix_outputs(&self, loader: &Loader, level: usize, budget: f64) -> Result<Option<Cached>> {
        let store = match &self.store {
            Some(dir) => Some((FeatureStore::new(dir), self.prefix_key(loader, level)?)),
            None => None,
        };
        if let Some((store, key)) = &store {
            if let Some(stored) = store.load(key, &self.frame.device)? {
                if (stored.features.elem_count() * 4) as f64 > budget {
                    return Ok(None);
                }
                for (path, reason) in &stored.skipped {
                    data::decode::warn_skipped(path, reason);
                }
                let mut skips = self.stored_skips.lock().unwrap_or_else(|e| e.into_inner());
                skips.extend(stored.skipped.iter().map(|(p, _)| p.clone()));
                return Ok(Some(Cached {
                    features: stored.features,
                    labels: stored.labels,
                    rows: stored.rows,
                    stored: true,
                }));
            }
        }
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
        let cached = Cached {
            features: Tensor::cat(&outs, 0)?,
            labels: Tensor::cat(&labels, 0)?,
            rows,
            stored: false,
        };
        if let Some((store, key)) = &store {
            let stored = Stored {
                features: cached.features.clone(),
                labels: cached.labels.clone(),
                rows: cached.rows.clone(),
                skipped: loader.skipped(),
            };
            store.save(key, &stored)?;
        }
        Ok(Some(cached))
    }

    /// The feature-store key of the outputs of the frozen prefix of `level` groups on `loader`'s samples.
    fn prefix_key(&self, loader: &Loader, level: usize) -> Result<Key> {
        let mut key = Key::new();
        key.part("arch", self.model.spec.arch.as_bytes());
        key.part("level", &(level as u64).to_le_bytes());
        let preprocess = serde_json::to_vec(&self.model.spec.preprocess)
            .map_err(|e| Error::config("preprocessing", e.to_string()))?;
        key.part("preprocess", &preprocess);
        let vars = self.model.varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = vars
            .keys()
            .filter(|name| self.model.group_of(name).is_some_and(|g| g < level))
            .collect();
        names.sort();
        for name in names {
            key.tensor(name, vars[name].as_tensor())?;
        }
        for sample in loader.samples() {
            key.image(&sample.path, sample.label);
        }
        Ok(key)
    }

    /// The number of frozen groups whose outputs can be computed once for the epochs ahead: the frozen
    /// prefix, when no random augmentation changes the inputs and no BatchNorm inside it trains.
    fn cache_level(&self, frozen: usize) -> Option<usize> {
        let random_inputs = self.cfg.augmentation().is_some() || self.cfg.mixing().is_on();
        (frozen > 0 && !random_inputs && !self.cfg.train_bn && self.cfg.cache_mb > 0)
            .then_some(frozen.min(self.n_groups))
    }

    /// Every file of the dataset left out so far, once each: those the folder scan refused and those a loader
    /// failed to decode.
    fn skipped_images(&self) -> std::collections::BTreeSet<PathBuf> {
        let scanned = self.dataset.skipped.iter().map(|(p, _)| p.clone());
        let loaders = [&self.train, &self.train_eval, &self.val]
            .into_iter()
            .flat_map(|l| l.skipped().into_iter().map(|(p, _)| p));
        let stored = self
            .stored_skips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        scanned.chain(loaders).chain(stored).collect()
    }

    /// Whether there are validation images (without them: no early stopping, the last weights are kept).
    fn has_val(&self) -> bool {
        !self.dataset.val.is_empty()
    }

    /// Validation loss, accuracy and confusion matrix, everything frozen (no graph, running stats untouched),
    /// from the cached outputs of the frozen prefix when `cached` (valid only while the prefix has not moved).
    fn validate_pass(
        &self,
        cached: bool,
        reporter: &mut Reporter,
        epoch: usize,
    ) -> Result<(RunningStats, ConfusionMatrix)> {
        let classes = self.dataset.classes.len();
        if !self.has_val() {
            return Ok((RunningStats::new(), ConfusionMatrix::new(classes)));
        }
        let mut pass = reporter.pass("val", epoch, self.val.batches_per_epoch());
        let progress = |n, loss, correct| pass.batch(n, loss, correct);
        let cached = cached
            .then_some(self.cache.as_ref())
            .flatten()
            .and_then(|c| c.val.as_ref().map(|v| (c.level, v)));
        let result = match cached {
            Some((level, v)) => {
                let (n, bs) = (v.rows(), self.cfg.batch_size);
                let batches = (0..n).step_by(bs).map(|start| {
                    let len = bs.min(n - start);
                    let x = v.features.narrow(0, start, len)?;
                    let logits = on_pool(|| self.model.forward_from(&x, level, Mode::Frozen))?;
                    Ok((logits, v.labels.narrow(0, start, len)?))
                });
                crate::train::evaluate::classification(classes, batches, progress)?
            }
            None => {
                let batches = self.val.epoch(0).map(|batch| {
                    let batch = batch?;
                    Ok((on_pool(|| self.model.predict(&batch.images))?, batch.labels))
                });
                crate::train::evaluate::classification(classes, batches, progress)?
            }
        };
        pass.finish();
        Ok(result)
    }
}

/// The classifier of a session: from the resolved base with its starting weights (a fresh run), or from the
/// spec of the run's checkpoint (a resume; the weights then come from the checkpoint).
fn build_model(
    cfg: &FinetuneConfig,
    source: &ModelSource,
    classes: &[String],
    device: &Device,
    reporter: &mut Reporter,
) -> Result<Classifier> {
    let spec = match source {
        ModelSource::Base(base) => classifier_spec(cfg, base, classes.to_vec())?,
        ModelSource::Checkpoint(spec) if spec.classes != classes => {
            return Err(Error::Dataset {
                path: cfg.data.clone(),
                reason: format!(
                    "its classes ({}) are not the run's ({})",
                    classes.join(", "),
                    spec.classes.join(", ")
                ),
            })
        }
        ModelSource::Checkpoint(spec) => spec.clone(),
    };
    check_memory(cfg, &spec.preprocess)?;
    let mut model = Classifier::new(spec, device)?;
    model.train_bn = cfg.train_bn;
    if let ModelSource::Base(base) = source {
        model.head.reset_parameters(&mut seeded(cfg.seed))?;
        let report = if cfg.pretrained {
            base.read_weights(cfg.weights.as_deref(), device)?
                .map(|file| model.load_backbone(&file))
                .transpose()?
        } else {
            None
        };
        match report {
            Some(r) => reporter.line(&r.summary()),
            None => base.seed_random_init(&model.varmap, cfg.seed)?,
        }
    }
    Ok(model)
}

/// Fine-tuning's two phases (the backbone frozen, then trained), which form one run, and its policies.
fn frame(cfg: &FinetuneConfig, steps_per_epoch: usize, device: Device, varmap: VarMap) -> Frame {
    let phase = |name: &str, epochs| PhasePlan {
        name: name.into(),
        epochs,
    };
    Frame {
        phases: vec![
            phase("frozen", cfg.freeze_epochs),
            phase("train", cfg.epochs),
        ],
        policy: Policy {
            coupling: Coupling::Continuous,
            monitor: cfg.monitor,
            patience: cfg.patience,
            min_delta: cfg.min_delta,
            restore_best: true,
            clip_grad_norm: cfg.clip_grad_norm,
            max_bad_steps: cfg.max_bad_steps,
            max_bad_steps_flag: "--max-bad-steps",
            accumulate: cfg.accumulate,
            ema: cfg.ema,
        },
        steps_per_epoch,
        device,
        varmap,
    }
}

impl Task for Session {
    type Batch = Batch;
    type Config = FinetuneConfig;
    type Record = ClassifierSpec;

    fn frame(&self) -> &Frame {
        &self.frame
    }
    fn config(&self) -> &FinetuneConfig {
        &self.cfg
    }
    fn record(&self) -> ClassifierSpec {
        self.model.spec.clone()
    }

    fn plan(&self, epoch: usize, _phase: usize) -> usize {
        frozen_at(&self.cfg, epoch, self.n_groups)
    }

    /// An optimizer over the groups trainable with `frozen` groups frozen, with discriminative rates.
    fn optimizer(&self, frozen: usize) -> Result<Optimizer> {
        let n = self.n_groups;
        let model = &self.model;
        // Layer decay: the optimizer's groups are the backbone's decay layers (a ViT's blocks), not its
        // layer groups; freezing still goes by layer group.
        let decay = self.cfg.layer_decay;
        let mults = match decay {
            Some(d) => layer_decay_mults(d, model.backbone.decay_layers()),
            None => even_mults(1.0 / self.cfg.lr_mult, 1.0, n + 1),
        };
        let layer_of = |name: &str| match decay {
            Some(_) => model.decay_layer_of(name),
            None => model.group_of(name),
        };
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
                let trainable = model
                    .group_of(name)
                    .is_some_and(|g| g >= frozen || bn_affine.contains(name));
                layer_of(name).filter(|_| trainable)
            },
            &mults,
            true,
        )?;
        self.cfg.optimizer.build(groups)
    }

    fn announce(
        &self,
        _at: Position,
        epoch: usize,
        previous: Option<usize>,
        frozen: usize,
    ) -> Option<String> {
        previous?;
        let names = self.model.backbone.group_names();
        Some(format!(
            "epoch {}: training {}",
            epoch + 1,
            if frozen >= self.n_groups {
                "the head only".to_string()
            } else {
                format!("from {} on", names[frozen])
            }
        ))
    }

    fn schedule(&self, phase: usize, steps: usize) -> ScheduleConfig {
        let first = phase == 0 || self.cfg.freeze_epochs == 0;
        phase_schedule(&self.cfg, first, steps, self.frame.steps_per_epoch)
    }

    /// Cached activations: the frozen prefix runs once, later epochs train only the rest.
    fn prepare(&mut self, frozen: usize, reporter: &mut Reporter) -> Result<()> {
        self.frozen = frozen;
        let level = self.cache_level(frozen);
        if self.cache.as_ref().map(|c| c.level) != level {
            self.cache = None;
            if let Some(level) = level {
                self.cache = ActivationCache::build(self, level, reporter)?;
            }
        }
        Ok(())
    }

    fn batches(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<(usize, Batch)>> + '_> {
        // BatchNorm layers that train take batch statistics, which one image does not have: a batch that
        // skipped images left with one is not trained on (the loader already drops a lone last image).
        let bn_trains = self.frozen < self.n_groups && self.train.config().batch_size > 1;
        let trainable = move |item: &Result<(usize, Batch)>| match item {
            Ok((_, b)) => !(bn_trains && b.labels.dims().first() == Some(&1)),
            Err(_) => true,
        };
        match &self.cache {
            Some(c) => {
                let order: Vec<Vec<usize>> = self
                    .train
                    .epoch_order(epoch as u64)
                    .chunks(self.train.config().batch_size)
                    .map(<[usize]>::to_vec)
                    .collect();
                let device = &self.frame.device;
                Box::new(
                    order
                        .into_iter()
                        .enumerate()
                        .filter_map(move |(i, samples)| {
                            c.train.batch(&samples, device).transpose().map(|r| {
                                r.map(|(x, labels)| {
                                    let level = Some(c.level);
                                    (i, Batch { x, labels, level })
                                })
                            })
                        })
                        .filter(trainable),
                )
            }
            None => Box::new(
                self.train
                    .epoch(epoch as u64)
                    .enumerate()
                    .map(|(i, b)| {
                        b.map(|b| {
                            let (x, labels) = (b.images, b.labels);
                            (
                                i,
                                Batch {
                                    x,
                                    labels,
                                    level: None,
                                },
                            )
                        })
                    })
                    .filter(trainable),
            ),
        }
    }

    fn loss(&self, b: &Batch, at: StepAt) -> Result<BatchLoss> {
        let mixing = match (b.level, b.x.dims()) {
            (None, &[_, _, h, w]) => {
                self.cfg
                    .mixing()
                    .draw(self.cfg.seed, at.epoch, at.batch, h, w)
            }
            _ => Mixing::None,
        };
        let x = mixing.images(&b.x)?;
        // Stochastic depth's masks: a function of (seed, epoch, batch), as the mixing's.
        let stream = crate::rng::mix(
            crate::rng::mix(crate::rng::mix(self.cfg.seed ^ DROP_PATH_STREAM) ^ at.epoch as u64)
                ^ at.batch as u64,
        );
        let logits = crate::models::layers::seeded_drop_path(stream, || match b.level {
            Some(level) => self.model.forward_from(&x, level, Mode::Train),
            None => self.model.forward(&x, Mode::Train, self.frozen),
        })?;
        let loss = mixing.loss(&b.labels, |labels| {
            cross_entropy(
                &logits,
                labels,
                self.cfg.label_smoothing,
                self.class_weights.as_ref(),
            )
        })?;
        Ok(BatchLoss {
            loss,
            images: b.labels.dim(0)?,
            correct: Some(count_correct(&logits, &mixing.dominant_labels(&b.labels)?)?),
        })
    }

    fn evaluate(
        &self,
        _phase: usize,
        epoch: usize,
        reporter: &mut Reporter,
    ) -> Result<Option<Eval>> {
        if !self.has_val() {
            return Ok(None);
        }
        let (stats, _) = self.validate_pass(true, reporter, epoch)?;
        Ok(Some(Eval {
            loss: stats.loss(),
            acc: stats.accuracy(),
        }))
    }

    fn rng_states(&self) -> BTreeMap<String, RngState> {
        [("dropout".to_string(), self.model.head.rng_state())].into()
    }

    fn restore_rngs(&self, states: &BTreeMap<String, RngState>) -> Result<()> {
        if let Some(r) = states.get("dropout") {
            self.model.head.set_rng_state(r)?;
        }
        Ok(())
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
    /// Read from the feature store rather than computed.
    stored: bool,
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
        let how = if train.stored && val.as_ref().is_none_or(|v| v.stored) {
            "read from the feature store"
        } else {
            "computed once"
        };
        reporter.line(&format!(
            "frozen prefix, no augmentation: {what} {how} ({:.1} MiB)",
            bytes as f64 / (1u64 << 20) as f64
        ));
        Ok(Some(ActivationCache { level, train, val }))
    }
}

/// Runs (or resumes) a fine-tuning run in `run_dir`. A `resume` of a run that has no checkpoint yet starts it
/// from the beginning; one that has builds its model from the checkpoint's [`ClassifierSpec`].
pub fn finetune(
    cfg: &FinetuneConfig,
    run_dir: &RunDir,
    resume: bool,
    opts: &RunOptions,
) -> Result<Outcome> {
    validate(cfg)?;
    autocast(cfg.precision, || {
        let mut reporter = Reporter::new(opts.quiet, cfg.freeze_epochs + cfg.epochs);
        report_precision(cfg.precision, &cfg.device, &mut reporter);
        let source = if resume && run_dir.has_checkpoint() {
            let path = run_dir.resume_checkpoint()?;
            let ck = Checkpoint::load(&path, &Device::Cpu)?;
            let state: TrainState<serde_json::Value, ClassifierSpec> =
                TrainState::from_checkpoint(&ck, &path)?;
            ModelSource::Checkpoint(state.model)
        } else {
            ModelSource::Base(base::resolve(&cfg.base)?)
        };
        let s = Session::build(cfg, source, &mut reporter)?;
        run_session(s, reporter, run_dir, resume, opts)
    })
}

/// One line when bf16 was asked for on a CPU that multiplies it no faster than f32.
pub(crate) fn report_precision(precision: Precision, device: &str, reporter: &mut Reporter) {
    if precision == Precision::Bf16 && device == "cpu" && !bf16_supported() {
        reporter.line("--precision bf16: this CPU has no AVX512-BF16, so the products run in f32");
    }
}

/// Runs a fresh fine-tuning run in a new run folder (`dir`, or a dated one under `runs/`), which is created only
/// once the config, the data and the weights have been checked: a bad flag or folder leaves nothing behind.
pub fn finetune_new(
    cfg: &FinetuneConfig,
    dir: Option<&Path>,
    opts: &RunOptions,
) -> Result<Outcome> {
    validate(cfg)?;
    autocast(cfg.precision, || finetune_new_in_scope(cfg, dir, opts))
}

/// [`finetune_new`] inside its precision scope.
fn finetune_new_in_scope(
    cfg: &FinetuneConfig,
    dir: Option<&Path>,
    opts: &RunOptions,
) -> Result<Outcome> {
    let mut reporter = Reporter::new(opts.quiet, cfg.freeze_epochs + cfg.epochs);
    report_precision(cfg.precision, &cfg.device, &mut reporter);
    let base = base::resolve(&cfg.base)?;
    let mut s = Session::build(cfg, ModelSource::Base(base), &mut reporter)?;
    let run_dir = RunDir::create(dir)?;
    eprintln!("run folder: {}", run_dir.path().display());
    if let Some(rule) = cfg.lr_find {
        s.store = opts.feature_store.clone();
        let (finding, phase) = find_on(&mut s, &LrFindConfig::default(), &mut reporter)?;
        finding.plot(
            LrFindConfig::default().num_it,
            &run_dir.path().join(LR_FIND_PNG),
        )?;
        let lr = finding.suggested(rule)?;
        reporter.line(&format!(
            "learning-rate finder ({}, {phase} phase): --lr {lr:.3e}",
            rule.name()
        ));
        s.cfg.lr = lr;
        s.cfg.lr_find = None;
        s.cfg.lr_found = Some(LrFound {
            rule,
            lr,
            phase: phase.to_string(),
        });
    }
    run_session(s, reporter, &run_dir, false, opts)
}

/// The file the learning-rate finder's curve is drawn to, in a run folder.
pub const LR_FIND_PNG: &str = "lr_find.png";

/// The learning-rate finder on a session, for the plan of its first phase that trains; returns the finding
/// and that phase's name. The session's weights and generators are as before.
fn find_on(
    s: &mut Session,
    finder: &LrFindConfig,
    reporter: &mut Reporter,
) -> Result<(LrFinding, String)> {
    let phase = s
        .frame
        .phases
        .iter()
        .position(|p| p.epochs > 0)
        .unwrap_or(0);
    let name = s.frame.phases[phase].name.clone();
    Ok((lr_find::find(s, phase, finder, reporter)?, name))
}

/// `graft lr-find`: the learning-rate finder on the run `cfg` describes (its first phase's plan: the head
/// alone when `freeze_epochs > 0`), without training it. Writes the curve to `plot`.
pub fn find_lr(
    cfg: &FinetuneConfig,
    finder: &LrFindConfig,
    plot: &Path,
    quiet: bool,
) -> Result<(LrFinding, String)> {
    validate(cfg)?;
    finder.validate()?;
    autocast(cfg.precision, || {
        let mut reporter = Reporter::new(quiet, 1);
        report_precision(cfg.precision, &cfg.device, &mut reporter);
        let base = base::resolve(&cfg.base)?;
        let mut s = Session::build(cfg, ModelSource::Base(base), &mut reporter)?;
        let (finding, phase) = find_on(&mut s, finder, &mut reporter)?;
        finding.plot(finder.num_it, plot)?;
        Ok((finding, phase))
    })
}

fn run_session(
    mut s: Session,
    mut reporter: Reporter,
    run_dir: &RunDir,
    resume: bool,
    opts: &RunOptions,
) -> Result<Outcome> {
    s.store = opts.feature_store.clone();
    let end = runner::run(&mut s, run_dir, resume, opts, &mut reporter)?;
    let best = end.best;
    let last = end.history.last();
    if end.interrupted {
        return Ok(Outcome {
            run_dir: run_dir.path().to_path_buf(),
            epochs_run: end.epochs_done,
            best_epoch: best.map(|b| b.0),
            best_value: best.map(|b| b.1),
            stop_reason: end.stop_reason,
            val_acc: last.map_or(0.0, |m| m.val_acc),
            val_loss: last.map_or(f64::NAN, |m| m.val_loss),
        });
    }
    // The runner ended with the best epoch's weights (Keras's restore_best_weights).
    let (val_stats, cm) = s.validate_pass(false, &mut reporter, end.history.len())?;
    crate::train::plots::plot_curves(&end.history, run_dir.curves_png())?;
    if s.has_val() {
        crate::train::plots::plot_confusion(&cm, &s.dataset.classes, run_dir.confusion_png())?;
    }
    let summary = format_summary(
        &end.history,
        best.map(|b| b.0),
        end.stop_reason.as_deref(),
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
        epochs_run: end.history.len(),
        best_epoch: best.map(|b| b.0),
        best_value: best.map(|b| b.1),
        stop_reason: end.stop_reason,
        val_acc: val_stats.accuracy(),
        val_loss: val_stats.loss(),
    };
    runner::write_summary(run_dir, &outcome)?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default config for `resnet18` on folder `d`.
    fn config() -> FinetuneConfig {
        FinetuneConfig {
            base: "resnet18".into(),
            data: "d".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_default_recipe_is_fastai_fine_tune() {
        let cfg = config();
        assert_eq!((cfg.freeze_epochs, cfg.epochs, cfg.lr), (1, 10, 2e-3));
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
        let probe = FinetuneConfig {
            freeze_epochs: 4,
            epochs: 0,
            lr: 1e-2,
            ..config()
        };
        let s = phase_schedule(&probe, true, 40, 10);
        assert!(
            (s.lr_at(10, 40) - 1e-2).abs() < 1e-12,
            "plain fit_one_cycle peaks at 25%"
        );
        let constant = FinetuneConfig {
            schedule: ScheduleKind::Constant,
            lr: 1e-3,
            ..config()
        };
        assert_eq!(phase_schedule(&constant, false, 40, 10).lr_at(7, 40), 1e-3);
    }

    #[test]
    fn frozen_groups_follow_freeze_epochs_prefix_and_gradual_unfreezing() {
        // `--freeze-epochs 2 --unfreeze-at 4:layer4,6:layer2` on ResNet's groups (stem, layer1..layer4).
        let cfg = FinetuneConfig {
            freeze_epochs: 2,
            unfreeze_at: vec![(4, 4), (6, 2)],
            ..config()
        };
        let frozen: Vec<usize> = (0..7).map(|e| frozen_at(&cfg, e, 5)).collect();
        assert_eq!(frozen, [5, 5, 5, 4, 4, 2, 2]);
    }
}
