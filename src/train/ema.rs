//! An exponential moving average of a model's weights (timm's `ModelEmaV2`): every variable of the model,
//! BatchNorm running statistics included, averaged after each optimizer step as
//! `ema = d * ema + (1 - d) * value`, with the decay warmed up as TensorFlow's `ExponentialMovingAverage`
//! does with `num_updates` (`d = min(decay, (1 + n) / (10 + n))` at update `n`), so that short fine-tuning
//! runs are not dominated by the starting weights. The runner evaluates, keeps as best and ends with the
//! average; checkpoints carry it under `ema.` (and the live weights under `model.`, for exact resume).

use crate::Result;
use candle_core::Tensor;
use candle_nn::VarMap;
use std::collections::BTreeMap;

/// Checkpoint prefix of the averaged weights.
pub const EMA_PREFIX: &str = "ema";

/// The running average of every variable of a [`VarMap`].
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    updates: u64,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// An average starting at the model's current weights.
    pub fn new(decay: f64, varmap: &VarMap) -> Result<Self> {
        Ok(Ema {
            decay,
            updates: 0,
            shadow: values(varmap)?,
        })
    }

    /// An average as a checkpoint saved it (`shadow` from its `ema.` tensors); a variable missing there starts
    /// at the model's value.
    pub fn restored(
        decay: f64,
        updates: u64,
        mut shadow: BTreeMap<String, Tensor>,
        varmap: &VarMap,
    ) -> Result<Self> {
        for (k, v) in values(varmap)? {
            shadow.entry(k).or_insert(v);
        }
        Ok(Ema {
            decay,
            updates,
            shadow,
        })
    }

    /// Updates performed so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The decay of update `n` (0-based).
    pub fn decay_at(&self, n: u64) -> f64 {
        self.decay.min((1.0 + n as f64) / (10.0 + n as f64))
    }

    /// Folds the model's current weights into the average.
    pub fn update(&mut self, varmap: &VarMap) -> Result<()> {
        let d = self.decay_at(self.updates);
        let vars = varmap.data().lock().expect("varmap lock");
        for (name, var) in vars.iter() {
            let value = var.as_tensor().detach();
            let next = match self.shadow.get(name) {
                Some(avg) => ((avg * d)? + (value * (1.0 - d))?)?,
                None => value.copy()?,
            };
            self.shadow.insert(name.clone(), next);
        }
        self.updates += 1;
        Ok(())
    }

    /// The averaged tensors, by variable name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// Sets the model's variables to the average.
    pub fn apply_to(&self, varmap: &VarMap) -> Result<()> {
        set_all(varmap, &self.shadow)
    }

    /// Runs `f` with the model's variables set to the average, then puts the live weights back.
    pub fn with_average<T>(&self, varmap: &VarMap, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let live = values(varmap)?;
        self.apply_to(varmap)?;
        let out = f();
        set_all(varmap, &live)?;
        out
    }
}

/// Copies of every variable's value.
pub(crate) fn values(varmap: &VarMap) -> Result<BTreeMap<String, Tensor>> {
    let vars = varmap.data().lock().expect("varmap lock");
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Sets each variable of `varmap` named in `values` to its value there.
pub(crate) fn set_all(varmap: &VarMap, values: &BTreeMap<String, Tensor>) -> Result<()> {
    let vars = varmap.data().lock().expect("varmap lock");
    for (k, t) in values {
        if let Some(v) = vars.get(k) {
            v.set(t)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn the_average_follows_the_warmed_up_decay_and_evaluation_leaves_the_live_weights() {
        let vm = VarMap::new();
        let w = vm
            .get(
                (2,),
                "w",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let mut ema = Ema::new(0.9, &vm).unwrap();
        let var = vm.data().lock().unwrap()["w"].clone();
        let mut expect = 0.0f64;
        for (n, value) in [1.0f32, 2.0, 3.0, 4.0, 5.0].into_iter().enumerate() {
            var.set(&Tensor::new(&[value, value], &Device::Cpu).unwrap())
                .unwrap();
            ema.update(&vm).unwrap();
            let d = 0.9f64.min((1.0 + n as f64) / (10.0 + n as f64));
            expect = d * expect + (1.0 - d) * value as f64;
        }
        let got = ema.tensors()["w"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - expect).abs() < 1e-5, "{got} vs {expect}");
        let seen = ema
            .with_average(&vm, || Ok(w.to_vec1::<f32>()?[0]))
            .unwrap();
        assert!((seen as f64 - expect).abs() < 1e-5);
        assert_eq!(w.to_vec1::<f32>().unwrap()[0], 5.0);
    }
}
