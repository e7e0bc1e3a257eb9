//! Unsupervised greedy layer-wise pretraining: `graft pretrain`.
//!
//! A run trains a stacked autoencoder ([`model::StackedAutoencoder`], dense or convolutional) or a stack of
//! Bernoulli-Bernoulli RBMs on unlabelled images, one stage at a time: stage K learns to reconstruct the
//! codes of stages 1..K-1, which stay frozen (their weights are detached and left out of the optimizer).
//! An optional last phase fine-tunes the whole stack end to end on the reconstruction of the images. The
//! encoder is then written as `encoder.safetensors` + `encoder.json`, which `graft finetune --base
//! ae:RUN_DIR` starts a classifier from.
//!
//! The loop composes the project's training pieces rather than generalising the classification loop of
//! [`crate::train::finetune`] (whose batches, losses and metrics are about labels): the same optimizers and
//! schedules (one optimizer and one schedule per phase), the same early-stopping policy (per phase, on the
//! validation reconstruction loss; a phase that stops early hands over to the next), the same run folder,
//! checkpoint format, metrics log and progress bars. The checkpoint written after every epoch holds the
//! weights, the optimizer state and the position (phase, epochs done in it), so `--resume` continues with
//! the next epoch of the current phase. Noise and CD samples are drawn from generators seeded by (seed,
//! phase, epoch, batch), so a resumed run draws what an uninterrupted one would.

pub mod config;
pub mod grid;
pub mod model;

use crate::data::{list_images, Loader, LoaderConfig, Sample};
use crate::kernels::par::on_pool;
use crate::models::base::{EncoderInfo, ENCODER_INFO, ENCODER_WEIGHTS};
use crate::models::encoder::{EncoderActivation, EncoderConfig};
use crate::models::Mode;
use crate::optim::groups::{no_decay_groups, trainable_params};
use crate::optim::schedule::ReduceOnPlateau;
use crate::optim::{clip_grad_norm, OptimState, Optimizer};
use crate::train::checkpoint::{Checkpoint, RunDir, TrainState};
use crate::train::early_stop::{Decision, EarlyStopping, Monitor};
use crate::train::metrics::{EpochMetrics, MetricsLog, RunningStats};
use crate::train::progress::Reporter;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use config::{Method, Noise, PretrainConfig, Sparsity};
use model::StackedAutoencoder;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub run_dir: PathBuf,
    pub epochs_run: usize,
    /// Validation reconstruction MSE of the full stack at the end (pixels in [0, 1]).
    pub val_loss: f64,
    /// The encoder file; `None` when the run was interrupted (`--stop-after`) before its end.
    pub encoder: Option<PathBuf>,
}

/// Options of one invocation (not saved).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub quiet: bool,
    /// Stop after this many epochs in this invocation, as if interrupted after a checkpoint.
    pub stop_after: Option<usize>,
}

/// Where a run stands: saved in each checkpoint's `data` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    /// Current phase (stage index, or the number of stages for fine-tuning).
    phase: usize,
    /// Epochs finished in it.
    phase_epoch: usize,
    /// Whether the phase ended (all epochs, or stopped early).
    phase_done: bool,
}

/// SplitMix64's finaliser, to derive independent seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform `[0, 1)` values of `shape` from `rng`.
fn uniform(shape: &[usize], rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// `x` corrupted by `noise`.
fn corrupt(x: &Tensor, noise: Noise, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    match noise {
        Noise::Gaussian { std } => {
            // Box-Muller from seeded uniforms.
            let u1 = uniform(&dims, rng, x.device())?;
            let u2 = uniform(&dims, rng, x.device())?;
            let r = ((1.0 - u1)?.log()? * -2.0)?.sqrt()?;
            let z = (r * (u2 * std::f64::consts::TAU)?.cos()?)?;
            Ok((x + (z * std)?)?)
        }
        Noise::Dropout { rate } => {
            let keep = uniform(&dims, rng, x.device())?
                .ge(rate as f32)?
                .to_dtype(x.dtype())?;
            Ok((x * keep)?.affine(1.0 / (1.0 - rate), 0.0)?)
        }
    }
}

/// The sparsity penalty of `code`.
fn sparsity_penalty(code: &Tensor, s: Sparsity) -> Result<Tensor> {
    match s {
        Sparsity::L1 { weight } => Ok((code.abs()?.mean_all()? * weight)?),
        Sparsity::Kl { target, weight } => {
            // Mean activation of each unit (channel) over the batch (and positions).
            let flat = if code.rank() == 4 {
                code.transpose(0, 1)?.flatten_from(1)?.t()?
            } else {
                code.clone()
            };
            let q = flat.mean(0)?.clamp(1e-6, 1.0 - 1e-6)?;
            let p = target;
            let kl = ((q.log()?.affine(-p, p * p.ln()))?
                + ((1.0 - &q)?
                    .log()?
                    .affine(-(1.0 - p), (1.0 - p) * (1.0 - p).ln()))?)?;
            Ok((kl.sum_all()? * weight)?)
        }
    }
}

fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Everything a run needs at hand.
struct Session {
    cfg: PretrainConfig,
    device: Device,
    model: StackedAutoencoder,
    train: Loader,
    val: Loader,
    /// A few images for the reconstruction grids.
    grid_images: Tensor,
    steps_per_epoch: usize,
}

/// The images of `cfg.data` split into (train, val), seeded.
fn split_images(cfg: &PretrainConfig) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let mut paths = list_images(&cfg.data)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    paths.shuffle(&mut rng);
    if let Some(m) = cfg.max_images {
        paths.truncate(m.max(1));
    }
    let n_val = ((paths.len() as f64) * cfg.val_split).round() as usize;
    let n_val = n_val.min(paths.len().saturating_sub(1));
    let to_samples = |p: &[PathBuf]| {
        let mut s: Vec<Sample> = p
            .iter()
            .map(|path| Sample {
                path: path.clone(),
                label: 0,
            })
            .collect();
        s.sort_by(|a, b| a.path.cmp(&b.path));
        s
    };
    Ok((to_samples(&paths[n_val..]), to_samples(&paths[..n_val])))
}

impl Session {
    fn build(cfg: &PretrainConfig, enc: EncoderConfig, reporter: &mut Reporter) -> Result<Session> {
        let device = crate::device::parse_device(&cfg.device)?;
        let tied = cfg.tied || cfg.method == Method::Rbm;
        let model = StackedAutoencoder::new(enc, tied, &device)?;
        init_weights(&model, cfg.seed)?;
        let (train_s, val_s) = split_images(cfg)?;
        let p = cfg.preprocess();
        let batch_size = cfg.batch_size.min(train_s.len());
        let train = Loader::new(
            train_s.clone(),
            1,
            p.clone(),
            LoaderConfig {
                batch_size,
                shuffle: true,
                drop_last: true,
                seed: cfg.seed,
                ..Default::default()
            },
            &device,
        )?;
        let val = Loader::new(
            val_s.clone(),
            1,
            p.clone(),
            LoaderConfig::eval(cfg.batch_size),
            &device,
        )?;
        let grid_src = if val_s.is_empty() { &train_s } else { &val_s };
        let grid_loader = Loader::new(
            grid_src
                .iter()
                .step_by((grid_src.len() / grid::GRID_IMAGES).max(1))
                .take(grid::GRID_IMAGES)
                .cloned()
                .collect(),
            1,
            p,
            LoaderConfig::eval(grid::GRID_IMAGES),
            &device,
        )?;
        let grid_images = grid_loader
            .epoch(0)
            .next()
            .ok_or_else(|| Error::Dataset {
                path: cfg.data.clone(),
                reason: "no image could be decoded".into(),
            })??
            .images;
        reporter.line(&format!(
            "data: {} train / {} val images from {} (labels ignored), {}x{}x{}",
            train_s.len(),
            val_s.len(),
            cfg.data.display(),
            cfg.channels,
            cfg.image_size,
            cfg.image_size
        ));
        let steps_per_epoch = train.batches_per_epoch();
        Ok(Session {
            cfg: cfg.clone(),
            device,
            model,
            train,
            val,
            grid_images,
            steps_per_epoch,
        })
    }

    fn stages(&self) -> usize {
        self.model.stages()
    }

    fn phase_name(&self, phase: usize) -> String {
        if phase < self.stages() {
            format!("stage{}", phase + 1)
        } else {
            "finetune".into()
        }
    }

    /// The optimizer of a phase: only the parameters of its stage (encoder and decoder layer), or all of
    /// them when fine-tuning.
    fn optimizer(&self, phase: usize) -> Result<Optimizer> {
        let params = trainable_params(&self.model.varmap);
        let params: Vec<_> = if phase < self.stages() {
            let prefixes = StackedAutoencoder::stage_prefixes(phase);
            params
                .into_iter()
                .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p.as_str())))
                .collect()
        } else {
            params
        };
        self.cfg.optimizer.build(no_decay_groups(params))
    }

    /// The training loss of one batch in `phase`; `rng` draws the noise and CD samples.
    fn train_loss(&self, phase: usize, x: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let m = &self.model;
        if phase >= self.stages() {
            let input = match self.cfg.noise {
                Some(n) => corrupt(x, n, rng)?,
                None => x.clone(),
            };
            let (code, recon) = m.forward_all(&input, Mode::Train)?;
            let mut loss = mse(&recon, x)?;
            if let Some(s) = self.cfg.sparsity {
                loss = (loss + sparsity_penalty(&code, s)?)?;
            }
            return Ok(loss);
        }
        let target = m.codes_below(phase, x)?;
        if self.cfg.method == Method::Rbm {
            return self.cd_loss(phase, &target.flatten_from(1)?, rng);
        }
        let input = match self.cfg.noise {
            Some(n) => corrupt(&target, n, rng)?,
            None => target.clone(),
        };
        let code = m.encode_stage(phase, &input, Mode::Train)?;
        let recon = m.decode_stage(phase, &code, target.dims(), Mode::Train)?;
        let mut loss = mse(&recon, &target)?;
        if let Some(s) = self.cfg.sparsity {
            loss = (loss + sparsity_penalty(&code, s)?)?;
        }
        Ok(loss)
    }

    /// CD-k: Gibbs chain from the data (hidden units sampled, visible probabilities, the last step kept as
    /// probabilities), then the free-energy difference whose gradient is the CD update.
    fn cd_loss(&self, stage: usize, v0: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let m = &self.model;
        let mut v = v0.clone();
        for _ in 0..self.cfg.cd_k {
            let ph = m.rbm_hidden(stage, &v, Mode::Frozen)?;
            let h = uniform(ph.dims(), rng, &self.device)?
                .lt(&ph)?
                .to_dtype(DType::F32)?;
            v = m.rbm_visible(stage, &h, Mode::Frozen)?;
        }
        let v = v.detach();
        Ok((m.rbm_free_energy(stage, v0)? - m.rbm_free_energy(stage, &v)?)?)
    }

    /// Reconstruction MSE of a phase on `x`, nothing trained: the stage's own reconstruction of its input
    /// codes (an RBM's mean-field one), or the full stack's reconstruction of the images.
    fn recon_loss(&self, phase: usize, x: &Tensor) -> Result<f64> {
        let m = &self.model;
        if phase >= self.stages() {
            return scalar(&mse(
                &m.reconstruct(x, self.stages() - 1, Mode::Frozen)?,
                x,
            )?);
        }
        let target = m.codes_below(phase, x)?;
        let code = m.encode_stage(phase, &target, Mode::Frozen)?;
        let recon = m.decode_stage(phase, &code, target.dims(), Mode::Frozen)?;
        scalar(&mse(&recon, &target)?)
    }

    /// Mean validation reconstruction loss of `phase` (NaN without validation images).
    fn evaluate(&self, phase: usize) -> Result<f64> {
        let mut stats = RunningStats::new();
        for batch in self.val.epoch(0) {
            let batch = batch?;
            let n = batch.images.dim(0)?;
            let loss = on_pool(|| self.recon_loss(phase, &batch.images))?;
            stats.add_batch(loss, 0, n);
        }
        Ok(if stats.samples() == 0 {
            f64::NAN
        } else {
            stats.loss()
        })
    }

    /// Writes the reconstruction grid of the first `top + 1` stages.
    fn write_grid(&self, run_dir: &RunDir, phase: usize) -> Result<()> {
        let top = phase.min(self.stages() - 1);
        let recon = self
            .model
            .reconstruct(&self.grid_images, top, Mode::Frozen)?;
        let name = format!("recon-{}.png", self.phase_name(phase));
        grid::write_grid(&self.grid_images, &recon, &run_dir.path().join(name))
    }
}

/// Draws every weight from the initialisation its layer calls for with a generator seeded by `seed`
/// (candle's own initialisers draw from an unseeded one), so that a run is reproducible.
pub fn init_weights(model: &StackedAutoencoder, seed: u64) -> Result<()> {
    let act = model.config.activation;
    let data = model.varmap.data().lock().expect("varmap lock");
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0x5EED));
    for key in keys {
        let var = &data[key];
        if !key.ends_with(".weight") {
            var.set(&var.zeros_like()?)?;
            continue;
        }
        let dims = var.dims().to_vec();
        let k2: usize = dims.iter().skip(2).product();
        let decoder = key.starts_with(model::DECODER_PREFIX);
        // Encoder weight [out, in, ...]; decoder weights are laid out [in, out] (dense) or [in, out, k, k]
        // (transposed conv), i.e. the fans are swapped.
        let (fan_in, fan_out) = if decoder && dims.len() == 2 {
            (dims[1], dims[0])
        } else if decoder {
            (dims[0] * k2, dims[1] * k2)
        } else {
            (dims[1] * k2, dims[0] * k2)
        };
        let a = if decoder {
            EncoderActivation::Sigmoid
        } else {
            act
        };
        let t =
            crate::models::encoder::draw(a.init(fan_in, fan_out), &dims, &mut rng, var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

fn save_checkpoint(
    path: &std::path::Path,
    model: &StackedAutoencoder,
    opt: &Optimizer,
    state: &TrainState,
) -> Result<()> {
    let mut ck = Checkpoint::new(state)?;
    ck.insert_varmap("model", &model.varmap)?;
    ck.insert_prefixed("optim", opt.state().tensors);
    ck.save(path)
}

fn optim_state_from(ck: &Checkpoint, meta: &serde_json::Value) -> Result<OptimState> {
    let metadata: std::collections::HashMap<String, String> = serde_json::from_value(meta.clone())
        .map_err(|e| Error::config("checkpoint optimizer state", e.to_string()))?;
    OptimState::from_metadata(ck.with_prefix("optim").into_iter().collect(), &metadata)
}

/// Writes the encoder (`encoder.safetensors`, backbone keys only) and `encoder.json`.
pub fn write_encoder(
    run_dir: &RunDir,
    cfg: &PretrainConfig,
    model: &StackedAutoencoder,
) -> Result<PathBuf> {
    let path = run_dir.path().join(ENCODER_WEIGHTS);
    let info = EncoderInfo {
        arch: model.config.arch(),
        preprocess: cfg.preprocess(),
        method: serde_json::to_value(cfg.method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    };
    let json =
        serde_json::to_string(&info).map_err(|e| Error::config("encoder info", e.to_string()))?;
    let meta = [("graft_encoder".to_string(), json.clone())].into();
    crate::formats::weights::save_safetensors_atomic(&path, &model.encoder_tensors(), Some(meta))?;
    crate::fsutil::write_atomic(&run_dir.path().join(ENCODER_INFO), json.as_bytes())?;
    Ok(path)
}

/// Runs (or, with `resume`, continues) a pretraining run in `run_dir`.
pub fn pretrain(
    cfg: &PretrainConfig,
    run_dir: &RunDir,
    resume: bool,
    opts: &RunOptions,
) -> Result<Outcome> {
    let enc = cfg.validate()?;
    let stages = enc.stages();
    let phases = cfg.phases(stages);
    let total_epochs: usize = (0..phases).map(|p| cfg.phase_epochs(p, stages)).sum();
    let mut reporter = Reporter::new(opts.quiet, total_epochs);
    let s = Session::build(cfg, enc, &mut reporter)?;
    if !resume {
        run_dir.write_config(cfg)?;
    }

    let new_early = || EarlyStopping::new(Monitor::ValLoss, cfg.patience, cfg.min_delta);
    let mut pos = Position {
        phase: 0,
        phase_epoch: 0,
        phase_done: false,
    };
    let mut epoch_global = 0;
    let mut step: u64 = 0;
    let mut early = new_early()?;
    let mut opt: Option<Optimizer> = None;
    // ReduceLROnPlateau state of the current phase (`--schedule plateau`).
    let mut plateau: Option<ReduceOnPlateau> = None;
    let mut metrics_log;
    // A run that died before its first checkpoint starts again from the beginning.
    let resume = resume && run_dir.has_checkpoint();
    if resume {
        let ck = Checkpoint::load(run_dir.resume_checkpoint()?, &s.device)?;
        let state: TrainState = ck.meta()?;
        ck.restore_varmap("model", &s.model.varmap)?;
        pos = serde_json::from_value(state.data.clone())
            .map_err(|e| Error::bad_file(run_dir.last_checkpoint(), format!("position: {e}")))?;
        epoch_global = state.epoch;
        step = state.step;
        if let Some(e) = state.early_stop {
            early = e;
        }
        plateau = serde_json::from_value(state.schedule["plateau"].clone()).unwrap_or(None);
        if !pos.phase_done {
            let mut o = s.optimizer(pos.phase)?;
            o.load_state(&optim_state_from(&ck, &state.optimizer)?)?;
            opt = Some(o);
        }
        metrics_log =
            MetricsLog::resume_with(run_dir.metrics_path(), epoch_global, &state.history)?;
        reporter.line(&format!(
            "resuming {} after epoch {epoch_global} ({} epoch {})",
            run_dir.path().display(),
            s.phase_name(pos.phase),
            pos.phase_epoch
        ));
    } else {
        metrics_log = MetricsLog::create(run_dir.metrics_path())?;
    }
    let mut history = MetricsLog::read(run_dir.metrics_path())?;

    let mut epochs_this_run = 0;
    loop {
        if pos.phase_done || pos.phase_epoch >= cfg.phase_epochs(pos.phase, stages) {
            // With early stopping, Keras's restore_best_weights per phase: the phase hands its best epoch
            // (lowest validation loss) to the next. Without it, the phase ends with its last weights.
            let restore = cfg.patience.is_some() && early.best().is_some();
            if restore && run_dir.best_checkpoint().is_file() {
                Checkpoint::load(run_dir.best_checkpoint(), &s.device)?
                    .restore_varmap("model", &s.model.varmap)?;
            }
            if pos.phase_epoch > 0 || pos.phase_done {
                s.write_grid(run_dir, pos.phase)?;
            }
            pos = Position {
                phase: pos.phase + 1,
                phase_epoch: 0,
                phase_done: false,
            };
            early = new_early()?;
            plateau = None;
            opt = None;
            if pos.phase >= phases {
                break;
            }
            continue;
        }
        if opts.stop_after.is_some_and(|n| epochs_this_run >= n) {
            reporter.line(&format!(
                "stopping after {epochs_this_run} epochs as asked (--stop-after)"
            ));
            return Ok(Outcome {
                run_dir: run_dir.path().to_path_buf(),
                epochs_run: epoch_global,
                val_loss: history.last().map_or(f64::NAN, |m| m.val_loss),
                encoder: None,
            });
        }
        let phase = pos.phase;
        let name = s.phase_name(phase);
        if opt.is_none() {
            if pos.phase_epoch == 0 {
                reporter.line(&format!(
                    "{name}: training {}",
                    if phase < stages {
                        format!(
                            "encoder and decoder stage {} (stages below frozen)",
                            phase + 1
                        )
                    } else {
                        "the whole stack end to end".into()
                    }
                ));
            }
            opt = Some(s.optimizer(phase)?);
        }
        let opt_ref = opt.as_mut().expect("built above");
        let phase_steps = cfg.phase_epochs(phase, stages) * s.steps_per_epoch;
        let sched = cfg.schedule.build(cfg.lr, phase_steps, s.steps_per_epoch);
        if plateau.is_none() {
            plateau = sched.plateau();
        }
        let t0 = Instant::now();
        let mut pass = reporter.pass(&name, epoch_global + 1, s.steps_per_epoch);
        let mut lr = 0.0;
        for (i, batch) in s.train.epoch(epoch_global as u64).enumerate() {
            let batch = batch?;
            let seed =
                mix(mix(mix(cfg.seed) ^ phase as u64) ^ mix(pos.phase_epoch as u64) ^ i as u64);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let k = pos.phase_epoch * s.steps_per_epoch + i;
            lr = sched.lr_at(k, phase_steps) * plateau.as_ref().map_or(1.0, |p| p.factor());
            opt_ref.follow_momentum(sched.momentum_at(k, phase_steps))?;
            // Forward, backward and update on the thread pool (see `on_pool`).
            let loss = on_pool(|| -> Result<Tensor> {
                let loss = s.train_loss(phase, &batch.images, &mut rng)?;
                let mut grads = loss.backward()?;
                if let Some(max) = cfg.clip_grad_norm {
                    clip_grad_norm(&mut grads, opt_ref.vars().iter(), max)?;
                }
                opt_ref.step(&grads, lr)?;
                Ok(loss)
            })?;
            step += 1;
            // RBMs report the mean-field reconstruction error (the free-energy gap is no loss to watch).
            let shown = if cfg.method == Method::Rbm && phase < stages {
                s.recon_loss(phase, &batch.images)?
            } else {
                scalar(&loss)?
            };
            pass.batch(batch.images.dim(0)?, shown, 0);
        }
        let train_stats = pass.stats();
        let images_per_s = pass.images_per_s();
        pass.finish();
        let val_loss = s.evaluate(phase)?;
        if let (Some(p), true) = (plateau.as_mut(), val_loss.is_finite()) {
            p.observe(val_loss);
        }
        epoch_global += 1;
        pos.phase_epoch += 1;
        let m = EpochMetrics {
            epoch: epoch_global,
            train_loss: train_stats.loss(),
            train_acc: f64::NAN,
            val_loss,
            val_acc: f64::NAN,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s,
            extra: [("phase".to_string(), serde_json::json!(name))].into(),
        };
        let decision = if val_loss.is_finite() {
            early.observe(pos.phase_epoch, val_loss)
        } else {
            Decision::Continue { improved: false }
        };
        if let Decision::Stop { reason, .. } = &decision {
            reporter.line(&format!("{name}: {reason}"));
            pos.phase_done = true;
        }
        let state = TrainState {
            epoch: epoch_global,
            step,
            early_stop: Some(early.clone()),
            rng: Default::default(),
            data: serde_json::to_value(pos).expect("position serialises"),
            optimizer: serde_json::json!(opt_ref.state().metadata()),
            schedule: serde_json::json!({ "phase": name, "plateau": plateau }),
            config: serde_json::to_value(cfg)
                .map_err(|e| Error::config("config", e.to_string()))?,
            classes: Vec::new(),
            history: history.iter().cloned().chain([m.clone()]).collect(),
            bad_steps: 0,
        };
        if cfg.patience.is_some() && matches!(decision, Decision::Continue { improved: true }) {
            save_checkpoint(&run_dir.best_checkpoint(), &s.model, opt_ref, &state)?;
        }
        save_checkpoint(&run_dir.last_checkpoint(), &s.model, opt_ref, &state)?;
        metrics_log.append(&m)?;
        reporter.line(&format!(
            "epoch {epoch_global}/{total_epochs} {name}  train loss {:.5}  val loss {:.5}  lr {:.2e}  {:.1}s  {:.0} img/s",
            m.train_loss, m.val_loss, m.lr, m.seconds, m.images_per_s
        ));
        history.push(m);
        epochs_this_run += 1;
    }

    crate::train::plots::plot_loss_curves(&history, "reconstruction MSE", run_dir.curves_png())?;
    let encoder = write_encoder(run_dir, cfg, &s.model)?;
    let val_loss = s.evaluate(stages)?;
    let x = &s.grid_images;
    let full = scalar(&mse(&s.model.reconstruct(x, stages - 1, Mode::Frozen)?, x)?)?;
    reporter.line(&format!(
        "done: full-stack reconstruction MSE {:.5} (val), {:.5} (grid images); encoder {}",
        val_loss,
        full,
        encoder.display()
    ));
    let outcome = Outcome {
        run_dir: run_dir.path().to_path_buf(),
        epochs_run: history.len(),
        val_loss,
        encoder: Some(encoder),
    };
    let json =
        serde_json::to_vec_pretty(&outcome).map_err(|e| Error::config("summary", e.to_string()))?;
    crate::fsutil::write_atomic(&run_dir.path().join("summary.json"), &json)?;
    Ok(outcome)
}
