//! The flags `graft finetune` and `graft pretrain` share, declared once ([`TrainArgs`]) and flattened into
//! both, with the one mapping of them onto the fields both configs have ([`TrainArgs::apply`]).
//!
//! A valued flag is an `Option`: `None` means "the config's value" (its `Default`, or the `--config` file's),
//! so only what the command line gives overrides. `--help` still shows each default: [`show_defaults`] reads
//! them from the config's `Default` and appends them to the flags' help.

use anyhow::bail;
use clap::builder::PossibleValue;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::sync::LazyLock;

use crate::kernels::precision::Precision;
use crate::optim::config::KINDS;
use crate::optim::OptimizerConfig;
use crate::train::config::{read_config_file, ScheduleKind};
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// A config file to start from, JSON (e.g. a run's RUN/config.json) or TOML (*.toml); flags given on the
    /// command line override its values.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// Fraction of the training images held out for validation (finetune: when there is no val/ folder).
    #[arg(long)]
    pub val_split: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate. Finetune: of the head, earlier groups get geometrically less, down to lr/lr-mult
    /// at the stem; with the one-cycle schedule and both phases the unfrozen phase peaks at lr/2 (fastai's
    /// fine_tune, whose base_lr 2e-3 is the default). Pretrain: 1e-3 for autoencoders, 0.05 for RBMs.
    /// Finetune also takes `auto`: the learning-rate finder's valley suggestion for the first phase (see
    /// `graft lr-find`), recorded in the run's config.
    #[arg(long, value_parser = parse_lr)]
    pub lr: Option<LrFlag>,
    /// The optimizer, with PyTorch's defaults for its hyperparameters (pretrain: adam, momentum for RBMs).
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Weight decay (decoupled for adamw, L2 for the others); not applied to biases and BatchNorm.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Momentum for momentum/nesterov/rmsprop (beta1 for the Adam family).
    #[arg(long)]
    pub momentum: Option<f64>,
    /// The learning-rate schedule of each phase.
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Clip gradients to this global L2 norm.
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// What convolutions and linear layers multiply in: f32, or bf16 (bf16 inputs, f32 sums, as PyTorch's
    /// autocast; parameters, BatchNorm, loss and optimizer stay f32). On the CPU fast where it has
    /// AVX512-BF16; on a GPU through candle's bf16 ops.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Stop (finetune: the run, pretrain: a phase) after this many epochs without validation improvement,
    /// keeping the best weights.
    #[arg(long)]
    pub patience: Option<usize>,
    #[arg(long)]
    pub min_delta: Option<f64>,
    /// The run folder (default: a fresh runs/YYYYmmdd-HHMMSS).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue an interrupted run from its last checkpoint (other flags are taken from the run).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Epoch lines only, no progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Stop after N epochs of this invocation, as an interruption would (resume continues).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// `--lr`: a rate, or `auto` (found by the learning-rate finder before training).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrFlag {
    Value(f64),
    Auto,
}

fn parse_lr(s: &str) -> Result<LrFlag, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(LrFlag::Auto);
    }
    s.parse()
        .map(LrFlag::Value)
        .map_err(|_| format!("`{s}` is neither a number nor `auto`"))
}

/// Mutable views of the fields both configs have; build one with [`shared_fields!`].
pub struct SharedFields<'a> {
    pub val_split: &'a mut f64,
    pub batch_size: &'a mut usize,
    pub lr: &'a mut f64,
    pub optimizer: &'a mut OptimizerConfig,
    pub schedule: &'a mut ScheduleKind,
    pub clip_grad_norm: &'a mut Option<f64>,
    pub seed: &'a mut u64,
    pub device: &'a mut String,
    pub precision: &'a mut Precision,
    pub patience: &'a mut Option<usize>,
    pub min_delta: &'a mut f64,
}

/// The [`SharedFields`] of a config (`FinetuneConfig` or `PretrainConfig`: both name them alike).
macro_rules! shared_fields {
    ($cfg:expr) => {
        $crate::cli::shared::SharedFields {
            val_split: &mut $cfg.val_split,
            batch_size: &mut $cfg.batch_size,
            lr: &mut $cfg.lr,
            optimizer: &mut $cfg.optimizer,
            schedule: &mut $cfg.schedule,
            clip_grad_norm: &mut $cfg.clip_grad_norm,
            seed: &mut $cfg.seed,
            device: &mut $cfg.device,
            precision: &mut $cfg.precision,
            patience: &mut $cfg.patience,
            min_delta: &mut $cfg.min_delta,
        }
    };
}
pub(crate) use shared_fields;

impl TrainArgs {
    /// The config to start from, `--config FILE` or `T::default()`, and the file's own tree, which tells
    /// what the file set (`Null` without a file).
    pub fn start<T: Default + DeserializeOwned>(&self) -> anyhow::Result<(T, serde_json::Value)> {
        Ok(match &self.config {
            Some(path) => read_config_file(path)?,
            None => (T::default(), serde_json::Value::Null),
        })
    }

    /// Sets the fields whose flags were given. `--optimizer` replaces the optimizer by that kind with its
    /// defaults; `--weight-decay` and `--momentum` then set its hyperparameters (beta1 for the Adam family).
    pub fn apply(&self, to: SharedFields<'_>) -> anyhow::Result<()> {
        set(to.val_split, self.val_split);
        set(to.batch_size, self.batch_size);
        if let Some(LrFlag::Value(lr)) = self.lr {
            *to.lr = lr;
        }
        set(to.schedule, self.schedule);
        set(to.seed, self.seed);
        set(to.device, self.device.clone());
        set(to.precision, self.precision);
        set(to.min_delta, self.min_delta);
        if self.clip_grad_norm.is_some() {
            *to.clip_grad_norm = self.clip_grad_norm;
        }
        if self.patience.is_some() {
            *to.patience = self.patience;
        }
        if let Some(kind) = self.optimizer {
            *to.optimizer = OptimizerConfig::from_kind(kind.0)?;
        }
        if self.weight_decay.is_none() && self.momentum.is_none() {
            return Ok(());
        }
        let mut v = serde_json::to_value(&*to.optimizer)?;
        let obj = v.as_object_mut().expect("an optimizer config is an object");
        if let Some(wd) = self.weight_decay {
            obj.insert("weight_decay".into(), wd.into());
        }
        if let Some(m) = self.momentum {
            if obj.contains_key("momentum") {
                obj.insert("momentum".into(), m.into());
            } else if let Some(betas) = obj.get_mut("betas") {
                betas[0] = m.into();
            } else {
                bail!(
                    "--momentum: optimizer `{}` has no momentum",
                    to.optimizer.kind()
                );
            }
        }
        *to.optimizer = serde_json::from_value(v)?;
        Ok(())
    }
}

/// `*field = value` when the flag was given.
pub fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// An optimizer kind as a flag value: one of [`KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptimizerKind(pub &'static str);

impl ValueEnum for OptimizerKind {
    fn value_variants<'a>() -> &'a [Self] {
        static ALL: LazyLock<Vec<OptimizerKind>> =
            LazyLock::new(|| KINDS.iter().map(|&k| OptimizerKind(k)).collect());
        &ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.0))
    }
}

/// Appends ` [default: V]` to the help of each flag of `cmd` whose id names a (non-empty) string or number in
/// `defaults` (a config's `Default` as JSON, with entries for flags named unlike their field), the way clap
/// shows the default of a flag that holds one.
pub fn show_defaults(cmd: clap::Command, defaults: &serde_json::Value) -> clap::Command {
    let shown: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let id = a.get_id().as_str();
            let value = match defaults.get(id)? {
                serde_json::Value::String(s) if !s.is_empty() => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((id.to_string(), value))
        })
        .collect();
    shown.into_iter().fold(cmd, |cmd, (id, value)| {
        cmd.mut_arg(id, |a| {
            let suffix = format!("[default: {value}]");
            let help = a.get_help().map(|h| format!("{h} {suffix}"));
            let long = a.get_long_help().map(|h| format!("{h}\n\n{suffix}"));
            let a = a.help(help.unwrap_or(suffix));
            match long {
                Some(long) => a.long_help(long),
                None => a,
            }
        })
    })
}
