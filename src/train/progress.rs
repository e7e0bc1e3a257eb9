//! What a person watching training sees: an indicatif bar per pass (batches done, running loss and accuracy,
//! images/s) on a terminal, and one summary line per epoch either way; without a terminal (a pipe, CI, a log
//! file) only the epoch lines, no per-batch lines.
//!
//! Bars go to stderr; epoch lines and summaries go to the report writer (stdout by default), after the bar is
//! cleared, so a log file of stdout holds exactly one line per epoch.

use super::metrics::{ConfusionMatrix, EpochMetrics, RunningStats};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// How progress within an epoch is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// An indicatif bar on stderr.
    Bar,
    /// Nothing within a pass; epoch lines only (`--quiet`, or stderr is not a terminal).
    EpochsOnly,
}

impl Display {
    /// A bar when stderr is a terminal and `--quiet` is not given; epoch lines only otherwise.
    pub fn choose(quiet: bool) -> Display {
        Self::for_terminal(quiet, std::io::stderr().is_terminal())
    }

    /// [`Display::choose`] for a stderr that is (or is not) a terminal.
    pub fn for_terminal(quiet: bool, terminal: bool) -> Display {
        if terminal && !quiet {
            Display::Bar
        } else {
            Display::EpochsOnly
        }
    }
}

/// Reports a whole run.
pub struct Reporter {
    display: Display,
    epochs: usize,
    out: Box<dyn Write + Send>,
}

impl Reporter {
    /// A reporter for `epochs` epochs writing epoch lines to stdout.
    pub fn new(quiet: bool, epochs: usize) -> Self {
        Self::with_writer(Display::choose(quiet), epochs, Box::new(std::io::stdout()))
    }

    /// A reporter with an explicit display mode and writer (tests, or a log file).
    pub fn with_writer(display: Display, epochs: usize, out: Box<dyn Write + Send>) -> Self {
        Reporter {
            display,
            epochs,
            out,
        }
    }

    pub fn display(&self) -> Display {
        self.display
    }

    /// Starts showing one pass (`phase` is e.g. `train` or `val`) of `batches` batches in `epoch`.
    pub fn pass(&mut self, phase: &str, epoch: usize, batches: usize) -> PassProgress<'_> {
        let prefix = format!("epoch {epoch}/{} {phase}", self.epochs);
        let bar = (self.display == Display::Bar).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(batches as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(prefix.clone());
            bar
        });
        PassProgress {
            reporter: self,
            bar,
            stats: RunningStats::new(),
            start: Instant::now(),
        }
    }

    /// Writes the summary line of a finished epoch; `best` marks a new best epoch.
    pub fn epoch_done(&mut self, m: &EpochMetrics, best: bool) {
        let mut line = format_epoch_line(m, self.epochs);
        if best {
            line.push_str("  *best");
        }
        self.line(&line);
    }

    /// Writes any message (a stop reason, the final summary) as its own line(s).
    pub fn line(&mut self, text: &str) {
        // A broken pipe on stdout must not abort training; the checkpoint matters more than the report.
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }
}

/// The progress of one pass over the batches.
pub struct PassProgress<'a> {
    reporter: &'a mut Reporter,
    bar: Option<ProgressBar>,
    stats: RunningStats,
    start: Instant,
}

impl PassProgress<'_> {
    /// Records one batch of `images` images with mean loss `mean_loss`, `correct` of them classified right.
    pub fn batch(&mut self, images: usize, mean_loss: f64, correct: usize) {
        self.stats.add_batch(mean_loss, correct, images);
        if let Some(bar) = &self.bar {
            let rate = self.stats.samples() as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format_running(&self.stats, rate));
            bar.inc(1);
        }
    }

    /// Writes a message (a warning) as its own line, above the bar when there is one.
    pub fn note(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| self.reporter.line(text)),
            None => self.reporter.line(text),
        }
    }

    /// Loss and accuracy so far.
    pub fn stats(&self) -> RunningStats {
        self.stats
    }

    /// Images per second since the pass started.
    pub fn images_per_s(&self) -> f64 {
        self.stats.samples() as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Clears the bar and returns the pass's statistics.
    pub fn finish(self) -> RunningStats {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.stats
    }
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.2}%", 100.0 * v)
    } else {
        "-".into()
    }
}

fn format_running(stats: &RunningStats, images_per_s: f64) -> String {
    format!(
        "loss {:.4} acc {} {:.0} img/s",
        stats.loss(),
        pct(stats.accuracy()),
        images_per_s
    )
}

/// The one-line summary of an epoch, e.g.
/// `epoch 3/10  train loss 0.4123 acc 87.50%  val loss 0.5012 acc 84.00%  lr 1.00e-3  12.3s  812 img/s`;
/// the phase's name follows the epoch when the metrics carry one (`epoch 3/10 stage2  ...`), and accuracies
/// are left out for runs without labels, the validation column for runs without validation images.
pub fn format_epoch_line(m: &EpochMetrics, epochs: usize) -> String {
    let phase = m
        .extra
        .get("phase")
        .and_then(|p| p.as_str())
        .map_or(String::new(), |p| format!(" {p}"));
    let labelled = !(m.train_acc.is_nan() && m.val_acc.is_nan());
    let acc = |v: f64| {
        if labelled {
            format!(" acc {}", pct(v))
        } else {
            String::new()
        }
    };
    // A run without validation images (finetune's default) shows no val column.
    let val = if m.val_loss.is_nan() && m.val_acc.is_nan() {
        String::new()
    } else {
        format!("  val loss {:.4}{}", m.val_loss, acc(m.val_acc))
    };
    format!(
        "epoch {}/{epochs}{phase}  train loss {:.4}{}{val}  lr {:.2e}  {:.1}s  {:.0} img/s",
        m.epoch,
        m.train_loss,
        acc(m.train_acc),
        m.lr,
        m.seconds,
        m.images_per_s
    )
}

/// The end-of-run report: why training ended, the best epoch and its numbers, time and throughput, then the
/// confusion matrix with per-class precision and recall (of the weights the run ends with).
pub fn format_summary(
    history: &[EpochMetrics],
    best_epoch: Option<usize>,
    stop_reason: Option<&str>,
    cm: &ConfusionMatrix,
    class_names: &[String],
) -> String {
    let mut out = String::new();
    let epochs = history.last().map_or(0, |m| m.epoch);
    match stop_reason {
        Some(reason) => out.push_str(&format!("stopped early after epoch {epochs}: {reason}\n")),
        None => out.push_str(&format!("finished {epochs} epochs\n")),
    }
    if let Some(best) = best_epoch.and_then(|b| history.iter().find(|m| m.epoch == b)) {
        out.push_str(&format!(
            "best epoch {}: val loss {:.4}, val acc {} (these weights are kept)\n",
            best.epoch,
            best.val_loss,
            pct(best.val_acc)
        ));
    }
    let seconds: f64 = history.iter().map(|m| m.seconds).sum();
    let images: f64 = history.iter().map(|m| m.images_per_s * m.seconds).sum();
    out.push_str(&format!(
        "time {seconds:.1}s, {:.0} train img/s on average\n\n",
        images / seconds.max(1e-9)
    ));
    out.push_str(&cm.render(class_names));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    /// A writer whose contents the test can read afterwards.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn metrics() -> EpochMetrics {
        EpochMetrics {
            epoch: 3,
            train_loss: 0.41234,
            train_acc: 0.875,
            val_loss: 0.5012,
            val_acc: 0.84,
            lr: 1e-3,
            seconds: 12.34,
            images_per_s: 812.4,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn an_epoch_line_shows_losses_accuracies_lr_time_and_throughput() {
        assert_eq!(
            format_epoch_line(&metrics(), 10),
            "epoch 3/10  train loss 0.4123 acc 87.50%  val loss 0.5012 acc 84.00%  lr 1.00e-3  12.3s  812 img/s"
        );
    }

    #[test]
    fn without_a_terminal_only_epoch_lines_are_printed() {
        assert_eq!(Display::for_terminal(false, false), Display::EpochsOnly);
        assert_eq!(Display::for_terminal(true, true), Display::EpochsOnly);
        assert_eq!(Display::for_terminal(false, true), Display::Bar);
        let out = Captured::default();
        let mut rep = Reporter::with_writer(
            Display::for_terminal(false, false),
            10,
            Box::new(out.clone()),
        );
        let mut pass = rep.pass("train", 3, 8);
        for _ in 0..8 {
            pass.batch(4, 0.5, 3);
        }
        let stats = pass.finish();
        assert_eq!(stats.samples(), 32);
        assert!((stats.accuracy() - 0.75).abs() < 1e-12);
        rep.epoch_done(&metrics(), true);
        let text = out.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.starts_with("epoch 3/10  train loss") && text.trim_end().ends_with("*best"),
            "{text}"
        );
    }

    #[test]
    fn a_phase_is_named_and_missing_accuracies_are_left_out() {
        let mut m = metrics();
        m.train_acc = f64::NAN;
        m.val_acc = f64::NAN;
        m.extra.insert("phase".into(), serde_json::json!("stage2"));
        assert_eq!(
            format_epoch_line(&m, 10),
            "epoch 3/10 stage2  train loss 0.4123  val loss 0.5012  lr 1.00e-3  12.3s  812 img/s"
        );
    }

    #[test]
    fn quiet_mode_prints_only_epoch_lines() {
        let out = Captured::default();
        let mut rep = Reporter::with_writer(Display::EpochsOnly, 2, Box::new(out.clone()));
        let mut pass = rep.pass("train", 1, 3);
        for _ in 0..3 {
            pass.batch(2, 1.0, 1);
        }
        pass.finish();
        rep.epoch_done(&metrics(), false);
        assert_eq!(out.text().lines().count(), 1);
        assert!(!out.text().contains("best"));
    }

    #[test]
    fn the_summary_says_why_training_ended_and_which_weights_are_kept() {
        let mut second = metrics();
        second.epoch = 4;
        second.val_acc = 0.5;
        let mut cm = ConfusionMatrix::new(2);
        cm.add(0, 0);
        cm.add(1, 0);
        let names = vec!["cat".to_string(), "dog".to_string()];
        let text = format_summary(
            &[metrics(), second],
            Some(3),
            Some("val_loss flat"),
            &cm,
            &names,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "stopped early after epoch 4: val_loss flat");
        assert_eq!(
            lines[1],
            "best epoch 3: val loss 0.5012, val acc 84.00% (these weights are kept)"
        );
        assert_eq!(lines[2], "time 24.7s, 812 train img/s on average");
        assert!(
            text.contains("confusion matrix") && text.contains("dog"),
            "{text}"
        );
        let text = format_summary(&[metrics()], None, None, &cm, &names);
        assert!(text.starts_with("finished 3 epochs\n"), "{text}");
    }

    #[test]
    fn quiet_always_means_no_bar() {
        assert_eq!(Display::choose(true), Display::EpochsOnly);
        assert_eq!(Display::for_terminal(true, true), Display::EpochsOnly);
    }
}
