//! `graft search`: a hyperparameter search whose trials are ordinary fine-tuning runs, and
//! `graft search show STUDY`. A trial's config is built by writing a `graft finetune` command line (the
//! fixed flags after `--`, then the sampled values as flags) and parsing it like the real command, so a
//! bad value is reported with its flag name.

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::search::postgres::{self, PostgresStorage};
use crate::search::sqlite::{self, SqliteStorage};
use crate::search::{
    Direction, PrunerConfig, SamplerConfig, Space, Storage, Study, StudySpec, Trial, TrialRecord,
    TrialState, Value,
};
use crate::train::checkpoint::RunDir;
use crate::train::config::FinetuneConfig;
use crate::train::early_stop::Decision;
use crate::train::finetune::finetune;
use crate::train::runner::{EpochCallback, RunOptions};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SearchArgs {
    #[command(subcommand)]
    pub command: Option<SearchCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum SearchCommand {
    /// List a study's trials, best first, and write the best trial's config.json beside the study.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The search space (TOML; one table per finetune option, e.g. `[lr]` with `float = [1e-4, 1e-1]`).
    #[arg(long)]
    pub space: Option<PathBuf>,
    /// Base model of every trial (unless the space varies `base`).
    #[arg(long)]
    pub base: Option<String>,
    /// Image folder of every trial.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Trials in the study, all workers and reruns together.
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    /// grid|random|bayes
    #[arg(long, default_value = "bayes")]
    pub sampler: String,
    /// none|median|asha
    #[arg(long, default_value = "none")]
    pub pruner: String,
    /// The objective: val_loss (minimised) or val_acc (maximised), of each trial's final (best) weights.
    #[arg(long, default_value = "val_loss")]
    pub metric: String,
    /// The study: a folder (DIR/study.sqlite, trials in DIR/trials/NNNN), or a PostgreSQL URL
    /// `postgres://user@host:port/db?study=NAME` shared by workers on many machines; rerunning continues it.
    #[arg(long, default_value = "search")]
    pub study: String,
    /// With a PostgreSQL study: this machine's folder for the trial runs (default ./search-NAME).
    #[arg(long)]
    pub study_dir: Option<PathBuf>,
    /// Trials run at once (threads, each with its own connection to the study).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds without a heartbeat after which another worker takes a running trial over.
    #[arg(long, default_value_t = 120)]
    pub stale_after: u64,
    /// Fixed finetune flags for every trial, e.g. `-- --epochs 3 --batch-size 16`.
    #[arg(last = true)]
    pub finetune: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The study folder, or its PostgreSQL URL.
    pub study: String,
    /// With a PostgreSQL study: this machine's folder of trial runs (default ./search-NAME).
    #[arg(long)]
    pub study_dir: Option<PathBuf>,
    /// table|json
    #[arg(long, default_value = "table")]
    pub format: String,
}

/// Finetune's options a space may vary: its long flags with `_` for `-`, less those that name the run
/// itself.
fn finetune_options() -> Vec<String> {
    let cmd = crate::cli::Cli::command();
    let ft = cmd
        .find_subcommand("finetune")
        .expect("finetune is a subcommand");
    ft.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| {
            ![
                "run-dir",
                "resume",
                "quiet",
                "stop-after",
                "data",
                "config",
                "help",
            ]
            .contains(l)
        })
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// Where a study is stored and where this machine keeps its trial runs.
enum StudyAt {
    /// `DIR/study.sqlite`, trial runs in `DIR/trials`.
    Folder(PathBuf),
    /// On a PostgreSQL server; trial runs in `dir/trials` on each machine.
    Postgres { url: String, dir: PathBuf },
}

impl StudyAt {
    fn new(study: &str, study_dir: Option<&Path>) -> anyhow::Result<StudyAt> {
        if !postgres::is_url(study) {
            if study_dir.is_some() {
                bail!(
                    "--study-dir is for PostgreSQL studies; a study folder keeps its trials in it"
                );
            }
            return Ok(StudyAt::Folder(PathBuf::from(study)));
        }
        let name = postgres::StudyUrl::parse(study)?.study;
        Ok(StudyAt::Postgres {
            url: study.to_string(),
            dir: study_dir.map_or_else(
                || PathBuf::from(format!("search-{name}")),
                Path::to_path_buf,
            ),
        })
    }

    fn dir(&self) -> &Path {
        match self {
            StudyAt::Folder(dir) | StudyAt::Postgres { dir, .. } => dir,
        }
    }

    /// For messages (a URL without its password).
    fn shown(&self) -> String {
        match self {
            StudyAt::Folder(dir) => dir.join("study.sqlite").display().to_string(),
            StudyAt::Postgres { url, .. } => postgres::redact(url),
        }
    }

    /// A new connection to the study (one per worker).
    fn storage(&self) -> anyhow::Result<Box<dyn Storage>> {
        Ok(match self {
            StudyAt::Folder(dir) => {
                Box::new(SqliteStorage::open(dir.join("study.sqlite"), "default")?)
            }
            StudyAt::Postgres { url, .. } => Box::new(PostgresStorage::open(url)?),
        })
    }

    fn exists(&self) -> anyhow::Result<bool> {
        Ok(match self {
            StudyAt::Folder(dir) => sqlite::exists(&dir.join("study.sqlite"), "default")?,
            StudyAt::Postgres { url, .. } => postgres::exists(url)?,
        })
    }
}

fn trial_dir(study: &Path, number: u64) -> PathBuf {
    study.join("trials").join(format!("{number:04}"))
}

/// The finetune command line of a trial: fixed flags, then the sampled values.
fn trial_argv(fixed: &[String], params: &crate::search::Params, run_dir: &Path) -> Vec<String> {
    let mut argv = vec!["graft".to_string(), "finetune".to_string()];
    // Trials are always quiet (their progress is the search's): a `--quiet` among the fixed flags is implied.
    argv.extend(fixed.iter().filter(|f| *f != "--quiet").cloned());
    for (name, v) in params {
        let flag = format!("--{}", name.replace('_', "-"));
        match v {
            Value::Bool(true) => argv.push(flag),
            Value::Bool(false) => {}
            v => {
                argv.push(flag);
                argv.push(v.to_string());
            }
        }
    }
    argv.extend([
        "--quiet".into(),
        "--run-dir".into(),
        run_dir.display().to_string(),
    ]);
    argv
}

/// The config of a trial, through `graft finetune`'s own flag mapping; validated by the run, like any
/// other finetune config.
fn trial_config(
    fixed: &[String],
    params: &crate::search::Params,
    run_dir: &Path,
) -> anyhow::Result<FinetuneConfig> {
    let argv = trial_argv(fixed, params, run_dir);
    let cli = crate::cli::Cli::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("{}", e.render().to_string().trim()))?;
    let crate::cli::Command::Finetune(args) = cli.command else {
        unreachable!("the command line starts with finetune")
    };
    let mut cfg = crate::cli::finetune::config_from_args(&args)?;
    // A trial is judged on validation images: finetune's default trains on all of them (val split 0), so a
    // search holds out a fifth unless told otherwise (a val/ folder is used as it is either way).
    if !argv.iter().any(|a| a == "--val-split" || a == "--config") {
        cfg.val_split = SEARCH_VAL_SPLIT;
    }
    Ok(cfg)
}

/// The validation split of a trial when neither the search's flags nor its space set one.
pub const SEARCH_VAL_SPLIT: f64 = 0.2;

/// What one worker needs besides its own study connection.
struct Search {
    dir: PathBuf,
    fixed: Vec<String>,
    pruner: PrunerConfig,
    metric: crate::train::early_stop::Monitor,
    trials: usize,
}

/// Runs one trial to its end and records it: complete, pruned, or failed with the error.
fn run_trial(study: &Study, search: &Search, trial: &Trial) -> anyhow::Result<()> {
    let dir = trial_dir(&search.dir, trial.number);
    let done = Arc::new(AtomicBool::new(false));
    let result = std::thread::scope(|scope| {
        // Heartbeats while the trial runs, so other workers know it is alive.
        let beat = Duration::from_secs((study.stale_after.as_secs() / 4).max(1));
        let done2 = done.clone();
        scope.spawn(move || {
            let mut waited = Duration::ZERO;
            while !done2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                waited += Duration::from_millis(200);
                if waited >= beat {
                    waited = Duration::ZERO;
                    let _ = study.heartbeat(trial.number);
                }
            }
        });
        let r = run_finetune(study, search, trial, &dir);
        done.store(true, Ordering::Relaxed);
        r
    });
    match result {
        Ok((state, value)) => {
            study.tell(trial.number, state, value)?;
            eprintln!(
                "trial {}: {} {} = {}",
                trial.number,
                state.as_str(),
                search.metric,
                value.map_or("-".into(), |v| format!("{v:.5}"))
            );
        }
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("trial {}: failed: {msg}", trial.number);
            study.fail(trial.number, &msg)?;
        }
    }
    Ok(())
}

fn run_finetune(
    study: &Study,
    search: &Search,
    trial: &Trial,
    dir: &Path,
) -> anyhow::Result<(TrialState, Option<f64>)> {
    let resume =
        trial.resumed && RunDir::open_existing(dir).is_ok_and(|r| r.resume_checkpoint().is_ok());
    let (cfg, run_dir) = if resume {
        let run_dir = RunDir::open_existing(dir)?;
        (run_dir.read_config::<FinetuneConfig>()?, run_dir)
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.parent().unwrap_or(dir))?;
        let cfg = trial_config(&search.fixed, &trial.params, dir)?;
        (cfg, RunDir::create(Some(dir))?)
    };
    let pruned = Arc::new(Mutex::new(None::<f64>));
    let number = trial.number;
    let metric = search.metric;
    let pruner = &search.pruner;
    let direction = study.spec().direction;
    let pruned2 = pruned.clone();
    // `finetune`'s callback must own what it uses, and the study is borrowed: each epoch is sent to a
    // thread of this scope that reports it to the study, asks the pruner and sends the answer back.
    let (tx, rx) = std::sync::mpsc::channel::<(usize, f64, std::sync::mpsc::Sender<bool>)>();
    let tx = Mutex::new(tx);
    let opts = RunOptions {
        on_epoch: Some(EpochCallback(Arc::new(move |epoch, m| {
            let value = metric.value(m);
            let (answer_tx, answer_rx) = std::sync::mpsc::channel();
            let sent = tx
                .lock()
                .map(|t| t.send((epoch, value, answer_tx)).is_ok())
                .unwrap_or(false);
            if sent && answer_rx.recv().unwrap_or(false) {
                *pruned2.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
                Decision::Stop {
                    reason: format!("pruned after epoch {epoch} ({metric} {value:.5})"),
                    best_epoch: epoch,
                }
            } else {
                Decision::Continue { improved: false }
            }
        }))),
        // Trials that keep a prefix frozen without augmentation compute its outputs once per study.
        feature_store: Some(search.dir.join("features")),
        ..RunOptions::default()
    };
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| {
            for (epoch, value, answer) in rx {
                let _ = study.report(number, epoch, value);
                let prune = match study.trials() {
                    Ok(all) => all
                        .iter()
                        .find(|t: &&TrialRecord| t.number == number)
                        .is_some_and(|me| pruner.should_prune(&all, me, epoch, direction)),
                    Err(_) => false,
                };
                let _ = answer.send(prune);
            }
        });
        let r = finetune(&cfg, &run_dir, resume, &opts);
        drop(opts);
        r
    })?;
    if let Some(v) = *pruned.lock().unwrap_or_else(|e| e.into_inner()) {
        return Ok((TrialState::Pruned, Some(v)));
    }
    let value = match metric {
        crate::train::early_stop::Monitor::ValLoss => outcome.val_loss,
        crate::train::early_stop::Monitor::ValAcc => outcome.val_acc,
    };
    if !value.is_finite() {
        bail!("{metric} is not a number ({value}); does the data have validation images?");
    }
    Ok((TrialState::Complete, Some(value)))
}

pub fn run(args: SearchArgs) -> anyhow::Result<()> {
    match args.command {
        Some(SearchCommand::Show(s)) => show(&s),
        None => search(args.run),
    }
}

fn search(a: RunArgs) -> anyhow::Result<()> {
    let Some(space_path) = &a.space else {
        bail!("--space FILE is required (a TOML search space), or `graft search show STUDY`");
    };
    let text = std::fs::read_to_string(space_path)
        .with_context(|| format!("reading {}", space_path.display()))?;
    let space = Space::from_toml(&text, &finetune_options())?;
    let at = StudyAt::new(&a.study, a.study_dir.as_deref())?;
    let mut fixed = Vec::new();
    if let Some(b) = &a.base {
        fixed.extend(["--base".to_string(), b.clone()]);
    }
    let Some(data) = &a.data else {
        bail!("--data DIR is required: the image folder every trial trains on");
    };
    let data = std::fs::canonicalize(data).with_context(|| format!("--data {}", data.display()))?;
    fixed.extend(["--data".to_string(), data.display().to_string()]);
    fixed.extend(a.finetune.iter().cloned());
    for p in &space.params {
        let flag = format!("--{}", p.name.replace('_', "-"));
        if fixed.iter().any(|f| f == &flag) {
            bail!(
                "{flag} is both fixed (after --) and in the search space {}",
                space_path.display()
            );
        }
    }
    let metric: crate::train::early_stop::Monitor = a
        .metric
        .parse()
        .map_err(|e| anyhow::anyhow!("--metric: {e}"))?;
    let direction = match metric {
        crate::train::early_stop::Monitor::ValLoss => Direction::Minimize,
        crate::train::early_stop::Monitor::ValAcc => Direction::Maximize,
    };
    let sampler: SamplerConfig = a.sampler.parse()?;
    let pruner = PrunerConfig::from_name(&a.pruner)?;
    // A sampled config is checked before anything is written, so a bad fixed flag fails now (it is never
    // run: each trial's own config is validated by its run).
    let probe = crate::search::sampler::random_params(&space, a.seed, 0);
    trial_config(&fixed, &probe, &at.dir().join("trials/probe"))
        .and_then(|cfg| Ok(crate::train::config::validate(&cfg)?))
        .context("checking the finetune flags of a first trial")?;
    std::fs::create_dir_all(at.dir())
        .with_context(|| format!("creating {}", at.dir().display()))?;
    let spec = StudySpec {
        space,
        sampler,
        direction,
        seed: a.seed,
        extra: serde_json::json!({ "fixed": fixed, "metric": a.metric, "pruner": pruner }),
    };
    let search = Search {
        dir: at.dir().to_path_buf(),
        fixed,
        pruner,
        metric,
        trials: a.trials,
    };
    eprintln!(
        "study {} ({} trials, {} workers)",
        at.shown(),
        a.trials,
        a.workers
    );
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..a.workers.max(1))
            .map(|_| {
                let (spec, at, search) = (spec.clone(), &at, &search);
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut study = Study::open(at.storage()?, spec)?;
                    study.stale_after = Duration::from_secs(a.stale_after);
                    while let Some(trial) = study.ask(Some(search.trials))? {
                        eprintln!(
                            "trial {}{}: {}",
                            trial.number,
                            if trial.resumed { " (resumed)" } else { "" },
                            format_params(&trial.params)
                        );
                        run_trial(&study, search, &trial)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    show(&ShowArgs {
        study: a.study.clone(),
        study_dir: a.study_dir.clone(),
        format: "table".into(),
    })
}

fn format_params(p: &crate::search::Params) -> String {
    p.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn show(s: &ShowArgs) -> anyhow::Result<()> {
    let at = StudyAt::new(&s.study, s.study_dir.as_deref())?;
    if !at.exists()? {
        bail!("{}: no study there", at.shown());
    }
    let storage = at.storage()?;
    let spec: StudySpec = serde_json::from_str(&storage.open_study("{}")?)?;
    let mut trials = storage.trials()?;
    let d = spec.direction;
    let rank = |t: &TrialRecord| match t.state {
        TrialState::Complete => 0,
        TrialState::Pruned => 1,
        TrialState::Running => 2,
        TrialState::Failed => 3,
    };
    trials.sort_by(|a, b| {
        rank(a).cmp(&rank(b)).then(
            d.to_min(a.value.unwrap_or(f64::INFINITY))
                .total_cmp(&d.to_min(b.value.unwrap_or(f64::INFINITY))),
        )
    });
    match s.format.as_str() {
        "json" => {
            for t in &trials {
                println!(
                    "{}",
                    serde_json::json!({"number": t.number, "state": t.state, "value": t.value, "params": t.params,
                        "message": t.message})
                );
            }
        }
        "table" => {
            println!(
                "{:>6}  {:<9}  {:>10}  {:>8}  params",
                "number", "state", "value", "time_s"
            );
            for t in &trials {
                let time = t
                    .finished
                    .map_or("-".into(), |f| format!("{:.1}", f - t.started));
                let value = t.value.map_or("-".into(), |v| format!("{v:.5}"));
                let mut params = format_params(&t.params);
                if let Some(m) = &t.message {
                    params.push_str(&format!("  [{m}]"));
                }
                println!(
                    "{:>6}  {:<9}  {:>10}  {:>8}  {params}",
                    t.number,
                    t.state.as_str(),
                    value,
                    time
                );
            }
        }
        other => bail!("--format: `{other}` is not table|json"),
    }
    if let Some(best) = trials.first().filter(|t| t.state == TrialState::Complete) {
        let src = trial_dir(at.dir(), best.number).join("config.json");
        let dst = at.dir().join("best-config.json");
        if matches!(at, StudyAt::Postgres { .. }) && !src.is_file() {
            eprintln!(
                "best trial {}: ran on another machine (worker {}); its config.json is in that \
                 machine's {}",
                best.number,
                best.worker,
                trial_dir(at.dir(), best.number).display()
            );
        } else {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            eprintln!(
                "best trial {}: config written to {}",
                best.number,
                dst.display()
            );
        }
    }
    let metric = spec.extra["metric"].as_str().unwrap_or("value");
    std::fs::create_dir_all(at.dir())
        .with_context(|| format!("creating {}", at.dir().display()))?;
    let plots = crate::search::plots::plot_study(&spec.space, d, metric, &trials, at.dir())?;
    if !plots.is_empty() {
        let names: Vec<String> = plots.iter().map(|p| p.display().to_string()).collect();
        eprintln!("plots: {}", names.join(", "));
    }
    Ok(())
}
