//! PNG plots of a run: the loss and accuracy curves, and the confusion matrix as a heatmap.
//!
//! Drawn with the `image` crate and graft's own bitmap font ([`super::font`]) rather than `plotters`, which needs
//! either system fonts (fontconfig) or a TTF file shipped with graft to draw any text; this way a plot renders the
//! same on every machine, CI included.

use super::font::{glyph, text_width, ADVANCE, GLYPH_H};
use super::metrics::{ConfusionMatrix, EpochMetrics};
use crate::{Error, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
pub(crate) const BLACK: Rgb<u8> = Rgb([20, 20, 20]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
pub(crate) const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
pub(crate) const VAL: Rgb<u8> = Rgb([255, 127, 14]);
/// Darkest heatmap colour (a full row on one cell).
const HEAT: [f64; 3] = [8.0, 48.0, 107.0];

/// An RGB image with the few drawing operations the plots need.
pub(crate) struct Canvas {
    img: RgbImage,
}

impl Canvas {
    pub(crate) fn new(w: u32, h: u32) -> Self {
        Canvas {
            img: RgbImage::from_pixel(w, h, WHITE),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    pub(crate) fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.put(xx, yy, c);
            }
        }
    }

    /// A line `thickness` pixels wide (Bresenham with a square brush).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thickness: i64, c: Rgb<u8>) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let half = thickness / 2;
        loop {
            self.rect(x - half, y - half, thickness, thickness, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at `(x, y)`.
    pub(crate) fn text(&mut self, x: i64, y: i64, s: &str, scale: u32, c: Rgb<u8>) {
        let k = scale as i64;
        for (i, ch) in s.chars().enumerate() {
            let ox = x + i as i64 * ADVANCE as i64 * k;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.rect(ox + col * k, y + row as i64 * k, k, k, c);
                    }
                }
            }
        }
    }

    /// Text rotated a quarter turn anticlockwise (read from bottom to top), with its baseline-start at the
    /// bottom-left corner `(x, y)`.
    fn text_up(&mut self, x: i64, y: i64, s: &str, scale: u32, c: Rgb<u8>) {
        let k = scale as i64;
        for (i, ch) in s.chars().enumerate() {
            let oy = y - i as i64 * ADVANCE as i64 * k;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.rect(x + row as i64 * k, oy - (col + 1) * k, k, k, c);
                    }
                }
            }
        }
    }

    /// Text centred horizontally on `cx`.
    pub(crate) fn text_centered(&mut self, cx: i64, y: i64, s: &str, scale: u32, c: Rgb<u8>) {
        self.text(cx - text_width(s, scale) as i64 / 2, y, s, scale, c);
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        self.img
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .map_err(|e| Error::Image {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        // Plots of a shared study folder are written by every worker (see `write_atomic_shared`).
        crate::fsutil::write_atomic_shared(path, &bytes)
    }
}

/// About five round tick values covering `[lo, hi]` (steps of 1, 2 or 5 times a power of ten).
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

/// A tick label with as many decimals as the step needs.
fn tick_label(v: f64, step: f64, percent: bool) -> String {
    let (v, step) = if percent {
        (v * 100.0, step * 100.0)
    } else {
        (v, step)
    };
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let s = format!("{v:.decimals$}");
    let s = if s == "-0" { "0".to_string() } else { s };
    if percent {
        format!("{s}%")
    } else {
        s
    }
}

/// One line of a chart: a name, a colour and its (x, y) points (non-finite values leave a gap); `lines: false`
/// draws the points alone (a scatter).
pub(crate) struct Series<'a> {
    pub name: &'a str,
    pub color: Rgb<u8>,
    pub points: Vec<(f64, f64)>,
    pub lines: bool,
}

/// The axes of a panel: its title, the x axis's label and whether x takes only whole values (epochs,
/// trial numbers); `percent`: y is a fraction shown in percent.
pub(crate) struct Axes<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub integer_x: bool,
    pub percent: bool,
}

/// The axes of a curve against the epoch.
fn per_epoch(title: &str, percent: bool) -> Axes<'_> {
    Axes {
        title,
        x_label: "epoch",
        integer_x: true,
        percent,
    }
}

/// Draws a chart of `series` into the `w x h` panel at `(x0, y0)`.
pub(crate) fn line_panel(
    cv: &mut Canvas,
    (x0, y0, w, h): (i64, i64, i64, i64),
    axes: &Axes,
    series: &[Series],
) {
    let (title, percent) = (axes.title, axes.percent);
    const S: u32 = 2;
    let (left, right, top, bottom) = (90, 30, 44, 64);
    let (px, py, pw, ph) = (x0 + left, y0 + top, w - left - right, h - top - bottom);
    cv.text_centered(x0 + w / 2, y0 + 10, title, S, BLACK);

    let finite: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .collect();
    let (xmin, xmax) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| {
            (a.min(*x), b.max(*x))
        });
    let (ymin, ymax) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| {
            (a.min(*y), b.max(*y))
        });
    let (xmin, xmax) = if finite.is_empty() {
        (1.0, 2.0)
    } else if axes.integer_x {
        (xmin, xmax.max(xmin + 1.0))
    } else {
        let pad = ((xmax - xmin) * 0.05).max(1e-9);
        (xmin - pad, xmax + pad)
    };
    let (ymin, ymax) = if finite.is_empty() {
        (0.0, 1.0)
    } else {
        let pad = ((ymax - ymin) * 0.08).max(if percent { 0.01 } else { 1e-3 });
        let (lo, hi) = (ymin - pad, ymax + pad);
        if percent {
            (lo.max(0.0), hi.min(1.0))
        } else {
            (if ymin >= 0.0 { lo.max(0.0) } else { lo }, hi)
        }
    };
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        (
            px + ((x - xmin) / (xmax - xmin) * pw as f64).round() as i64,
            py + ph - ((y - ymin) / (ymax - ymin) * ph as f64).round() as i64,
        )
    };

    // Grid, ticks and their labels.
    let yt = nice_ticks(ymin, ymax);
    let ystep = if yt.len() > 1 {
        yt[1] - yt[0]
    } else {
        ymax - ymin
    };
    for &v in &yt {
        let (_, y) = to_px(xmin, v);
        cv.line((px, y), (px + pw, y), 1, GRID);
        let label = tick_label(v, ystep, percent);
        cv.text(
            px - 10 - text_width(&label, S) as i64,
            y - 7,
            &label,
            S,
            BLACK,
        );
    }
    let xt: Vec<f64> = nice_ticks(xmin, xmax)
        .into_iter()
        .filter(|v| !axes.integer_x || v.fract() == 0.0)
        .filter(|v| (xmin..=xmax).contains(v))
        .collect();
    let xstep = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
    for &v in &xt {
        let (x, _) = to_px(v, ymin);
        cv.line((x, py), (x, py + ph), 1, GRID);
        let label = if axes.integer_x {
            format!("{v:.0}")
        } else {
            tick_label(v, xstep, false)
        };
        cv.text_centered(x, py + ph + 10, &label, S, BLACK);
    }
    cv.line((px, py), (px, py + ph), 2, BLACK);
    cv.line((px, py + ph), (px + pw, py + ph), 2, BLACK);
    cv.text_centered(px + pw / 2, py + ph + 36, axes.x_label, S, BLACK);

    for s in series {
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &s.points {
            if !y.is_finite() {
                prev = None;
                continue;
            }
            let p = to_px(x, y.clamp(ymin, ymax));
            if let (Some(q), true) = (prev, s.lines) {
                cv.line(q, p, 3, s.color);
            }
            cv.rect(p.0 - 3, p.1 - 3, 7, 7, s.color);
            prev = Some(p);
        }
    }

    // Legend in the header, right-aligned, so it never hides a curve.
    let mut lx = x0 + w - right;
    for s in series.iter().rev() {
        lx -= text_width(s.name, S) as i64 + 64;
        cv.line((lx, y0 + 17), (lx + 28, y0 + 17), 3, s.color);
        cv.text(lx + 36, y0 + 10, s.name, S, BLACK);
    }
}

/// Writes the loss (left) and accuracy (right) curves of `metrics`, train and validation, to one PNG.
pub fn plot_curves(metrics: &[EpochMetrics], path: impl AsRef<Path>) -> Result<()> {
    let (w, h) = (640i64, 440i64);
    let mut cv = Canvas::new(2 * w as u32, h as u32);
    let points = |f: fn(&EpochMetrics) -> f64| -> Vec<(f64, f64)> {
        metrics.iter().map(|m| (m.epoch as f64, f(m))).collect()
    };
    let loss = [
        Series {
            name: "train",
            color: TRAIN,
            points: points(|m| m.train_loss),
            lines: true,
        },
        Series {
            name: "val",
            color: VAL,
            points: points(|m| m.val_loss),
            lines: true,
        },
    ];
    let acc = [
        Series {
            name: "train",
            color: TRAIN,
            points: points(|m| m.train_acc),
            lines: true,
        },
        Series {
            name: "val",
            color: VAL,
            points: points(|m| m.val_acc),
            lines: true,
        },
    ];
    line_panel(&mut cv, (0, 0, w, h), &per_epoch("loss", false), &loss);
    line_panel(&mut cv, (w, 0, w, h), &per_epoch("accuracy", true), &acc);
    cv.save(path.as_ref())
}

/// Writes the train and validation loss of `metrics` as one panel titled `title`, for runs that have no
/// accuracy (pretraining).
pub fn plot_loss_curves(
    metrics: &[EpochMetrics],
    title: &str,
    path: impl AsRef<Path>,
) -> Result<()> {
    let (w, h) = (800i64, 440i64);
    let mut cv = Canvas::new(w as u32, h as u32);
    let points = |f: fn(&EpochMetrics) -> f64| -> Vec<(f64, f64)> {
        metrics.iter().map(|m| (m.epoch as f64, f(m))).collect()
    };
    let loss = [
        Series {
            name: "train",
            color: TRAIN,
            points: points(|m| m.train_loss),
            lines: true,
        },
        Series {
            name: "val",
            color: VAL,
            points: points(|m| m.val_loss),
            lines: true,
        },
    ];
    line_panel(&mut cv, (0, 0, w, h), &per_epoch(title, false), &loss);
    cv.save(path.as_ref())
}

/// Shortens `s` to at most `max` characters, marking the cut with `~`.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars()
            .take(max - 1)
            .chain(std::iter::once('~'))
            .collect()
    }
}

/// Writes the confusion matrix as a heatmap PNG: rows are true classes, columns predictions, each cell shows its
/// count and is shaded by its share of the row (so the diagonal reads as per-class recall).
pub fn plot_confusion(
    cm: &ConfusionMatrix,
    class_names: &[String],
    path: impl AsRef<Path>,
) -> Result<()> {
    const MAX_LABEL: usize = 20;
    let n = cm.classes().max(1) as i64;
    let cell = (640 / n).clamp(16, 72);
    let scale: u32 = if cell >= 36 { 2 } else { 1 };
    let names: Vec<String> = (0..cm.classes())
        .map(|c| {
            clip(
                class_names.get(c).map_or(&format!("class {c}"), |s| s),
                MAX_LABEL,
            )
        })
        .collect();
    let label_w = names
        .iter()
        .map(|s| text_width(s, scale))
        .max()
        .unwrap_or(0) as i64;
    let (left, top) = (label_w + 60, 48);
    let bottom = label_w + 60;
    let (w, h) = (left + n * cell + 30, top + n * cell + bottom);
    let mut cv = Canvas::new(w as u32, h as u32);
    cv.text_centered(w / 2, 14, "confusion matrix", 2, BLACK);

    let fractions = cm.row_fractions();
    let max_count = (0..cm.classes())
        .flat_map(|t| (0..cm.classes()).map(move |p| (t, p)))
        .map(|(t, p)| cm.get(t, p))
        .max()
        .unwrap_or(0);
    let digit_scale = if text_width(&max_count.to_string(), 2) as i64 + 6 <= cell {
        2
    } else {
        1
    };
    for (t, row) in fractions.iter().enumerate() {
        for (p, &f) in row.iter().enumerate() {
            let shade = |i: usize| (255.0 + (HEAT[i] - 255.0) * f).round() as u8;
            let color = Rgb([shade(0), shade(1), shade(2)]);
            let (x, y) = (left + p as i64 * cell, top + t as i64 * cell);
            cv.rect(x, y, cell, cell, color);
            let count = cm.get(t, p).to_string();
            if text_width(&count, digit_scale) as i64 + 4 <= cell {
                let ink = if f > 0.5 { WHITE } else { BLACK };
                let ty = y + (cell - (GLYPH_H - 2) as i64 * digit_scale as i64) / 2;
                cv.text_centered(x + cell / 2, ty, &count, digit_scale, ink);
            }
        }
    }
    // Cell borders.
    for i in 0..=n {
        cv.line(
            (left, top + i * cell),
            (left + n * cell, top + i * cell),
            1,
            GRID,
        );
        cv.line(
            (left + i * cell, top),
            (left + i * cell, top + n * cell),
            1,
            GRID,
        );
    }
    let glyph_h = (GLYPH_H - 2) as i64 * scale as i64;
    for (c, name) in names.iter().enumerate() {
        let mid = c as i64 * cell + cell / 2;
        let tw = text_width(name, scale) as i64;
        cv.text(left - 8 - tw, top + mid - glyph_h / 2, name, scale, BLACK);
        cv.text_up(
            left + mid - glyph_h / 2,
            top + n * cell + 8 + tw,
            name,
            scale,
            BLACK,
        );
    }
    cv.text_up(
        8,
        top + n * cell / 2 + text_width("true", 2) as i64 / 2,
        "true",
        2,
        BLACK,
    );
    cv.text_centered(left + n * cell / 2, h - 26, "predicted", 2, BLACK);
    cv.save(path.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn history() -> Vec<EpochMetrics> {
        (1..=8)
            .map(|e| {
                let e_f = e as f64;
                EpochMetrics {
                    epoch: e,
                    train_loss: 2.0 / e_f,
                    train_acc: 1.0 - 0.5 / e_f,
                    val_loss: 2.2 / e_f + 0.02 * e_f,
                    val_acc: 0.9 - 0.45 / e_f,
                    lr: 1e-3,
                    seconds: 1.0,
                    images_per_s: 100.0,
                    extra: BTreeMap::new(),
                }
            })
            .collect()
    }

    fn pixel_count(path: &Path, color: Rgb<u8>) -> usize {
        image::open(path)
            .unwrap()
            .to_rgb8()
            .pixels()
            .filter(|p| **p == color)
            .count()
    }

    #[test]
    fn curves_plot_is_a_png_with_both_series_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        plot_curves(&history(), &path).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (1280, 440));
        assert!(pixel_count(&path, TRAIN) > 500);
        assert!(pixel_count(&path, VAL) > 500);
    }

    #[test]
    fn curves_plot_survives_one_epoch_and_a_diverged_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = history();
        h.truncate(2);
        h[1].val_loss = f64::NAN;
        plot_curves(&h[..1], dir.path().join("one.png")).unwrap();
        plot_curves(&h, dir.path().join("nan.png")).unwrap();
        plot_curves(&[], dir.path().join("empty.png")).unwrap();
        assert!(pixel_count(&dir.path().join("nan.png"), VAL) > 0);
    }

    #[test]
    fn confusion_heatmap_shades_the_diagonal_darkest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.png");
        let mut cm = ConfusionMatrix::new(3);
        for _ in 0..9 {
            cm.add(0, 0);
            cm.add(1, 1);
        }
        cm.add(2, 1);
        cm.add(2, 2);
        cm.add(0, 2);
        let names = vec![
            "cat".to_string(),
            "dog".to_string(),
            "a_very_long_class_name_indeed".to_string(),
        ];
        plot_confusion(&cm, &names, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // Class 0 is always right: its diagonal cell is the darkest colour.
        let darkest = img.pixels().filter(|p| p.0 == [8, 48, 107]).count();
        assert!(darkest > 1000, "{darkest} darkest pixels");
    }

    #[test]
    fn ticks_are_round_numbers_inside_the_range() {
        let t = nice_ticks(0.0, 1.0);
        let expected = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
        assert_eq!(t.len(), expected.len(), "{t:?}");
        assert!(
            t.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-12),
            "{t:?}"
        );
        let t = nice_ticks(0.13, 0.87);
        assert!(
            t.iter().all(|v| (0.13..=0.87).contains(v)) && t.len() >= 3,
            "{t:?}"
        );
        assert_eq!(tick_label(0.25, 0.05, true), "25%");
        assert_eq!(tick_label(0.15, 0.05, false), "0.15");
        assert_eq!(clip("abcdefgh", 5), "abcd~");
    }
}
