//! Pictures of a study, as PNG files in its folder (drawn like the run plots, [`crate::train::plots`]):
//! `history.png`, each finished trial's value by trial number with the best so far, and `params.png`, each
//! parameter against the value (log parameters on a log axis, choices by their index in the space), and,
//! from [`IMPORTANCE_TRIALS`] complete trials on, `importance.png`: which parameters mattered
//! ([`crate::search::sampler::importances`]).

use crate::search::space::{Domain, Space, Value};
use crate::search::storage::{TrialRecord, TrialState};
use crate::search::study::Direction;
use crate::train::plots::{line_panel, Axes, Canvas, Series, BLACK, TRAIN, VAL};
use crate::Result;
use std::path::{Path, PathBuf};

/// Complete trials needed before the importance picture is drawn.
pub const IMPORTANCE_TRIALS: usize = 8;

/// Panel size of one chart.
const W: i64 = 720;
const H: i64 = 440;

/// Trials with a value (complete, or pruned with their last one), by number.
fn finished(trials: &[TrialRecord]) -> Vec<&TrialRecord> {
    let mut done: Vec<&TrialRecord> = trials
        .iter()
        .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
        .filter(|t| t.value.is_some_and(f64::is_finite))
        .collect();
    done.sort_by_key(|t| t.number);
    done
}

/// Writes `history.png` and `params.png` into `dir`; returns the files written (none before a trial ends).
pub fn plot_study(
    space: &Space,
    direction: Direction,
    metric: &str,
    trials: &[TrialRecord],
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let done = finished(trials);
    if done.is_empty() {
        return Ok(Vec::new());
    }
    let history = dir.join("history.png");
    plot_history(&done, direction, metric, &history)?;
    let params = dir.join("params.png");
    let mut written = vec![history];
    if plot_params(space, &done, metric, &params)? {
        written.push(params);
    }
    if let Some(imp) = crate::search::sampler::importances(space, trials, IMPORTANCE_TRIALS) {
        let path = dir.join("importance.png");
        plot_importance(&imp, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// Each trial's value (points; pruned ones too, at their last value) and the best complete value so far.
fn plot_history(done: &[&TrialRecord], d: Direction, metric: &str, path: &Path) -> Result<()> {
    let mut best: Option<f64> = None;
    let mut best_so_far = Vec::new();
    for t in done.iter().filter(|t| t.state == TrialState::Complete) {
        let v = t.value.expect("finished trials have values");
        if best.is_none_or(|b| d.to_min(v) < d.to_min(b)) {
            best = Some(v);
        }
        best_so_far.push((t.number as f64, best.expect("set above")));
    }
    let series = [
        Series {
            name: "trial",
            color: TRAIN,
            points: done
                .iter()
                .map(|t| (t.number as f64, t.value.unwrap_or(f64::NAN)))
                .collect(),
            lines: false,
        },
        Series {
            name: "best",
            color: VAL,
            points: best_so_far,
            lines: true,
        },
    ];
    let axes = Axes {
        title: metric,
        x_label: "trial",
        integer_x: true,
        percent: false,
    };
    let mut cv = Canvas::new(W as u32, H as u32);
    line_panel(&mut cv, (0, 0, W, H), &axes, &series);
    cv.save(path)
}

/// Where a parameter's value sits on its panel's x axis.
fn x_of(domain: &Domain, v: &Value) -> Option<f64> {
    match domain {
        Domain::Float { log: true, .. } | Domain::Int { log: true, .. } => {
            v.as_f64().filter(|x| *x > 0.0).map(f64::log10)
        }
        Domain::Choice(choices) => choices.iter().position(|c| c == v).map(|i| i as f64),
        _ => v.as_f64(),
    }
}

/// The label of a parameter's x axis.
fn x_label(domain: &Domain, name: &str) -> String {
    match domain {
        Domain::Float { log: true, .. } | Domain::Int { log: true, .. } => format!("log10 {name}"),
        Domain::Choice(choices) => {
            let index: Vec<String> = choices
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{i}={c}"))
                .collect();
            format!("{name} ({})", index.join(" "))
        }
        _ => name.to_string(),
    }
}

/// One scatter panel per parameter that varies, in a grid two panels wide; `false` when none varies.
fn plot_params(space: &Space, done: &[&TrialRecord], metric: &str, path: &Path) -> Result<bool> {
    let varying: Vec<_> = space
        .params
        .iter()
        .filter(|p| !matches!(p.domain, Domain::Fixed(_)))
        .collect();
    if varying.is_empty() {
        return Ok(false);
    }
    let cols = varying.len().min(2) as i64;
    let rows = varying.len().div_ceil(2) as i64;
    let mut cv = Canvas::new((cols * W) as u32, (rows * H) as u32);
    for (i, p) in varying.iter().enumerate() {
        let label = x_label(&p.domain, &p.name);
        let points = done
            .iter()
            .filter_map(|t| Some((x_of(&p.domain, t.params.get(&p.name)?)?, t.value?)))
            .collect();
        let series = [Series {
            name: metric,
            color: TRAIN,
            points,
            lines: false,
        }];
        let axes = Axes {
            title: &p.name,
            x_label: &label,
            integer_x: matches!(p.domain, Domain::Choice(_)),
            percent: false,
        };
        let (col, row) = (i as i64 % 2, i as i64 / 2);
        line_panel(&mut cv, (col * W, row * H, W, H), &axes, &series);
    }
    cv.save(path)?;
    Ok(true)
}

/// Horizontal bars, most important first, with each share in percent.
fn plot_importance(imp: &[(String, f64)], path: &Path) -> Result<()> {
    const S: u32 = 2;
    let (row, left, top) = (40i64, 220i64, 60i64);
    let bar_w = W - left - 90;
    let mut cv = Canvas::new(W as u32, (top + row * imp.len() as i64 + 30) as u32);
    cv.text_centered(W / 2, 10, "importance (GP relevance)", S, BLACK);
    for (i, (name, share)) in imp.iter().enumerate() {
        let y = top + i as i64 * row;
        let name: String = name.chars().take(16).collect();
        cv.text(10, y + 6, &name, S, BLACK);
        let len = (share * bar_w as f64).round() as i64;
        cv.rect(left, y, len.max(1), row - 12, TRAIN);
        cv.text(
            left + len + 8,
            y + 6,
            &format!("{:.0}%", share * 100.0),
            S,
            BLACK,
        );
    }
    cv.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::space::Param;
    use std::collections::BTreeMap;

    fn trial(
        number: u64,
        state: TrialState,
        lr: f64,
        opt: &str,
        value: Option<f64>,
    ) -> TrialRecord {
        TrialRecord {
            number,
            state,
            params: [
                ("lr".to_string(), Value::Float(lr)),
                ("optimizer".to_string(), Value::Str(opt.into())),
            ]
            .into(),
            value,
            intermediate: BTreeMap::new(),
            message: None,
            started: 0.0,
            finished: None,
            heartbeat: 0.0,
            worker: "w".into(),
        }
    }

    #[test]
    fn a_study_is_drawn_as_its_history_and_one_panel_per_parameter() {
        let space = Space {
            params: vec![
                Param {
                    name: "lr".into(),
                    domain: Domain::Float {
                        low: 1e-4,
                        high: 1e-1,
                        log: true,
                        step: None,
                        steps: None,
                    },
                    when: BTreeMap::new(),
                },
                Param {
                    name: "optimizer".into(),
                    domain: Domain::Choice(vec![
                        Value::Str("adamw".into()),
                        Value::Str("sgd".into()),
                    ]),
                    when: BTreeMap::new(),
                },
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        assert!(
            plot_study(&space, Direction::Minimize, "val_loss", &[], dir.path())
                .unwrap()
                .is_empty()
        );
        let trials = [
            trial(0, TrialState::Complete, 1e-3, "adamw", Some(0.8)),
            trial(1, TrialState::Pruned, 1e-1, "sgd", Some(2.0)),
            trial(2, TrialState::Failed, 1e-2, "sgd", None),
            trial(3, TrialState::Complete, 3e-3, "sgd", Some(0.5)),
        ];
        let files =
            plot_study(&space, Direction::Minimize, "val_loss", &trials, dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        let history = image::open(&files[0]).unwrap();
        assert_eq!((history.width(), history.height()), (W as u32, H as u32));
        let params = image::open(&files[1]).unwrap();
        assert_eq!((params.width(), params.height()), (2 * W as u32, H as u32));
        // Points were drawn: the scatter colour appears in both pictures.
        for img in [history, params] {
            let rgb = img.to_rgb8();
            assert!(rgb.pixels().any(|p| *p == TRAIN), "no points drawn");
        }
    }
}
