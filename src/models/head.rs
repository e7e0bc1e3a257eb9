//! The new classification head trained on top of a backbone's pooled features.
//!
//! Key layout under the head's `VarBuilder` scope (the lead decides the scope, e.g. `vb.pp("head")`):
//!
//! * plain linear head (`hidden: None`): `fc.weight` `[classes, in]`, `fc.bias` `[classes]`;
//!   forward is `fc(dropout(x))`.
//! * with a hidden layer (`hidden: Some(h)`): `fc1.weight` `[h, in]`, `fc1.bias` `[h]`, `fc2.weight`
//!   `[classes, h]`, `fc2.bias` `[classes]`; forward is `fc2(dropout(act(fc1(x))))`.
//!
//! Dropout does not use `candle_nn::ops::dropout`, whose masks come from an unseeded thread RNG: the masks here are
//! drawn from a [`ChaCha8Rng`] owned by the head, whose position ([`Head::rng_state`]) goes into the checkpoint, so
//! a resumed run draws exactly the masks the uninterrupted run would have drawn.

use crate::rng::{seeded, RngState};
use crate::{Error, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::sync::Mutex;

/// How the head's weights are drawn; biases start at zero except under [`Init::Torch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// He/Kaiming normal: `N(0, 2 / fan_in)` (gain `sqrt(2)`), made for ReLU layers.
    #[value(alias = "kaiming")]
    He,
    /// Xavier/Glorot uniform: `U(-b, b)` with `b = sqrt(6 / (fan_in + fan_out))` (gain 1), made for linear,
    /// tanh and sigmoid layers.
    #[value(alias = "glorot")]
    Xavier,
    /// PyTorch's `nn.Linear` default: weights and biases `U(-b, b)` with `b = 1 / sqrt(fan_in)`
    /// (Kaiming uniform with `a = sqrt(5)`), for runs that should start where a PyTorch script starts.
    #[value(alias = "pytorch")]
    Torch,
}

impl Init {
    /// The init that suits a head: PyTorch's `nn.Linear` init for a plain linear head (measured: Xavier's
    /// larger weights give large first logits on 1,280 ReLU6 features and cost 1.7-4 points on the
    /// Fashion-MNIST anchor, README "Choosing the defaults"), He for a hidden ReLU layer, Xavier for tanh /
    /// sigmoid / linear hidden units.
    pub fn default_for(hidden: Option<usize>, activation: Activation) -> Init {
        match (hidden, activation) {
            (None, _) => Init::Torch,
            (Some(_), Activation::Relu) => Init::He,
            _ => Init::Xavier,
        }
    }

    /// The standard deviation of a weight of a `[fan_out, fan_in]` layer under this init.
    pub fn std(self, fan_in: usize, fan_out: usize) -> f64 {
        match self {
            Init::He => (2.0 / fan_in as f64).sqrt(),
            Init::Xavier => (2.0 / (fan_in + fan_out) as f64).sqrt(),
            Init::Torch => (1.0 / (3.0 * fan_in as f64)).sqrt(),
        }
    }

    /// The same distribution as candle's init hint, used when a `VarMap` creates the weight.
    fn candle_hint(self, fan_in: usize, fan_out: usize) -> candle_nn::Init {
        match self {
            Init::He => candle_nn::init::DEFAULT_KAIMING_NORMAL,
            Init::Xavier | Init::Torch => {
                let bound = 3f64.sqrt() * self.std(fan_in, fan_out);
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                }
            }
        }
    }

    /// Draws `fan_out * fan_in` weights from `rng`.
    fn draw(self, fan_in: usize, fan_out: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let n = fan_in * fan_out;
        let std = self.std(fan_in, fan_out);
        match self {
            Init::He => (0..n)
                .map(|_| (std * crate::rng::standard_normal(rng)) as f32)
                .collect(),
            Init::Xavier | Init::Torch => {
                let bound = 3f64.sqrt() * std;
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
        }
    }
}

impl FromStr for Init {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "he" | "kaiming" => Ok(Init::He),
            "xavier" | "glorot" => Ok(Init::Xavier),
            "torch" | "pytorch" => Ok(Init::Torch),
            _ => Err(Error::config(
                "--init",
                format!("`{s}` is not an init; use he, xavier or torch"),
            )),
        }
    }
}

/// The non-linearity after the hidden layer (unused by a plain linear head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    Sigmoid,
    /// No non-linearity (config files only; `--activation` offers the other three).
    #[value(skip)]
    Linear,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Activation::Linear => x.clone(),
        })
    }
}

impl FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
            "sigmoid" => Ok(Activation::Sigmoid),
            "linear" | "none" | "identity" => Ok(Activation::Linear),
            _ => Err(Error::config(
                "activation",
                format!("`{s}` is not an activation; use relu, tanh, sigmoid or linear"),
            )),
        }
    }
}

/// The head's shape and training behaviour, as saved in the run config. Missing fields take the values of
/// [`HeadConfig::default`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Width of the optional hidden layer.
    pub hidden: Option<usize>,
    /// Probability of zeroing a unit of the last layer's input while training, in `[0, 1)`.
    pub dropout: f32,
    pub init: Init,
    pub activation: Activation,
}

impl Default for HeadConfig {
    /// A plain linear head with PyTorch's `nn.Linear` init ([`Init::default_for`]) and no dropout.
    fn default() -> Self {
        HeadConfig {
            hidden: None,
            dropout: 0.0,
            init: Init::Torch,
            activation: Activation::Relu,
        }
    }
}

impl HeadConfig {
    /// A head with a hidden layer of `hidden` units and the init that suits `activation`.
    pub fn with_hidden(hidden: usize, dropout: f32, activation: Activation) -> Self {
        HeadConfig {
            hidden: Some(hidden),
            dropout,
            init: Init::default_for(Some(hidden), activation),
            activation,
        }
    }

    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "--dropout",
                format!("{} is not a probability in [0, 1)", self.dropout),
            ));
        }
        if self.hidden == Some(0) {
            return Err(Error::config(
                "--hidden",
                "a hidden layer needs at least one unit",
            ));
        }
        Ok(())
    }
}

/// A classification head: one or two linear layers with optional dropout. See the module doc for the key layout.
#[derive(Debug)]
pub struct Head {
    config: HeadConfig,
    /// `[fc]` or `[fc1, fc2]`.
    layers: Vec<Linear>,
    /// Full keys (`prefix.fc.weight`, ...) in the order of `layers`: weight, bias, weight, bias.
    keys: Vec<String>,
    in_features: usize,
    classes: usize,
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl Head {
    /// Builds the head from `vb`: loads its weights when `vb` holds them, otherwise (a `VarMap` builder) creates
    /// them with candle's RNG following `config.init`. For reproducible training call [`Head::reset_parameters`]
    /// with the run's seeded generator afterwards. Dropout masks come from a generator seeded with 0 until
    /// [`Head::set_rng_state`] or [`Head::with_dropout_seed`] say otherwise.
    pub fn new(
        config: &HeadConfig,
        in_features: usize,
        classes: usize,
        vb: VarBuilder,
    ) -> Result<Head> {
        config.validate()?;
        if in_features == 0 || classes == 0 {
            return Err(Error::config(
                "head",
                format!("needs inputs and classes, got {in_features} inputs and {classes} classes"),
            ));
        }
        let shapes: Vec<(&str, usize, usize)> = match config.hidden {
            None => vec![("fc", in_features, classes)],
            Some(h) => vec![("fc1", in_features, h), ("fc2", h, classes)],
        };
        let mut layers = Vec::new();
        let mut keys = Vec::new();
        for (name, fan_in, fan_out) in shapes {
            let lvb = vb.pp(name);
            let w = lvb.get_with_hints(
                (fan_out, fan_in),
                "weight",
                config.init.candle_hint(fan_in, fan_out),
            )?;
            let b = lvb.get_with_hints(fan_out, "bias", candle_nn::Init::Const(0.0))?;
            let prefix = lvb.prefix();
            keys.push(format!("{prefix}.weight"));
            keys.push(format!("{prefix}.bias"));
            layers.push(Linear::new(w, Some(b)));
        }
        Ok(Head {
            config: *config,
            layers,
            keys,
            in_features,
            classes,
            dropout_rng: Mutex::new(seeded(0)),
        })
    }

    /// Seeds the dropout generator.
    pub fn with_dropout_seed(self, seed: u64) -> Self {
        *self.dropout_rng.lock().expect("dropout rng poisoned") = seeded(seed);
        self
    }

    pub fn config(&self) -> &HeadConfig {
        &self.config
    }
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Full keys of the head's parameters as they appear in the `VarMap` and in saved files.
    pub fn param_keys(&self) -> &[String] {
        &self.keys
    }

    /// Logits `[N, classes]` from pooled features `[N, in_features]`; dropout only when `train`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i == last {
                h = self.dropout(&h, train)?;
            }
            h = layer.forward(&h)?;
            if i != last {
                h = self.config.activation.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// Inverted dropout: zeroes each unit with probability `p` and scales the survivors by `1 / (1 - p)`, so the
    /// expected activation is the same in training and evaluation.
    fn dropout(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let p = self.config.dropout;
        if !train || p == 0.0 {
            return Ok(x.clone());
        }
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = {
            let mut rng = self.dropout_rng.lock().expect("dropout rng poisoned");
            (0..x.elem_count())
                .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }

    /// Redraws every weight from `rng` following the config's init and zeroes the biases, in place.
    ///
    /// The head must have been built from a `VarMap` (its tensors are trainable variables); weights loaded
    /// read-only from a file cannot be reset.
    pub fn reset_parameters(&self, rng: &mut ChaCha8Rng) -> Result<()> {
        for layer in &self.layers {
            let w = layer.weight();
            let (fan_out, fan_in) = w.dims2()?;
            let values = self.config.init.draw(fan_in, fan_out, rng);
            let new_w =
                Tensor::from_vec(values, (fan_out, fan_in), w.device())?.to_dtype(w.dtype())?;
            set_variable(w, &new_w)?;
            if let Some(b) = layer.bias() {
                let value = if self.config.init == Init::Torch {
                    let bound = 1.0 / (fan_in as f64).sqrt();
                    let v: Vec<f32> = (0..fan_out)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect();
                    Tensor::from_vec(v, fan_out, b.device())?
                } else {
                    b.zeros_like()?
                };
                set_variable(b, &value)?;
            }
        }
        Ok(())
    }

    /// Where the dropout generator stands, for the checkpoint.
    pub fn rng_state(&self) -> RngState {
        RngState::of(&self.dropout_rng.lock().expect("dropout rng poisoned"))
    }

    /// Continues dropout from a checkpointed position.
    pub fn set_rng_state(&self, state: &RngState) -> Result<()> {
        *self.dropout_rng.lock().expect("dropout rng poisoned") = state.restore()?;
        Ok(())
    }
}

/// Overwrites the storage of a variable tensor (shared with its `Var` in the `VarMap`).
fn set_variable(t: &Tensor, value: &Tensor) -> Result<()> {
    if !t.is_variable() {
        return Err(Error::config(
            "head",
            "its weights are not trainable variables (build it from a VarMap to reset them)",
        ));
    }
    candle_core::Var::from_tensor(t)?.set(&value.to_dtype(t.dtype())?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(cfg: &HeadConfig, inp: usize, classes: usize) -> (VarMap, Head) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let head = Head::new(cfg, inp, classes, vb.pp("head")).unwrap();
        (varmap, head)
    }

    fn std_of(t: &Tensor) -> f64 {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    }

    fn var(varmap: &VarMap, key: &str) -> Tensor {
        varmap.data().lock().unwrap()[key].as_tensor().clone()
    }

    #[test]
    fn plain_head_uses_fc_keys_and_hidden_head_uses_fc1_fc2() {
        let (vm, head) = build(&HeadConfig::default(), 8, 3);
        assert_eq!(head.param_keys(), ["head.fc.weight", "head.fc.bias"]);
        assert_eq!(var(&vm, "head.fc.weight").dims(), [3, 8]);
        let (vm, head) = build(&HeadConfig::with_hidden(5, 0.5, Activation::Relu), 8, 3);
        assert_eq!(
            head.param_keys(),
            [
                "head.fc1.weight",
                "head.fc1.bias",
                "head.fc2.weight",
                "head.fc2.bias"
            ]
        );
        assert_eq!(var(&vm, "head.fc1.weight").dims(), [5, 8]);
        assert_eq!(var(&vm, "head.fc2.weight").dims(), [3, 5]);
    }

    #[test]
    fn he_init_has_std_sqrt_2_over_fan_in_and_zero_bias() {
        let cfg = HeadConfig {
            init: Init::He,
            ..HeadConfig::default()
        };
        let (vm, head) = build(&cfg, 256, 200);
        head.reset_parameters(&mut seeded(3)).unwrap();
        let expected = (2.0f64 / 256.0).sqrt();
        let got = std_of(&var(&vm, "head.fc.weight"));
        assert!(
            (got / expected - 1.0).abs() < 0.03,
            "std {got}, expected {expected}"
        );
        let bias: Vec<f32> = var(&vm, "head.fc.bias").to_vec1().unwrap();
        assert!(bias.iter().all(|&b| b == 0.0));
    }

    #[test]
    fn xavier_init_is_uniform_with_glorot_std_and_bound() {
        let xavier = HeadConfig {
            init: Init::Xavier,
            ..HeadConfig::default()
        };
        let (vm, head) = build(&xavier, 300, 100);
        head.reset_parameters(&mut seeded(4)).unwrap();
        let w = var(&vm, "head.fc.weight");
        let expected = (2.0f64 / 400.0).sqrt();
        let got = std_of(&w);
        assert!(
            (got / expected - 1.0).abs() < 0.03,
            "std {got}, expected {expected}"
        );
        let bound = (6.0f64 / 400.0).sqrt() as f32;
        let max = w
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            max <= bound && max > 0.95 * bound,
            "max {max}, bound {bound}"
        );
    }

    #[test]
    fn torch_init_draws_weights_and_biases_within_one_over_sqrt_fan_in() {
        let cfg = HeadConfig {
            init: Init::Torch,
            ..HeadConfig::default()
        };
        let (vm, head) = build(&cfg, 400, 100);
        head.reset_parameters(&mut seeded(4)).unwrap();
        let bound = 1.0f32 / 20.0;
        for key in ["head.fc.weight", "head.fc.bias"] {
            let t = var(&vm, key);
            let max = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                max <= bound && max > 0.9 * bound,
                "{key}: max {max}, bound {bound}"
            );
        }
        let std = std_of(&var(&vm, "head.fc.weight"));
        let expected = bound as f64 / 3f64.sqrt();
        assert!(
            (std / expected - 1.0).abs() < 0.03,
            "std {std}, expected {expected}"
        );
    }

    #[test]
    fn candle_created_weights_follow_the_same_init() {
        let cfg = HeadConfig::with_hidden(128, 0.0, Activation::Relu);
        let (vm, _head) = build(&cfg, 512, 64);
        let got = std_of(&var(&vm, "head.fc1.weight"));
        let expected = (2.0f64 / 512.0).sqrt();
        assert!(
            (got / expected - 1.0).abs() < 0.05,
            "std {got}, expected {expected}"
        );
    }

    #[test]
    fn reset_parameters_is_reproducible_from_the_seed() {
        let (vm1, h1) = build(&HeadConfig::default(), 16, 4);
        let (vm2, h2) = build(&HeadConfig::default(), 16, 4);
        h1.reset_parameters(&mut seeded(9)).unwrap();
        h2.reset_parameters(&mut seeded(9)).unwrap();
        let a: Vec<f32> = var(&vm1, "head.fc.weight")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = var(&vm2, "head.fc.weight")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn default_init_is_torch_for_a_linear_head_he_for_relu_hidden_layers_and_xavier_otherwise() {
        assert_eq!(Init::default_for(Some(64), Activation::Relu), Init::He);
        assert_eq!(Init::default_for(Some(64), Activation::Tanh), Init::Xavier);
        assert_eq!(
            Init::default_for(Some(64), Activation::Sigmoid),
            Init::Xavier
        );
        assert_eq!(Init::default_for(None, Activation::Relu), Init::Torch);
        assert_eq!("he".parse::<Init>().unwrap(), Init::He);
        assert!("lecun".parse::<Init>().is_err());
        assert_eq!(serde_json::to_string(&Init::Xavier).unwrap(), "\"xavier\"");
    }

    #[test]
    fn dropout_is_off_in_evaluation_and_deterministic_with_scaled_survivors_in_training() {
        let cfg = HeadConfig {
            dropout: 0.5,
            ..HeadConfig::default()
        };
        let (_vm, head) = build(&cfg, 1000, 1);
        let x = Tensor::ones((4, 1000), DType::F32, &Device::Cpu).unwrap();
        let eval = head.dropout(&x, false).unwrap();
        assert_eq!(eval.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4000.0);

        let state = head.rng_state();
        let train: Vec<f32> = head
            .dropout(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(train.iter().all(|&v| v == 0.0 || v == 2.0));
        let kept = train.iter().filter(|&&v| v != 0.0).count() as f64 / 4000.0;
        assert!((kept - 0.5).abs() < 0.05, "kept fraction {kept}");

        // Restoring the generator replays the same mask; the next draw differs.
        head.set_rng_state(&state).unwrap();
        let replay: Vec<f32> = head
            .dropout(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(replay, train);
        let next: Vec<f32> = head
            .dropout(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(next, train);
    }

    #[test]
    fn forward_gives_one_logit_per_class_and_evaluation_is_deterministic() {
        let cfg = HeadConfig::with_hidden(6, 0.3, Activation::Tanh);
        let (_vm, head) = build(&cfg, 4, 3);
        let x = Tensor::randn(0f32, 1.0, (2, 4), &Device::Cpu).unwrap();
        let a = head.forward(&x, false).unwrap();
        assert_eq!(a.dims(), [2, 3]);
        let b = head.forward(&x, false).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn head_config_round_trips_and_fills_missing_fields_with_defaults() {
        let cfg = HeadConfig::with_hidden(256, 0.2, Activation::Tanh);
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(
            json.contains("\"activation\":\"tanh\"") && json.contains("\"init\":\"xavier\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<HeadConfig>(&json).unwrap(), cfg);
        let partial: HeadConfig = serde_json::from_str(r#"{"dropout": 0.1}"#).unwrap();
        assert_eq!(
            partial,
            HeadConfig {
                dropout: 0.1,
                ..HeadConfig::default()
            }
        );
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_flag_named() {
        let cfg = HeadConfig {
            dropout: 1.0,
            ..HeadConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("--dropout"), "{err}");
        let cfg = HeadConfig {
            hidden: Some(0),
            ..HeadConfig::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn read_only_weights_cannot_be_reset() {
        let mut tensors = std::collections::HashMap::new();
        tensors.insert(
            "fc.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "fc.bias".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let head = Head::new(&HeadConfig::default(), 3, 2, vb).unwrap();
        assert!(head.reset_parameters(&mut seeded(0)).is_err());
    }
}
