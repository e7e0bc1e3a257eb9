//! Unsupervised greedy layer-wise pretraining: `graft pretrain`.
//!
//! A run trains a stacked autoencoder ([`model::StackedAutoencoder`], dense or convolutional) or a stack of
//! Bernoulli-Bernoulli RBMs on unlabelled images, one stage at a time: stage K learns to reconstruct the
//! codes of stages 1..K-1, which stay frozen (their weights are detached and left out of the optimizer).
//! An optional last phase fine-tunes the whole stack end to end on the reconstruction of the images. The
//! encoder is then written as `encoder.safetensors` + `encoder.json`, which `graft finetune --base
//! ae:RUN_DIR` starts a classifier from.
//!
//! It runs through the one runner ([`crate::train::runner`]) as a [`Task`] of independent phases (one per
//! stage, then the end-to-end one): each phase has its own optimizer over its stage's parameters, its own
//! schedule and early stopping on the validation reconstruction loss (a phase that stops early hands its best
//! weights to the next). This module supplies only the losses (reconstruction, sparsity, CD-k), the
//! evaluation and the reconstruction grids. Noise and CD samples are drawn from generators seeded by (seed,
//! phase, epoch, batch), so a resumed run draws what an uninterrupted one would.

pub mod config;
pub mod grid;
pub mod model;

use crate::data::{list_images, Loader, LoaderConfig, Sample};
use crate::kernels::par::on_pool;
use crate::kernels::precision::autocast;
use crate::models::base::{EncoderInfo, ENCODER_INFO, ENCODER_WEIGHTS};
use crate::models::encoder::{EncoderActivation, EncoderConfig};
use crate::models::Mode;
use crate::optim::groups::{no_decay_groups, trainable_params};
use crate::optim::{Optimizer, ScheduleConfig};
use crate::rng::mix;
use crate::train::checkpoint::{Position, RunDir};
use crate::train::early_stop::Monitor;
use crate::train::metrics::RunningStats;
use crate::train::progress::Reporter;
use crate::train::runner::{
    self, BatchLoss, Coupling, Eval, Frame, PhasePlan, Policy, RunOptions, StepAt, Task,
};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use config::{Method, Noise, PretrainConfig, Sparsity};
use model::StackedAutoencoder;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    frame: Frame,
    /// What `graft finetune --base ae:RUN` reads (also the run's record in every checkpoint).
    info: EncoderInfo,
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
        let steps = train.batches_per_epoch();
        let frame = frame(
            cfg,
            model.stages(),
            steps,
            device.clone(),
            model.varmap.clone(),
        );
        let info = EncoderInfo {
            arch: model.config.arch(),
            preprocess: cfg.preprocess(),
            method: serde_json::to_value(cfg.method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        };
        Ok(Session {
            cfg: cfg.clone(),
            device,
            model,
            train,
            val,
            grid_images,
            frame,
            info,
        })
    }

    fn stages(&self) -> usize {
        self.model.stages()
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
    fn val_loss(&self, phase: usize) -> Result<f64> {
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
        let name = format!("recon-{}.png", phase_name(phase, self.stages()));
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

/// The phases (each greedy stage, then end-to-end fine-tuning) and the policies of a pretraining run.
fn frame(
    cfg: &PretrainConfig,
    stages: usize,
    steps_per_epoch: usize,
    device: Device,
    varmap: VarMap,
) -> Frame {
    Frame {
        phases: (0..cfg.phases(stages))
            .map(|phase| PhasePlan {
                name: phase_name(phase, stages),
                epochs: cfg.phase_epochs(phase, stages),
            })
            .collect(),
        policy: Policy {
            coupling: Coupling::Independent,
            monitor: Monitor::ValLoss,
            patience: cfg.patience,
            min_delta: cfg.min_delta,
            // With early stopping, Keras's restore_best_weights per phase: the phase hands its best epoch
            // (lowest validation loss) to the next. Without it, the phase ends with its last weights.
            restore_best: cfg.patience.is_some(),
            clip_grad_norm: cfg.clip_grad_norm,
            max_bad_steps: 0,
            max_bad_steps_flag: "(pretraining allows none)",
            accumulate: 1,
            ema: None,
        },
        steps_per_epoch,
        device,
        varmap,
    }
}

/// The name of a phase: `stage1`, ... or `finetune`.
fn phase_name(phase: usize, stages: usize) -> String {
    if phase < stages {
        format!("stage{}", phase + 1)
    } else {
        "finetune".into()
    }
}

impl Task for Session {
    type Batch = Tensor;
    type Config = PretrainConfig;
    type Record = EncoderInfo;

    fn frame(&self) -> &Frame {
        &self.frame
    }
    fn config(&self) -> &PretrainConfig {
        &self.cfg
    }
    fn record(&self) -> EncoderInfo {
        self.info.clone()
    }

    /// Each phase trains its own parameters.
    fn plan(&self, _epoch: usize, phase: usize) -> usize {
        phase
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

    fn announce(
        &self,
        at: Position,
        _epoch: usize,
        _previous: Option<usize>,
        phase: usize,
    ) -> Option<String> {
        (at.phase_epoch == 0).then(|| {
            let what = if phase < self.stages() {
                format!(
                    "encoder and decoder stage {} (stages below frozen)",
                    phase + 1
                )
            } else {
                "the whole stack end to end".into()
            };
            format!("{}: training {what}", phase_name(phase, self.stages()))
        })
    }

    fn schedule(&self, _phase: usize, steps: usize) -> ScheduleConfig {
        self.cfg
            .schedule
            .build(self.cfg.lr, steps, self.frame.steps_per_epoch)
    }

    fn batches(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<(usize, Tensor)>> + '_> {
        Box::new(
            self.train
                .epoch(epoch as u64)
                .enumerate()
                .map(|(i, b)| b.map(|b| (i, b.images))),
        )
    }

    /// Noise and CD samples are drawn from a generator seeded by (seed, phase, epoch of the phase, batch).
    fn loss(&self, x: &Tensor, at: StepAt) -> Result<BatchLoss> {
        let seed = mix(mix(mix(self.cfg.seed) ^ at.phase as u64)
            ^ mix(at.phase_epoch as u64)
            ^ at.batch as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(BatchLoss {
            loss: self.train_loss(at.phase, x, &mut rng)?,
            images: x.dim(0)?,
            correct: None,
        })
    }

    /// RBMs report the mean-field reconstruction error (the free-energy gap is no loss to watch).
    fn shown_loss(&self, x: &Tensor, at: StepAt, loss: f64) -> Result<f64> {
        if self.cfg.method == Method::Rbm && at.phase < self.stages() {
            self.recon_loss(at.phase, x)
        } else {
            Ok(loss)
        }
    }

    fn evaluate(&self, phase: usize, _epoch: usize, _r: &mut Reporter) -> Result<Option<Eval>> {
        let loss = self.val_loss(phase)?;
        Ok(loss.is_finite().then_some(Eval {
            loss,
            acc: f64::NAN,
        }))
    }

    fn end_phase(&self, run_dir: &RunDir, phase: usize) -> Result<()> {
        self.write_grid(run_dir, phase)
    }
}

/// Writes the encoder (`encoder.safetensors`, backbone keys only) and `encoder.json`.
fn write_encoder(run_dir: &RunDir, s: &Session) -> Result<PathBuf> {
    let path = run_dir.path().join(ENCODER_WEIGHTS);
    let json =
        serde_json::to_string(&s.info).map_err(|e| Error::config("encoder info", e.to_string()))?;
    let meta = [("graft_encoder".to_string(), json.clone())].into();
    crate::formats::weights::save_safetensors_atomic(
        &path,
        &s.model.encoder_tensors(),
        Some(meta),
    )?;
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
    autocast(cfg.precision, || {
        let (s, reporter) = session(cfg, opts)?;
        run_session(s, reporter, run_dir, resume, opts)
    })
}

/// Runs a fresh pretraining run in a new run folder (`dir`, or a dated one under `runs/`), created only once
/// the config and the data have been checked: a bad flag or folder leaves nothing behind.
pub fn pretrain_new(
    cfg: &PretrainConfig,
    dir: Option<&Path>,
    opts: &RunOptions,
) -> Result<Outcome> {
    autocast(cfg.precision, || {
        let (s, reporter) = session(cfg, opts)?;
        let run_dir = RunDir::create(dir)?;
        eprintln!("run folder: {}", run_dir.path().display());
        run_session(s, reporter, &run_dir, false, opts)
    })
}

/// The config validated (once) and the session built from it.
fn session(cfg: &PretrainConfig, opts: &RunOptions) -> Result<(Session, Reporter)> {
    let enc = cfg.validate()?;
    let stages = enc.stages();
    let total_epochs: usize = (0..cfg.phases(stages))
        .map(|p| cfg.phase_epochs(p, stages))
        .sum();
    let mut reporter = Reporter::new(opts.quiet, total_epochs);
    crate::train::finetune::report_precision(cfg.precision, &cfg.device, &mut reporter);
    let s = Session::build(cfg, enc, &mut reporter)?;
    Ok((s, reporter))
}

fn run_session(
    mut s: Session,
    mut reporter: Reporter,
    run_dir: &RunDir,
    resume: bool,
    opts: &RunOptions,
) -> Result<Outcome> {
    let stages = s.stages();
    let end = runner::run(&mut s, run_dir, resume, opts, &mut reporter)?;
    if end.interrupted {
        return Ok(Outcome {
            run_dir: run_dir.path().to_path_buf(),
            epochs_run: end.epochs_done,
            val_loss: end.history.last().map_or(f64::NAN, |m| m.val_loss),
            encoder: None,
        });
    }
    crate::train::plots::plot_loss_curves(
        &end.history,
        "reconstruction MSE",
        run_dir.curves_png(),
    )?;
    let encoder = write_encoder(run_dir, &s)?;
    let val_loss = s.val_loss(stages)?;
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
        epochs_run: end.history.len(),
        val_loss,
        encoder: Some(encoder),
    };
    runner::write_summary(run_dir, &outcome)?;
    Ok(outcome)
}
