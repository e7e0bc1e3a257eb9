//! What a person watching training sees: an indicatif bar per pass (batches done, running loss and accuracy,
//! images/s) on a terminal, plain lines otherwise, and one summary line per epoch either way.
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
    /// A plain line a few times per pass (stderr is not a terminal, e.g. a log file).
    Lines,
    /// Nothing within a pass; epoch lines only (`--quiet`).
    EpochsOnly,
}

impl Display {
    /// `--quiet` wins; otherwise a bar when stderr is a terminal, plain lines when it is not.
    pub fn choose(quiet: bool) -> Display {
        if quiet {
            Display::EpochsOnly
        } else if std::io::stderr().is_terminal() {
            Display::Bar
        } else {
            Display::Lines
        }
    }
}

/// Plain progress lines per pass in [`Display::Lines`] mode.
const LINES_PER_PASS: usize = 4;

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
            prefix,
            batches,
            done: 0,
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
    prefix: String,
    batches: usize,
    done: usize,
    stats: RunningStats,
    start: Instant,
}

impl PassProgress<'_> {
    /// Records one batch of `images` images with mean loss `mean_loss`, `correct` of them classified right.
    pub fn batch(&mut self, images: usize, mean_loss: f64, correct: usize) {
        self.stats.add_batch(mean_loss, correct, images);
        self.done += 1;
        let rate = self.stats.samples() as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let msg = format_running(&self.stats, rate);
        match (&self.bar, self.reporter.display) {
            (Some(bar), _) => {
                bar.set_message(msg);
                bar.inc(1);
            }
            (None, Display::Lines) => {
                let every = self.batches.div_ceil(LINES_PER_PASS).max(1);
                if self.done.is_multiple_of(every) || self.done == self.batches {
                    let line = format!("{} {}/{} {msg}", self.prefix, self.done, self.batches);
                    self.reporter.line(&line);
                }
            }
            _ => {}
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
/// `epoch 3/10  train loss 0.4123 acc 87.50%  val loss 0.5012 acc 84.00%  lr 1.00e-3  12.3s  812 img/s`.
pub fn format_epoch_line(m: &EpochMetrics, epochs: usize) -> String {
    format!(
        "epoch {}/{epochs}  train loss {:.4} acc {}  val loss {:.4} acc {}  lr {:.2e}  {:.1}s  {:.0} img/s",
        m.epoch,
        m.train_loss,
        pct(m.train_acc),
        m.val_loss,
        pct(m.val_acc),
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
    fn plain_lines_appear_a_few_times_per_pass_and_once_per_epoch() {
        let out = Captured::default();
        let mut rep = Reporter::with_writer(Display::Lines, 10, Box::new(out.clone()));
        let mut pass = rep.pass("train", 3, 8);
        for _ in 0..8 {
            pass.batch(4, 0.5, 3);
        }
        let stats = pass.finish();
        assert_eq!(stats.samples(), 32);
        assert!((stats.accuracy() - 0.75).abs() < 1e-12);
        rep.epoch_done(&metrics(), true);
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), LINES_PER_PASS + 1, "{text}");
        assert!(
            lines[0].starts_with("epoch 3/10 train 2/8 loss 0.5000 acc 75.00%"),
            "{text}"
        );
        assert!(lines[4].ends_with("*best"), "{text}");
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
        assert_ne!(Display::choose(false), Display::EpochsOnly);
    }
}
