//! Optimizer state as named tensors plus named scalars, keyed by parameter name
//! (`layer4.1.conv2.weight.exp_avg`, `layer4.1.conv2.weight.step`), so a checkpoint can hold it in safetensors
//! and a resume after the set of trainable parameters changed still finds each parameter's state by name.

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Metadata key holding the update-rule family (`sgd`, `adagrad`, `rmsprop`, `adam`, `nadam`).
const RULE_KEY: &str = "graft.optim.rule";
/// Prefix of the metadata keys holding scalars.
const SCALAR_PREFIX: &str = "graft.optim.scalar.";

/// Everything an optimizer needs to continue exactly where it stopped.
#[derive(Debug, Clone, Default)]
pub struct OptimState {
    /// The update-rule family that wrote this state; loading into another family is an error.
    pub rule: String,
    /// Moments, accumulators and buffers, named `<param>.<slot>`.
    pub tensors: HashMap<String, Tensor>,
    /// Step counts and running products, named `<param>.<slot>`.
    pub scalars: BTreeMap<String, f64>,
}

impl OptimState {
    /// The rule and the scalars as string metadata (scalars in Rust's shortest round-trip notation, so they
    /// parse back bit for bit; JSON numbers through `serde_json` without its `float_roundtrip` feature do
    /// not), for a checkpoint that stores the tensors itself.
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::new();
        metadata.insert(RULE_KEY.to_string(), self.rule.clone());
        for (k, v) in &self.scalars {
            metadata.insert(format!("{SCALAR_PREFIX}{k}"), format!("{v:?}"));
        }
        metadata
    }

    /// The state made of `tensors` and the rule and scalars of `metadata` (as written by
    /// [`OptimState::metadata`]; other keys are ignored).
    pub fn from_metadata(
        tensors: HashMap<String, Tensor>,
        metadata: &HashMap<String, String>,
    ) -> Result<Self> {
        let rule = metadata.get(RULE_KEY).cloned().ok_or_else(|| {
            Error::state(
                "optimizer state",
                format!("no `{RULE_KEY}` in the metadata"),
            )
        })?;
        let mut scalars = BTreeMap::new();
        for (k, v) in metadata {
            if let Some(name) = k.strip_prefix(SCALAR_PREFIX) {
                let x: f64 = v.parse().map_err(|_| {
                    Error::state(
                        format!("optimizer state scalar `{name}`"),
                        format!("`{v}` is not a number"),
                    )
                })?;
                scalars.insert(name.to_string(), x);
            }
        }
        Ok(OptimState {
            rule,
            tensors,
            scalars,
        })
    }

    /// Writes the state to a safetensors file: tensors as tensors, the rule and the scalars in
    /// `__metadata__` ([`OptimState::metadata`]). The file is written next to its destination and renamed
    /// over it, so a crash never leaves a half-written state.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::formats::weights::save_safetensors_atomic(
            path.as_ref(),
            &self.tensors,
            Some(self.metadata()),
        )
    }

    /// Reads a state written by [`OptimState::save`]; tensors land on `device` (they move to each
    /// parameter's device and dtype again when loaded into an optimizer).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::bad_file(path, e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::bad_file(path, e.to_string()))?;
        OptimState::from_metadata(tensors, &meta).map_err(|e| Error::bad_file(path, e.to_string()))
    }
}

/// Writes one parameter's state slots into an [`OptimState`].
pub struct SlotWriter<'a> {
    pub(crate) param: &'a str,
    pub(crate) state: &'a mut OptimState,
}

impl SlotWriter<'_> {
    /// Stores tensor slot `slot` of this parameter.
    pub fn tensor(&mut self, slot: &str, t: &Tensor) {
        self.state
            .tensors
            .insert(format!("{}.{slot}", self.param), t.clone());
    }

    /// Stores scalar slot `slot` of this parameter.
    pub fn scalar(&mut self, slot: &str, x: f64) {
        self.state
            .scalars
            .insert(format!("{}.{slot}", self.param), x);
    }
}

/// Reads one parameter's state slots from an [`OptimState`], checking shapes against the parameter and moving
/// tensors to its device and dtype.
pub struct SlotReader<'a> {
    pub(crate) param: &'a str,
    pub(crate) like: &'a Tensor,
    pub(crate) state: &'a OptimState,
}

impl SlotReader<'_> {
    fn key(&self, slot: &str) -> String {
        format!("{}.{slot}", self.param)
    }

    /// Tensor slot `slot`, or `None` when the state has none.
    pub fn tensor(&self, slot: &str) -> Result<Option<Tensor>> {
        let key = self.key(slot);
        let Some(t) = self.state.tensors.get(&key) else {
            return Ok(None);
        };
        if t.dims() != self.like.dims() {
            return Err(Error::state(
                format!("optimizer state `{key}`"),
                format!(
                    "has shape {:?}, the parameter has {:?}",
                    t.dims(),
                    self.like.dims()
                ),
            ));
        }
        Ok(Some(
            t.to_device(self.like.device())?
                .to_dtype(self.like.dtype())?,
        ))
    }

    /// Tensor slot `slot`; its absence is an error (the state is incomplete).
    pub fn required_tensor(&self, slot: &str) -> Result<Tensor> {
        self.tensor(slot)?.ok_or_else(|| self.missing(slot))
    }

    /// Scalar slot `slot`, or `None`.
    pub fn scalar(&self, slot: &str) -> Option<f64> {
        self.state.scalars.get(&self.key(slot)).copied()
    }

    /// Scalar slot `slot`; its absence is an error.
    pub fn required_scalar(&self, slot: &str) -> Result<f64> {
        self.scalar(slot).ok_or_else(|| self.missing(slot))
    }

    /// The `step` scalar as a count; `None` means the parameter has no state (fresh start).
    pub fn step(&self) -> Result<Option<u64>> {
        match self.scalar("step") {
            None => Ok(None),
            Some(s) if s >= 0.0 && s.fract() == 0.0 => Ok(Some(s as u64)),
            Some(s) => Err(Error::state(
                format!("optimizer state `{}`", self.key("step")),
                format!("{s} is not a step count"),
            )),
        }
    }

    fn missing(&self, slot: &str) -> Error {
        Error::state(
            format!("optimizer state of `{}`", self.param),
            format!("has a step count but no `{}`", self.key(slot)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_survive_metadata_bit_for_bit() {
        let mut state = OptimState {
            rule: "nadam".into(),
            ..OptimState::default()
        };
        // Values that JSON through serde_json (without float_roundtrip) can change in the last bit.
        let mut x = 0.9f64;
        for i in 0..200 {
            x *= 0.9 * (1.0 - 0.5 * 0.96f64.powf(i as f64 * 0.004));
            state.scalars.insert(format!("p{i}.mu_product"), x);
        }
        state.scalars.insert("q.step".into(), 12345.0);
        state.scalars.insert("q.tiny".into(), 5e-324);
        let back = OptimState::from_metadata(HashMap::new(), &state.metadata()).unwrap();
        assert_eq!(back.rule, "nadam");
        assert_eq!(back.scalars.len(), state.scalars.len());
        for (k, v) in &state.scalars {
            assert_eq!(back.scalars[k].to_bits(), v.to_bits(), "{k}");
        }
    }

    #[test]
    fn metadata_without_a_rule_is_not_an_optimizer_state() {
        let err = OptimState::from_metadata(HashMap::new(), &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains(RULE_KEY), "{err}");
    }
}
