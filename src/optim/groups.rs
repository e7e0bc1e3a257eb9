//! Parameter groups: which parameters an optimizer updates, each group with its own learning-rate multiplier
//! and weight decay. Groups are built by parameter name, separately from the optimizers, so "no weight decay on
//! BatchNorm and biases" and discriminative learning rates are one closure for the caller. A parameter that no
//! group holds is frozen: the optimizer never sees it.

use crate::{Error, Result};
use candle_core::Var;
use candle_nn::VarMap;

/// Parameters updated with the same learning-rate multiplier and weight decay.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// A name for reports and errors (`"decay"`, `"layer4"`, ...).
    pub name: String,
    /// The parameters, keyed by their full safetensors name (the key of their optimizer state).
    pub params: Vec<(String, Var)>,
    /// The group's learning rate is the schedule's learning rate times this.
    pub lr_mult: f64,
    /// The group's weight decay; `None` takes the optimizer configuration's.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group with multiplier 1 and the optimizer's weight decay.
    pub fn new(name: impl Into<String>, params: Vec<(String, Var)>) -> Self {
        ParamGroup {
            name: name.into(),
            params,
            lr_mult: 1.0,
            weight_decay: None,
        }
    }

    /// The same group with learning-rate multiplier `lr_mult`.
    pub fn with_lr_mult(mut self, lr_mult: f64) -> Self {
        self.lr_mult = lr_mult;
        self
    }

    /// The same group with its own weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }
}

/// Where one parameter goes: the name of its group and that group's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    pub name: String,
    pub lr_mult: f64,
    pub weight_decay: Option<f64>,
}

impl GroupSpec {
    /// Multiplier 1, the optimizer's weight decay.
    pub fn new(name: impl Into<String>) -> Self {
        GroupSpec {
            name: name.into(),
            lr_mult: 1.0,
            weight_decay: None,
        }
    }

    /// The same group with learning-rate multiplier `lr_mult`.
    pub fn lr_mult(mut self, lr_mult: f64) -> Self {
        self.lr_mult = lr_mult;
        self
    }

    /// The same group with its own weight decay.
    pub fn weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }

    /// When `no_decay`, this group's no-decay twin: name suffixed `.no_decay`, weight decay 0.
    pub fn no_decay_if(self, no_decay: bool) -> Self {
        if no_decay {
            GroupSpec {
                name: format!("{}.no_decay", self.name),
                ..self
            }
            .weight_decay(0.0)
        } else {
            self
        }
    }
}

/// Parameter names that are buffers (BatchNorm statistics), never parameters.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// The usual no-decay rule: tensors of rank 0 or 1, i.e. biases and BatchNorm/LayerNorm scales and shifts.
pub fn is_no_decay(_name: &str, var: &Var) -> bool {
    var.as_tensor().rank() <= 1
}

/// The trainable parameters of a `VarMap` (buffers left out), sorted by name so that group order and state
/// order do not depend on hashing.
pub fn trainable_params(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut params: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| !is_buffer(name))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// Routes each parameter to the group `assign` names, or leaves it out (frozen) when `assign` returns `None`.
///
/// Groups appear in the order their first parameter does; two parameters naming the same group must agree on
/// its settings.
pub fn group_params(
    params: impl IntoIterator<Item = (String, Var)>,
    mut assign: impl FnMut(&str, &Var) -> Option<GroupSpec>,
) -> Result<Vec<ParamGroup>> {
    let mut groups: Vec<ParamGroup> = Vec::new();
    for (name, var) in params {
        let Some(spec) = assign(&name, &var) else {
            continue;
        };
        match groups.iter_mut().find(|g| g.name == spec.name) {
            Some(g) => {
                if g.lr_mult != spec.lr_mult || g.weight_decay != spec.weight_decay {
                    return Err(Error::config(
                        format!("parameter group `{}`", spec.name),
                        format!(
                            "`{name}` asks for lr_mult {} and weight decay {:?}, the group has {} and {:?}",
                            spec.lr_mult, spec.weight_decay, g.lr_mult, g.weight_decay
                        ),
                    ));
                }
                g.params.push((name, var));
            }
            None => groups.push(ParamGroup {
                name: spec.name,
                params: vec![(name, var)],
                lr_mult: spec.lr_mult,
                weight_decay: spec.weight_decay,
            }),
        }
    }
    Ok(groups)
}

/// All parameters in one group, multiplier 1, the optimizer's weight decay.
pub fn single_group(params: impl IntoIterator<Item = (String, Var)>) -> Vec<ParamGroup> {
    vec![ParamGroup::new("all", params.into_iter().collect())]
}

/// Two groups: `decay` (the optimizer's weight decay) and `decay.no_decay` (biases and norm layers, none).
pub fn no_decay_groups(params: impl IntoIterator<Item = (String, Var)>) -> Vec<ParamGroup> {
    group_params(params, |name, var| {
        Some(GroupSpec::new("decay").no_decay_if(is_no_decay(name, var)))
    })
    .expect("two fixed groups never conflict")
}

/// Discriminative learning rates: parameter `name` goes to group `group_of(name)` (`None`: frozen) with
/// multiplier `lr_mults[group]`; with `no_decay`, its biases and norm parameters go to a twin without decay.
pub fn discriminative_groups(
    params: impl IntoIterator<Item = (String, Var)>,
    group_of: impl Fn(&str) -> Option<usize>,
    lr_mults: &[f64],
    no_decay: bool,
) -> Result<Vec<ParamGroup>> {
    let mut missing = None;
    let groups = group_params(params, |name, var| {
        let g = group_of(name)?;
        let Some(&mult) = lr_mults.get(g) else {
            missing.get_or_insert((name.to_string(), g));
            return None;
        };
        Some(
            GroupSpec::new(format!("group{g}"))
                .lr_mult(mult)
                .no_decay_if(no_decay && is_no_decay(name, var)),
        )
    })?;
    if let Some((name, g)) = missing {
        return Err(Error::config(
            "lr_mults",
            format!(
                "`{name}` is in group {g} but only {} multipliers were given",
                lr_mults.len()
            ),
        ));
    }
    Ok(groups)
}

/// timm's layer-wise decay (`param_groups_layer_decay`, from BEiT): the multiplier of layer `i` of
/// `layers + 1` (the last one the head) is `decay^(layers - i)`, so the head keeps the full rate and each
/// layer below gets `decay` times the one above.
pub fn layer_decay_mults(decay: f64, layers: usize) -> Vec<f64> {
    (0..=layers)
        .map(|i| decay.powi((layers - i) as i32))
        .collect()
}

/// `n` multipliers spaced geometrically from `first` to `last` (fastai's `even_mults`), e.g. for
/// `slice(lr / 100, lr)`: `even_mults(0.01, 1.0, 5)`.
pub fn even_mults(first: f64, last: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![last],
        _ => {
            let ratio = (last / first).powf(1.0 / (n - 1) as f64);
            (0..n).map(|i| first * ratio.powi(i as i32)).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn var(shape: &[usize]) -> Var {
        Var::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    fn named() -> Vec<(String, Var)> {
        vec![
            ("conv1.weight".into(), var(&[4, 3, 3, 3])),
            ("bn1.weight".into(), var(&[4])),
            ("layer1.0.conv1.weight".into(), var(&[4, 4, 3, 3])),
            ("layer1.0.bn1.bias".into(), var(&[4])),
            ("fc.weight".into(), var(&[2, 4])),
            ("fc.bias".into(), var(&[2])),
        ]
    }

    fn names(g: &ParamGroup) -> Vec<&str> {
        g.params.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn no_decay_groups_split_biases_and_norms_from_weights() {
        let groups = no_decay_groups(named());
        assert_eq!(groups.len(), 2);
        assert_eq!(
            names(&groups[0]),
            ["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]
        );
        assert_eq!(groups[0].weight_decay, None);
        assert_eq!(
            names(&groups[1]),
            ["bn1.weight", "layer1.0.bn1.bias", "fc.bias"]
        );
        assert_eq!(groups[1].weight_decay, Some(0.0));
    }

    #[test]
    fn discriminative_groups_leave_frozen_parameters_out() {
        let group_of = |name: &str| {
            if name.starts_with("fc.") {
                Some(1)
            } else if name.starts_with("layer1") {
                Some(0)
            } else {
                None // stem frozen
            }
        };
        let groups = discriminative_groups(named(), group_of, &[0.1, 1.0], false).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].lr_mult, 0.1);
        assert_eq!(
            names(&groups[0]),
            ["layer1.0.conv1.weight", "layer1.0.bn1.bias"]
        );
        assert_eq!(names(&groups[1]), ["fc.weight", "fc.bias"]);
    }

    #[test]
    fn too_few_multipliers_is_an_error_naming_the_parameter() {
        let err = discriminative_groups(named(), |_| Some(3), &[1.0], false).unwrap_err();
        assert!(err.to_string().contains("conv1.weight"), "{err}");
    }

    #[test]
    fn conflicting_settings_for_one_group_are_rejected() {
        let mut i = 0.0;
        let err = group_params(named(), |_, _| {
            i += 1.0;
            Some(GroupSpec::new("g").lr_mult(i))
        })
        .unwrap_err();
        assert!(err.to_string().contains("group `g`"), "{err}");
    }

    #[test]
    fn trainable_params_skip_batchnorm_buffers() {
        let vm = VarMap::new();
        for name in ["bn.weight", "bn.running_mean", "bn.running_var", "a.weight"] {
            vm.data().lock().unwrap().insert(name.into(), var(&[2]));
        }
        let names: Vec<String> = trainable_params(&vm).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a.weight", "bn.weight"]);
    }

    #[test]
    fn layer_decay_leaves_the_head_at_the_full_rate() {
        let m = layer_decay_mults(0.75, 13);
        assert_eq!(m.len(), 14);
        assert_eq!(m[13], 1.0);
        assert!((m[12] - 0.75).abs() < 1e-15);
        // timm: layer_scales[0] = 0.75 ** 13 for vit_small_patch16_224.
        assert!((m[0] - 0.75f64.powi(13)).abs() < 1e-15);
    }

    #[test]
    fn even_mults_are_geometric_from_first_to_last() {
        let m = even_mults(0.01, 1.0, 3);
        assert!(
            (m[0] - 0.01).abs() < 1e-15 && (m[1] - 0.1).abs() < 1e-15 && (m[2] - 1.0).abs() < 1e-15
        );
    }
}
