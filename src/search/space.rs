//! Search spaces: which options a search varies, over what range, and when an option applies at all.
//!
//! A space is read from TOML, one table per option, named as the option (for `graft search`: finetune's long
//! flag names with `_` for `-`):
//! ```toml
//! [lr]
//! float = [1e-4, 1e-1]   # bounds, inclusive
//! log = true             # sampled uniformly in log space (bounds must be > 0)
//! steps = 4              # only for the grid sampler: 4 values from low to high (log-spaced when `log`)
//! [freeze_epochs]
//! int = [0, 3]
//! step = 1               # optional (ints and floats): values low, low+step, ... <= high
//! [optimizer]
//! choice = ["adamw", "sgd"]
//! [batch_size]
//! value = 16             # fixed: every trial gets it
//! [momentum]
//! float = [0.8, 0.99]
//! when = { optimizer = "sgd" }   # active only when optimizer is sgd (a list allows several values)
//! ```
//! Conditions may only name choice or fixed options declared before (in any order in the file; they are
//! evaluated in dependency order). An inactive option is absent from the trial's parameters.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// One sampled value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Value {
    /// The value as a number (ints widen; bools and strings are `None`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The value as an int, when it is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as a string, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn from_toml(v: &toml::Value, param: &str) -> Result<Value> {
        Ok(match v {
            toml::Value::Boolean(b) => Value::Bool(*b),
            toml::Value::Integer(i) => Value::Int(*i),
            toml::Value::Float(f) => Value::Float(*f),
            toml::Value::String(s) => Value::Str(s.clone()),
            other => {
                return Err(Error::space(
                    param,
                    format!("`{other}` is not a bool, int, float or string"),
                ))
            }
        })
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

/// A trial's parameters: option name to value; inactive conditional options are absent.
pub type Params = BTreeMap<String, Value>;

/// The range an option is drawn from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    /// A real number in `[low, high]`; `log`: uniform in log space; `step`: on the lattice low + k*step;
    /// `steps`: how many values the grid sampler takes.
    Float {
        low: f64,
        high: f64,
        log: bool,
        step: Option<f64>,
        steps: Option<usize>,
    },
    /// An integer in `[low, high]` on the lattice low + k*step.
    Int {
        low: i64,
        high: i64,
        log: bool,
        step: i64,
    },
    /// One of a list of values.
    Choice(Vec<Value>),
    /// Always the same value.
    Fixed(Value),
}

impl Domain {
    /// The values of a grid over this domain, low to high (floats need `steps`, or `step`).
    pub fn grid_values(&self, param: &str) -> Result<Vec<Value>> {
        Ok(match self {
            Domain::Fixed(v) => vec![v.clone()],
            Domain::Choice(vs) => vs.clone(),
            Domain::Int {
                low, high, step, ..
            } => (0..)
                .map(|k| low + k * step)
                .take_while(|v| v <= high)
                .map(Value::Int)
                .collect(),
            Domain::Float {
                low,
                high,
                step,
                steps,
                ..
            } => match (steps, step) {
                (Some(n), _) => (0..*n)
                    .map(|k| {
                        let t = if *n == 1 {
                            0.5
                        } else {
                            k as f64 / (*n - 1) as f64
                        };
                        Value::Float(self.from_unit(t).as_f64().unwrap_or(*low))
                    })
                    .collect(),
                (None, Some(s)) => (0..)
                    .map(|k| low + k as f64 * s)
                    .take_while(|v| *v <= high + 1e-9 * s)
                    .map(|v| Value::Float(v.min(*high)))
                    .collect(),
                (None, None) => {
                    return Err(Error::space(
                        param,
                        "the grid sampler needs `steps = N` (how many values) or `step` for a float range",
                    ))
                }
            },
        })
    }

    /// Maps `u` in [0, 1] onto the domain: linearly (or log-linearly), snapped to the step; a choice takes
    /// the `floor(u * n)`-th value.
    pub fn from_unit(&self, u: f64) -> Value {
        let u = u.clamp(0.0, 1.0);
        match self {
            Domain::Fixed(v) => v.clone(),
            Domain::Choice(vs) => vs[((u * vs.len() as f64) as usize).min(vs.len() - 1)].clone(),
            Domain::Float {
                low,
                high,
                log,
                step,
                ..
            } => {
                let mut x = if *log {
                    (low.ln() + u * (high.ln() - low.ln())).exp()
                } else {
                    low + u * (high - low)
                };
                if let Some(s) = step {
                    x = low + ((x - low) / s).round() * s;
                }
                Value::Float(x.clamp(*low, *high))
            }
            Domain::Int {
                low,
                high,
                log,
                step,
            } => {
                // Widen by half a step each side so that every lattice value gets an equal share of u.
                let (lo, hi) = (
                    *low as f64 - 0.5 * *step as f64,
                    *high as f64 + 0.5 * *step as f64,
                );
                let x = if *log {
                    let (lo, hi) = (lo.max(0.5), hi);
                    (lo.ln() + u * (hi.ln() - lo.ln())).exp()
                } else {
                    lo + u * (hi - lo)
                };
                let k = ((x - *low as f64) / *step as f64).round() as i64;
                Value::Int((low + k * step).clamp(*low, *high - (*high - *low) % *step))
            }
        }
    }

    /// The inverse of [`Domain::from_unit`] for numbers (the centre of a value's share); `None` for choices
    /// and fixed values.
    pub fn to_unit(&self, v: &Value) -> Option<f64> {
        let x = v.as_f64()?;
        Some(match self {
            Domain::Float { low, high, log, .. } => {
                if high == low {
                    0.5
                } else if *log {
                    (x.ln() - low.ln()) / (high.ln() - low.ln())
                } else {
                    (x - low) / (high - low)
                }
            }
            Domain::Int {
                low,
                high,
                log,
                step,
            } => {
                let (lo, hi) = (
                    *low as f64 - 0.5 * *step as f64,
                    *high as f64 + 0.5 * *step as f64,
                );
                if *log {
                    let lo = lo.max(0.5);
                    (x.ln() - lo.ln()) / (hi.ln() - lo.ln())
                } else {
                    (x - lo) / (hi - lo)
                }
            }
            _ => return None,
        })
    }
}

/// One option of a space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub domain: Domain,
    /// Active only when every named option has one of the listed values.
    pub when: BTreeMap<String, Vec<Value>>,
}

/// A search space: its options in dependency order (an option's conditions name only earlier options).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Space {
    pub params: Vec<Param>,
}

fn number(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    }
}

fn bounds(param: &str, v: &toml::Value) -> Result<(f64, f64)> {
    let arr = v
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or_else(|| Error::space(param, "bounds must be `[low, high]`"))?;
    let (Some(lo), Some(hi)) = (number(&arr[0]), number(&arr[1])) else {
        return Err(Error::space(param, "bounds must be numbers"));
    };
    if !(lo.is_finite() && hi.is_finite()) || lo > hi {
        return Err(Error::space(
            param,
            format!("bad bounds [{lo}, {hi}]: need finite low <= high"),
        ));
    }
    Ok((lo, hi))
}

impl Space {
    /// Parses a TOML space; `known` lists the option names that exist (empty: any name is allowed).
    pub fn from_toml(text: &str, known: &[String]) -> Result<Space> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::space("(file)", e.message().to_string()))?;
        let mut params = Vec::new();
        for (name, entry) in &table {
            if !known.is_empty() && !known.iter().any(|k| k == name) {
                return Err(Error::space(
                    name,
                    format!("no such option; options are {}", known.join(", ")),
                ));
            }
            let t = entry.as_table().ok_or_else(|| {
                Error::space(
                    name,
                    "must be a table like `[name]` with `float = [lo, hi]`",
                )
            })?;
            params.push(Self::param(name, t)?);
        }
        Space::new(params)
    }

    /// A space from its options in any order; checks conditions and sorts the options by dependency.
    pub fn new(params: Vec<Param>) -> Result<Space> {
        for p in &params {
            for (dep, values) in &p.when {
                let Some(d) = params.iter().find(|q| &q.name == dep) else {
                    return Err(Error::space(
                        &p.name,
                        format!("`when` names `{dep}`, which is not in the space"),
                    ));
                };
                let allowed = match &d.domain {
                    Domain::Choice(vs) => vs.clone(),
                    Domain::Fixed(v) => vec![v.clone()],
                    _ => {
                        return Err(Error::space(
                            &p.name,
                            format!(
                                "`when` may only name choice or fixed options; `{dep}` is a range"
                            ),
                        ))
                    }
                };
                if let Some(v) = values.iter().find(|v| !allowed.contains(v)) {
                    return Err(Error::space(
                        &p.name,
                        format!("`when` asks for {dep} = {v}, which `{dep}` never takes"),
                    ));
                }
            }
        }
        // Dependency order, stable otherwise (Kahn's algorithm over the file's order).
        let mut ordered: Vec<Param> = Vec::new();
        let mut rest = params;
        while !rest.is_empty() {
            let Some(i) = rest
                .iter()
                .position(|p| p.when.keys().all(|d| ordered.iter().any(|q| &q.name == d)))
            else {
                return Err(Error::space(
                    &rest[0].name,
                    "`when` conditions form a cycle",
                ));
            };
            ordered.push(rest.remove(i));
        }
        Ok(Space { params: ordered })
    }

    fn param(name: &str, t: &toml::Table) -> Result<Param> {
        let kinds: Vec<&str> = ["float", "int", "choice", "value"]
            .into_iter()
            .filter(|k| t.contains_key(*k))
            .collect();
        if kinds.len() != 1 {
            return Err(Error::space(
                name,
                "give exactly one of `float = [lo, hi]`, `int = [lo, hi]`, `choice = [...]`, `value = ...`",
            ));
        }
        for key in t.keys() {
            if ![
                "float", "int", "choice", "value", "log", "step", "steps", "when",
            ]
            .contains(&key.as_str())
            {
                return Err(Error::space(
                    name,
                    format!("unknown key `{key}`; keys are float, int, choice, value, log, step, steps, when"),
                ));
            }
        }
        let log = match t.get("log") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => return Err(Error::space(name, "`log` must be true or false")),
        };
        let step = t.get("step").map(|s| number(s).filter(|s| *s > 0.0));
        if step == Some(None) {
            return Err(Error::space(name, "`step` must be a positive number"));
        }
        let step = step.flatten();
        let steps = match t.get("steps") {
            None => None,
            Some(toml::Value::Integer(n)) if *n >= 1 => Some(*n as usize),
            Some(_) => return Err(Error::space(name, "`steps` must be an integer >= 1")),
        };
        let domain = match kinds[0] {
            "float" => {
                let (low, high) = bounds(name, &t["float"])?;
                if log && low <= 0.0 {
                    return Err(Error::space(
                        name,
                        format!("a log range must stay above 0, got [{low}, {high}]"),
                    ));
                }
                if log && step.is_some() {
                    return Err(Error::space(name, "`step` and `log` cannot be combined"));
                }
                Domain::Float {
                    low,
                    high,
                    log,
                    step,
                    steps,
                }
            }
            "int" => {
                let arr = t["int"].as_array().filter(|a| a.len() == 2);
                let (Some(lo), Some(hi)) = (
                    arr.and_then(|a| a[0].as_integer()),
                    arr.and_then(|a| a[1].as_integer()),
                ) else {
                    return Err(Error::space(
                        name,
                        "`int` bounds must be `[low, high]` integers",
                    ));
                };
                if lo > hi {
                    return Err(Error::space(
                        name,
                        format!("bad bounds [{lo}, {hi}]: need low <= high"),
                    ));
                }
                if log && lo <= 0 {
                    return Err(Error::space(
                        name,
                        format!("a log range must stay above 0, got [{lo}, {hi}]"),
                    ));
                }
                let step = match step {
                    None => 1,
                    Some(s) if s.fract() == 0.0 => s as i64,
                    Some(s) => {
                        return Err(Error::space(
                            name,
                            format!("an int `step` must be an integer, got {s}"),
                        ))
                    }
                };
                Domain::Int {
                    low: lo,
                    high: hi,
                    log,
                    step,
                }
            }
            "choice" => {
                let arr = t["choice"]
                    .as_array()
                    .ok_or_else(|| Error::space(name, "`choice` must be a list"))?;
                if arr.is_empty() {
                    return Err(Error::space(
                        name,
                        "`choice` is empty: list at least one value",
                    ));
                }
                Domain::Choice(
                    arr.iter()
                        .map(|v| Value::from_toml(v, name))
                        .collect::<Result<_>>()?,
                )
            }
            _ => Domain::Fixed(Value::from_toml(&t["value"], name)?),
        };
        let mut when = BTreeMap::new();
        if let Some(w) = t.get("when") {
            let w = w.as_table().ok_or_else(|| {
                Error::space(
                    name,
                    "`when` must be a table like `{ optimizer = \"sgd\" }`",
                )
            })?;
            for (dep, v) in w {
                let values = match v {
                    toml::Value::Array(a) => a
                        .iter()
                        .map(|x| Value::from_toml(x, name))
                        .collect::<Result<_>>()?,
                    x => vec![Value::from_toml(x, name)?],
                };
                when.insert(dep.clone(), values);
            }
        }
        Ok(Param {
            name: name.to_string(),
            domain,
            when,
        })
    }

    /// Whether `p` applies given the values chosen so far.
    pub fn is_active(p: &Param, chosen: &Params) -> bool {
        p.when
            .iter()
            .all(|(dep, vs)| chosen.get(dep).is_some_and(|v| vs.contains(v)))
    }

    /// The parameters for one point `u` of the unit cube (one coordinate per option, in `params` order):
    /// inactive options are left out.
    pub fn from_unit(&self, u: &[f64]) -> Params {
        let mut out = Params::new();
        for (p, &x) in self.params.iter().zip(u) {
            if Self::is_active(p, &out) {
                out.insert(p.name.clone(), p.domain.from_unit(x));
            }
        }
        out
    }

    /// Every point of the grid (the product of [`Domain::grid_values`]; inactive options are left out, so
    /// a point is listed once whatever an inactive option would have been), in a fixed order.
    pub fn grid(&self) -> Result<Vec<Params>> {
        let values: Vec<Vec<Value>> = self
            .params
            .iter()
            .map(|p| p.domain.grid_values(&p.name))
            .collect::<Result<_>>()?;
        let mut points = vec![Params::new()];
        for (p, vs) in self.params.iter().zip(&values) {
            let mut next = Vec::new();
            for point in points {
                if Self::is_active(p, &point) {
                    for v in vs {
                        let mut q = point.clone();
                        q.insert(p.name.clone(), v.clone());
                        next.push(q);
                    }
                } else {
                    next.push(point);
                }
            }
            points = next;
        }
        Ok(points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACE: &str = r#"
[lr]
float = [1e-4, 1e-1]
log = true
steps = 3
[dropout]
float = [0.0, 0.5]
step = 0.25
[freeze_epochs]
int = [0, 3]
[optimizer]
choice = ["adamw", "sgd"]
[momentum]
float = [0.8, 0.99]
steps = 2
when = { optimizer = "sgd" }
[batch_size]
value = 16
"#;

    fn names() -> Vec<String> {
        [
            "lr",
            "dropout",
            "freeze_epochs",
            "optimizer",
            "momentum",
            "batch_size",
            "epochs",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn a_space_parses_with_ranges_choices_conditions_and_fixed_values() {
        let s = Space::from_toml(SPACE, &names()).unwrap();
        assert_eq!(s.params.len(), 6);
        let p = s.from_unit(&[1.0, 0.6, 0.0, 0.99, 0.0, 0.5]);
        assert!((p["lr"].as_f64().unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(p["dropout"], Value::Float(0.25));
        assert_eq!(p["freeze_epochs"], Value::Int(0));
        assert_eq!(p["optimizer"], Value::Str("sgd".into()));
        assert_eq!(p["momentum"], Value::Float(0.8));
        assert_eq!(p["batch_size"], Value::Int(16));
        let q = s.from_unit(&[0.0, 0.0, 1.0, 0.1, 0.0, 0.0]);
        assert!(
            !q.contains_key("momentum"),
            "momentum is inactive with adamw"
        );
        assert_eq!(q["freeze_epochs"], Value::Int(3));
    }

    #[test]
    fn the_grid_is_the_product_of_active_options() {
        let s = Space::from_toml(SPACE, &names()).unwrap();
        // lr 3 x dropout 3 x freeze 4 x (adamw + sgd x momentum 2) = 108.
        let g = s.grid().unwrap();
        assert_eq!(g.len(), 3 * 3 * 4 * 3);
        let lrs: Vec<f64> = Domain::Float {
            low: 1e-4,
            high: 1e-1,
            log: true,
            step: None,
            steps: Some(4),
        }
        .grid_values("lr")
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
        for (a, b) in lrs.iter().zip([1e-4, 1e-3, 1e-2, 1e-1]) {
            assert!((a / b - 1.0).abs() < 1e-9, "{a} vs {b}");
        }
    }

    #[test]
    fn every_int_value_gets_an_equal_share_of_the_unit_interval() {
        let d = Domain::Int {
            low: 0,
            high: 3,
            log: false,
            step: 1,
        };
        let counts = (0..400).fold([0; 4], |mut c, i| {
            c[d.from_unit((i as f64 + 0.5) / 400.0).as_i64().unwrap() as usize] += 1;
            c
        });
        assert_eq!(counts, [100; 4]);
        assert_eq!(d.to_unit(&Value::Int(0)), Some(0.125));
    }

    #[test]
    fn errors_name_the_option_and_what_is_wrong() {
        let err = |text: &str| Space::from_toml(text, &names()).unwrap_err().to_string();
        let e = err("[learning_rate]\nfloat = [0.1, 1.0]");
        assert!(
            e.contains("learning_rate") && e.contains("options are lr, dropout"),
            "{e}"
        );
        let e = err("[lr]\nfloat = [0.0, 1.0]\nlog = true");
        assert!(e.contains("above 0"), "{e}");
        let e = err("[optimizer]\nchoice = []");
        assert!(e.contains("empty"), "{e}");
        let e = err("[lr]\nfloat = [1.0, 0.1]");
        assert!(e.contains("bad bounds"), "{e}");
        let e = err("[momentum]\nfloat = [0.1, 1.0]\nwhen = { optimizer = \"sgd\" }");
        assert!(e.contains("not in the space"), "{e}");
        let e = err("[lr]\nfloat = [0.1, 1.0]\nlgo = true");
        assert!(e.contains("unknown key `lgo`"), "{e}");
        let e = Space::from_toml("[dropout]\nfloat = [0.0, 0.5]", &names())
            .unwrap()
            .grid()
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps = N"), "{e}");
    }
}
