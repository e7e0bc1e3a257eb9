//! Image transforms: the evaluation transform a model card prescribes, training augmentation, and the
//! conversion of 8-bit RGB pixels to normalised `f32` CHW tensors.
//!
//! The evaluation transform is timm's: resize the short side to `floor(input_size / crop_pct)`, then take
//! the centre `input_size` square (torchvision's `Resize(int)` + `CenterCrop`, rounding as they do).
//! Training augmentation is torchvision's `RandomResizedCrop` + `RandomHorizontalFlip`, then optionally an
//! automatic policy (TrivialAugmentWide or RandAugment, [`super::autoaugment`]) and `ColorJitter` on the
//! 8-bit pixels, then normalisation, then optionally timm's `RandomErasing` on the normalised tensor: timm's
//! order, with the same parameter draws.

use super::autoaugment::AutoAugment;
use super::decode::load_rgb;
use super::resample::{resize, Interpolation};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use image::{DynamicImage, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a pretrained model expects of its input, as its model card states it (timm's `pretrained_cfg`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square input, in pixels.
    pub input_size: usize,
    /// Fraction of the resized image kept by the centre crop at evaluation (timm's `crop_pct`).
    pub crop_pct: f64,
    pub interpolation: Interpolation,
    /// Per-channel mean and standard deviation of `[0, 1]` pixels, in RGB order; a grey input uses the
    /// first entry of each.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Channels of the model's input: 3 (RGB) or 1 (grey, ITU-R 601 luma as Pillow's `convert("L")`, so a
    /// grey image comes back exactly). Absent in files written before grey inputs existed, hence 3.
    #[serde(default = "rgb_channels")]
    pub channels: usize,
}

fn rgb_channels() -> usize {
    3
}

impl Preprocess {
    /// The common ImageNet recipe: mean/std of ImageNet, crop 0.875, bilinear.
    pub fn imagenet(input_size: usize) -> Self {
        Preprocess {
            input_size,
            crop_pct: 0.875,
            interpolation: Interpolation::Bilinear,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            channels: 3,
        }
    }

    /// Pixels scaled to `[0, 1]` and otherwise untouched (mean 0, std 1), no crop margin, with `channels`
    /// channels: the input of autoencoders and RBMs, whose reconstructions are pixel values.
    pub fn unit(input_size: usize, channels: usize) -> Self {
        Preprocess {
            input_size,
            crop_pct: 1.0,
            interpolation: Interpolation::Bilinear,
            mean: [0.0; 3],
            std: [1.0; 3],
            channels,
        }
    }

    /// Checks the values a model card or flag may get wrong.
    pub fn validate(&self) -> Result<()> {
        if self.input_size == 0 {
            return Err(Error::config("input_size", "must be at least 1"));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(Error::config(
                "crop_pct",
                format!("{} is not in (0, 1]", self.crop_pct),
            ));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::config(
                "channels",
                format!("{} is not 1 (grey) or 3 (RGB)", self.channels),
            ));
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(Error::config(
                "std",
                format!("{:?} must be positive", self.std),
            ));
        }
        Ok(())
    }

    /// The short side an image is resized to before the centre crop: `floor(input_size / crop_pct)`.
    pub fn resize_size(&self) -> usize {
        ((self.input_size as f64 / self.crop_pct).floor() as usize).max(self.input_size)
    }

    /// Number of `f32` values in one preprocessed image, `channels * input_size^2`.
    pub fn tensor_len(&self) -> usize {
        self.channels * self.input_size * self.input_size
    }
}

/// Resizes so that the shorter side becomes `short`, keeping the aspect ratio as torchvision's
/// `Resize(int)` does (the long side is truncated: `int(short * long / short_side)`).
pub fn resize_short_side(image: &RgbImage, short: u32, interpolation: Interpolation) -> RgbImage {
    let (w, h) = image.dimensions();
    let (nw, nh) = if w <= h {
        (short, ((short as u64 * h as u64) / w as u64).max(1) as u32)
    } else {
        (((short as u64 * w as u64) / h as u64).max(1) as u32, short)
    };
    resize(image, nw, nh, interpolation)
}

/// Python's `round`, which rounds halves to even: torchvision's centre crop offsets use it.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// The centre `size` x `size` square, offsets as torchvision's `CenterCrop` computes them. An image
/// smaller than `size` on a side is padded with black on that side, as torchvision pads.
pub fn center_crop(image: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let left = round_half_even((w as f64 - size as f64) / 2.0);
    let top = round_half_even((h as f64 - size as f64) / 2.0);
    RgbImage::from_fn(size, size, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// The evaluation transform up to (not including) normalisation: the `input_size` square of pixels.
pub fn eval_pixels(image: &RgbImage, p: &Preprocess) -> RgbImage {
    let resized = resize_short_side(image, p.resize_size() as u32, p.interpolation);
    center_crop(&resized, p.input_size as u32)
}

/// Writes `image` (which must be `input_size` square) into `out` as normalised CHW values,
/// `(pixel / 255 - mean) / std`, mirrored left-right when `flip`.
pub fn normalize_into(image: &RgbImage, p: &Preprocess, flip: bool, out: &mut [f32]) {
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    if p.channels == 1 {
        assert_eq!(out.len(), plane, "output holds one {w}x{h} grey image");
        let (scale, shift) = (1.0 / (255.0 * p.std[0]), -p.mean[0] / p.std[0]);
        for y in 0..h {
            for x in 0..w {
                let sx = if flip { w - 1 - x } else { x };
                let [r, g, b] = image.get_pixel(sx, y).0.map(u32::from);
                // Pillow's L = (R*299 + G*587 + B*114) / 1000, rounded.
                let luma = ((r * 299 + g * 587 + b * 114 + 500) / 1000) as f32;
                out[(y * w + x) as usize] = luma * scale + shift;
            }
        }
        return;
    }
    assert_eq!(out.len(), 3 * plane, "output holds one {w}x{h} RGB image");
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * p.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| -p.mean[c] / p.std[c]);
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let src = image.as_raw();
    for y in 0..h as usize {
        let row = &src[y * w as usize * 3..(y + 1) * w as usize * 3];
        for x in 0..w as usize {
            let sx = if flip { w as usize - 1 - x } else { x };
            let px = &row[sx * 3..sx * 3 + 3];
            let i = y * w as usize + x;
            r[i] = px[0] as f32 * scale[0] + shift[0];
            g[i] = px[1] as f32 * scale[1] + shift[1];
            b[i] = px[2] as f32 * scale[2] + shift[2];
        }
    }
}

/// The evaluation transform of a decoded image as a `[channels, input_size, input_size]` `f32` tensor.
pub fn eval_tensor(image: &DynamicImage, p: &Preprocess, device: &Device) -> Result<Tensor> {
    Ok(tta_tensor(image, p, Tta::None, device)?.squeeze(0)?)
}

/// Loads the image at `path` and applies the evaluation transform.
/// A file that cannot be decoded is an [`Error::Image`] naming it.
pub fn load_eval_tensor(path: &Path, p: &Preprocess, device: &Device) -> Result<Tensor> {
    let rgb = load_rgb(path)?;
    eval_tensor(&DynamicImage::ImageRgb8(rgb), p, device)
}

/// Test-time augmentation (`--tta` of `graft eval` and `graft predict`): the views of each image a model
/// classifies; the prediction is the mean of the views' softmax probabilities ([`Tta::mean_probs`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tta {
    /// One view: the evaluation transform's centre crop.
    #[default]
    None,
    /// Two views: the centre crop and its horizontal mirror.
    Flip,
    /// Ten views, torchvision's `TenCrop`: the four corner and the centre `input_size` crops of the image
    /// resized to the short side `floor(input_size / crop_pct)`, then the same five of its mirror image. With
    /// `crop_pct` 1 (no margin) the short side is `floor(input_size / 0.875)`, so that the corners differ.
    Crops,
}

/// The `crop_pct` [`Tta::Crops`] cuts its crops at when the preprocessing's is 1: timm's default.
pub const TEN_CROP_FALLBACK_CROP_PCT: f64 = 0.875;

impl Tta {
    /// Views per image: 1, 2 or 10.
    pub fn views(self) -> usize {
        match self {
            Tta::None => 1,
            Tta::Flip => 2,
            Tta::Crops => 10,
        }
    }

    /// The name `--tta` takes and JSON outputs print.
    pub fn name(self) -> &'static str {
        match self {
            Tta::None => "none",
            Tta::Flip => "flip",
            Tta::Crops => "crops",
        }
    }

    /// The pixels the views are cut from, which is what a loader caches: the evaluation crop
    /// ([`eval_pixels`]) for `none` and `flip`; for `crops` the whole image resized to the short side
    /// [`Tta::crops_short_side`].
    pub fn base_pixels(self, image: &RgbImage, p: &Preprocess) -> RgbImage {
        match self {
            Tta::None | Tta::Flip => eval_pixels(image, p),
            Tta::Crops => {
                resize_short_side(image, self.crops_short_side(p) as u32, p.interpolation)
            }
        }
    }

    /// The short side [`Tta::Crops`] resizes to: [`Preprocess::resize_size`], or with `crop_pct` 1 that of
    /// [`TEN_CROP_FALLBACK_CROP_PCT`].
    pub fn crops_short_side(self, p: &Preprocess) -> usize {
        if p.crop_pct < 1.0 {
            p.resize_size()
        } else {
            Preprocess {
                crop_pct: TEN_CROP_FALLBACK_CROP_PCT,
                ..p.clone()
            }
            .resize_size()
        }
    }

    /// Writes the views of `base` (from [`Tta::base_pixels`]) into `out`, one normalised CHW image of
    /// [`Preprocess::tensor_len`] values after the other, in the order the variants' docs give (for
    /// `crops` torchvision's: top-left, top-right, bottom-left, bottom-right, centre, then the same of the
    /// mirror image).
    pub fn views_into(self, base: &RgbImage, p: &Preprocess, out: &mut [f32]) {
        let len = p.tensor_len();
        assert_eq!(
            out.len(),
            self.views() * len,
            "output holds {self:?}'s views"
        );
        let outs = out.chunks_exact_mut(len);
        match self {
            Tta::None | Tta::Flip => {
                for (flip, o) in [false, true].into_iter().zip(outs) {
                    normalize_into(base, p, flip, o);
                }
            }
            Tta::Crops => {
                let s = p.input_size as u32;
                let mirror = image::imageops::flip_horizontal(base);
                let crops = five_crop(base, s).into_iter().chain(five_crop(&mirror, s));
                for (crop, o) in crops.zip(outs) {
                    normalize_into(&crop, p, false, o);
                }
            }
        }
    }

    /// The mean softmax probabilities `[N, K]` of logits `[N * views, K]` whose rows hold the views of
    /// each image together (as [`Tta::views_into`] and the loader lay them out). For `none` this is the
    /// softmax of the logits, bit for bit.
    pub fn mean_probs(self, logits: &Tensor) -> Result<Tensor> {
        let (rows, classes) = logits.dims2()?;
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let n = rows / self.views();
        Ok(probs.reshape((n, self.views(), classes))?.mean(1)?)
    }

    /// What evaluation metrics are computed from: the logits themselves for `none` (results exactly as
    /// without TTA); otherwise the log of [`Tta::mean_probs`], clamped below at [`MIN_TTA_PROB`], whose
    /// softmax is those probabilities and whose cross-entropy is their negative log-likelihood.
    pub fn scores(self, logits: &Tensor) -> Result<Tensor> {
        if self == Tta::None {
            return Ok(logits.clone());
        }
        Ok(self.mean_probs(logits)?.clamp(MIN_TTA_PROB, 1.0)?.log()?)
    }
}

/// The smallest averaged probability [`Tta::scores`] takes the log of, so a confident miss costs a finite
/// loss.
pub const MIN_TTA_PROB: f32 = 1e-12;

/// torchvision's `five_crop`: the `size` squares at the top-left, top-right, bottom-left and bottom-right
/// corners and the centre ([`center_crop`]). `image` must be at least `size` on both sides.
pub fn five_crop(image: &RgbImage, size: u32) -> [RgbImage; 5] {
    let (w, h) = image.dimensions();
    let crop = |left, top| image::imageops::crop_imm(image, left, top, size, size).to_image();
    [
        crop(0, 0),
        crop(w - size, 0),
        crop(0, h - size),
        crop(w - size, h - size),
        center_crop(image, size),
    ]
}

/// The [`Tta`] views of a decoded image as a `[views, channels, input_size, input_size]` `f32` tensor.
pub fn tta_tensor(
    image: &DynamicImage,
    p: &Preprocess,
    tta: Tta,
    device: &Device,
) -> Result<Tensor> {
    let base = match image {
        DynamicImage::ImageRgb8(rgb) => tta.base_pixels(rgb, p),
        other => tta.base_pixels(&other.to_rgb8(), p),
    };
    let mut data = vec![0f32; tta.views() * p.tensor_len()];
    tta.views_into(&base, p, &mut data);
    let s = p.input_size;
    Ok(Tensor::from_vec(
        data,
        (tta.views(), p.channels, s, s),
        device,
    )?)
}

/// Loads the image at `path` and makes its [`Tta`] views: what `graft predict` feeds a model. A file that
/// cannot be decoded is an [`Error::Image`] naming it.
pub fn load_tta_tensor(path: &Path, p: &Preprocess, tta: Tta, device: &Device) -> Result<Tensor> {
    tta_tensor(&DynamicImage::ImageRgb8(load_rgb(path)?), p, tta, device)
}

/// Training augmentation, timm's defaults: a random resized crop covering `scale` of the area with an
/// aspect ratio in `ratio` (drawn log-uniformly), a horizontal flip with probability `hflip`, an optional
/// automatic policy and colour jitter (in that order) on the pixels, and random erasing of the normalised
/// tensor with probability `erasing`. Every field has a default, so files written before a field existed
/// still read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Augment {
    pub scale: [f64; 2],
    pub ratio: [f64; 2],
    pub hflip: f64,
    pub color_jitter: Option<ColorJitter>,
    /// TrivialAugmentWide or RandAugment after the crop and flip; `None`: off.
    pub auto: Option<AutoAugment>,
    /// Probability of timm's `RandomErasing` (mode `pixel`) on the normalised tensor; 0: off.
    pub erasing: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: 0.5,
            color_jitter: None,
            auto: None,
            erasing: 0.0,
        }
    }
}

impl Augment {
    /// Checks ranges: `0 < scale.0 <= scale.1 <= 1`, `0 < ratio.0 <= ratio.1`, `hflip` and `erasing`
    /// probabilities, a RandAugment magnitude below 31.
    pub fn validate(&self) -> Result<()> {
        let [s0, s1] = self.scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err(Error::config(
                "augment.scale",
                format!("{:?} is not 0 < lo <= hi <= 1", self.scale),
            ));
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1) {
            return Err(Error::config(
                "augment.ratio",
                format!("{:?} is not 0 < lo <= hi", self.ratio),
            ));
        }
        if !(0.0..=1.0).contains(&self.hflip) {
            return Err(Error::config(
                "augment.hflip",
                format!("{} is not a probability", self.hflip),
            ));
        }
        if !(0.0..=1.0).contains(&self.erasing) {
            return Err(Error::config(
                "augment.erasing",
                format!("{} is not a probability", self.erasing),
            ));
        }
        if let Some(j) = &self.color_jitter {
            j.validate()?;
        }
        if let Some(a) = &self.auto {
            a.validate()?;
        }
        Ok(())
    }
}

/// torchvision's `ColorJitter`: brightness, contrast and saturation factors drawn from
/// `[max(0, 1 - x), 1 + x]`, a hue shift from `[-hue, hue]` (in turns, at most 0.5), applied in a random
/// order. Zero disables a component.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ColorJitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl ColorJitter {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(Error::config(
                    format!("color_jitter.{name}"),
                    format!("{v} is negative"),
                ));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return Err(Error::config(
                "color_jitter.hue",
                format!("{} is not in [0, 0.5]", self.hue),
            ));
        }
        Ok(())
    }
}

/// A rectangle of an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a box of random area and aspect ratio that
/// fits, then the centre crop clamped to the ratio range.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> CropBox {
    let area = width as f64 * height as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round() as i64;
        let h = (target_area / aspect).sqrt().round() as i64;
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let top = rng.random_range(0..=(height as i64 - h)) as u32;
            let left = rng.random_range(0..=(width as i64 - w)) as u32;
            return CropBox {
                left,
                top,
                width: w as u32,
                height: h as u32,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (
            width,
            ((width as f64 / ratio[0]).round() as u32).clamp(1, height),
        )
    } else if in_ratio > ratio[1] {
        (
            ((height as f64 * ratio[1]).round() as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        left: (width - w) / 2,
        top: (height - h) / 2,
        width: w,
        height: h,
    }
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

/// One augmented training image: random resized crop to `input_size`, maybe flipped, then the automatic
/// policy and the colour jitter when set, normalised into `out` (CHW), then maybe erased. Every draw comes
/// from `rng`, in that order; parts that are off draw nothing, so an `Augment` without `auto`, jitter and
/// erasing gives the same output for the same rng as before those existed.
pub fn augment_into(
    image: &RgbImage,
    p: &Preprocess,
    aug: &Augment,
    rng: &mut impl Rng,
    out: &mut [f32],
) {
    let (w, h) = image.dimensions();
    let b = random_resized_crop_box(w, h, aug.scale, aug.ratio, rng);
    let crop = image::imageops::crop_imm(image, b.left, b.top, b.width, b.height).to_image();
    let s = p.input_size as u32;
    let mut pixels = resize(&crop, s, s, p.interpolation);
    let mut flip = rng.random::<f64>() < aug.hflip;
    if let Some(auto) = &aug.auto {
        // The policy's geometric ops see the flipped image, as in torchvision's pipeline.
        if flip {
            image::imageops::flip_horizontal_in_place(&mut pixels);
            flip = false;
        }
        pixels = auto.apply(&pixels, rng);
    }
    if let Some(j) = &aug.color_jitter {
        let mut values: Vec<[f32; 3]> = pixels
            .pixels()
            .map(|px| px.0.map(|v| v as f32 / 255.0))
            .collect();
        jitter(&mut values, j, rng);
        pixels = RgbImage::from_fn(s, s, |x, y| {
            image::Rgb(
                values[(y * s + x) as usize].map(|v| (v * 255.0 + 0.5).clamp(0.0, 255.0) as u8),
            )
        });
    }
    normalize_into(&pixels, p, flip, out);
    if aug.erasing > 0.0 {
        random_erasing(out, p.channels, s as usize, aug.erasing, rng);
    }
}

/// A box of a CHW tensor, in pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EraseBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// timm's `RandomErasing(probability, mode='pixel')` with its defaults (area 2% to 1/3 of the image, aspect
/// ratio log-uniform in [0.3, 1/0.3], one box, up to 10 tries) on one normalised `[channels, size, size]`
/// tensor: with probability `probability`, a box of every channel is replaced by standard normal values.
/// Returns the box erased, if any. Draws as timm does: the probability, then per try the area and aspect,
/// then the top and left of a box that fits, then the values channel by channel, row by row.
pub fn random_erasing(
    out: &mut [f32],
    channels: usize,
    size: usize,
    probability: f64,
    rng: &mut impl Rng,
) -> Option<EraseBox> {
    assert_eq!(
        out.len(),
        channels * size * size,
        "a {channels}x{size}x{size} tensor"
    );
    if rng.random::<f64>() > probability {
        return None;
    }
    let area = (size * size) as f64;
    let (log_lo, log_hi) = (0.3f64.ln(), (1.0 / 0.3f64).ln());
    for _ in 0..10 {
        let target_area = uniform(rng, 0.02, 1.0 / 3.0) * area;
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let height = round_half_even((target_area * aspect).sqrt()) as usize;
        let width = round_half_even((target_area / aspect).sqrt()) as usize;
        if width < size && height < size {
            let top = rng.random_range(0..=size - height);
            let left = rng.random_range(0..=size - width);
            for c in 0..channels {
                for y in top..top + height {
                    let row = c * size * size + y * size;
                    for v in &mut out[row + left..row + left + width] {
                        *v = crate::rng::standard_normal(rng) as f32;
                    }
                }
            }
            return Some(EraseBox {
                top,
                left,
                height,
                width,
            });
        }
    }
    None
}

fn luma(p: &[f32; 3]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// Applies colour jitter to `[0, 1]` RGB pixels, in place.
fn jitter(pixels: &mut [[f32; 3]], j: &ColorJitter, rng: &mut impl Rng) {
    let mut order = [0usize, 1, 2, 3];
    rand::seq::SliceRandom::shuffle(&mut order[..], rng);
    let factor = |rng: &mut dyn rand::RngCore, x: f32| -> Option<f32> {
        (x > 0.0).then(|| rng.random_range((1.0 - x).max(0.0)..=(1.0 + x)))
    };
    let b = factor(rng, j.brightness);
    let c = factor(rng, j.contrast);
    let s = factor(rng, j.saturation);
    let hue = (j.hue > 0.0).then(|| rng.random_range(-j.hue..=j.hue));
    for op in order {
        match op {
            0 => {
                if let Some(b) = b {
                    pixels
                        .iter_mut()
                        .flatten()
                        .for_each(|v| *v = (*v * b).clamp(0.0, 1.0));
                }
            }
            1 => {
                if let Some(c) = c {
                    let mean = pixels.iter().map(luma).sum::<f32>() / pixels.len().max(1) as f32;
                    pixels
                        .iter_mut()
                        .flatten()
                        .for_each(|v| *v = (c * *v + (1.0 - c) * mean).clamp(0.0, 1.0));
                }
            }
            2 => {
                if let Some(s) = s {
                    for p in pixels.iter_mut() {
                        let l = luma(p);
                        p.iter_mut()
                            .for_each(|v| *v = (s * *v + (1.0 - s) * l).clamp(0.0, 1.0));
                    }
                }
            }
            _ => {
                if let Some(h) = hue {
                    pixels.iter_mut().for_each(|p| *p = shift_hue(*p, h));
                }
            }
        }
    }
}

fn shift_hue([r, g, b]: [f32; 3], shift: f32) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    if delta <= 0.0 {
        return [r, g, b];
    }
    let mut h = if max == r {
        ((g - b) / delta).rem_euclid(6.0)
    } else if max == g {
        (b - r) / delta + 2.0
    } else {
        (r - g) / delta + 4.0
    } / 6.0;
    h = (h + shift).rem_euclid(1.0);
    let (s, v) = (delta / max, max);
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as i32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn resize_size_is_the_floor_of_size_over_crop_pct() {
        let mut p = Preprocess::imagenet(224);
        assert_eq!(p.resize_size(), 256);
        p.crop_pct = 0.95;
        assert_eq!(p.resize_size(), 235);
        p.crop_pct = 1.0;
        assert_eq!(p.resize_size(), 224);
    }

    #[test]
    fn short_side_resize_truncates_the_long_side_like_torchvision() {
        let img = RgbImage::new(333, 250);
        assert_eq!(
            resize_short_side(&img, 256, Interpolation::Bilinear).dimensions(),
            (340, 256)
        );
        let tall = RgbImage::new(100, 301);
        assert_eq!(
            resize_short_side(&tall, 50, Interpolation::Bicubic).dimensions(),
            (50, 150)
        );
    }

    #[test]
    fn centre_crop_offsets_round_half_to_even() {
        // (7 - 4) / 2 = 1.5 rounds to 2; (5 - 4) / 2 = 0.5 rounds to 0
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let c = center_crop(&img, 4);
        assert_eq!(c.get_pixel(0, 0).0, [2, 0, 0]);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(-0.5), 0);
        assert_eq!(round_half_even(2.6), 3);
    }

    #[test]
    fn normalisation_maps_pixels_through_mean_and_std() {
        let p = Preprocess {
            input_size: 2,
            crop_pct: 1.0,
            interpolation: Interpolation::Nearest,
            mean: [0.5, 0.0, 1.0],
            std: [0.5, 1.0, 2.0],
            channels: 3,
        };
        let img = RgbImage::from_fn(2, 2, |x, _| {
            if x == 0 {
                image::Rgb([255, 0, 51])
            } else {
                image::Rgb([0, 255, 255])
            }
        });
        let mut out = vec![0f32; 12];
        normalize_into(&img, &p, false, &mut out);
        let expect = [
            1.0, -1.0, 1.0, -1.0, 0.0, 1.0, 0.0, 1.0, -0.4, 0.0, -0.4, 0.0,
        ];
        for (a, b) in out.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        normalize_into(&img, &p, true, &mut out);
        assert!(
            (out[0] + 1.0).abs() < 1e-6 && (out[1] - 1.0).abs() < 1e-6,
            "flip mirrors columns"
        );
    }

    #[test]
    fn random_crop_boxes_fit_and_respect_scale_and_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..500 {
            let b = random_resized_crop_box(320, 240, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(
                b.left + b.width <= 320 && b.top + b.height <= 240 && b.width > 0 && b.height > 0
            );
            let frac = (b.width * b.height) as f64 / (320.0 * 240.0);
            assert!(frac > 0.07 && frac <= 1.0, "{b:?}");
        }
        // An extreme image falls back to the centre crop clamped to the ratio range.
        let b = random_resized_crop_box(1000, 10, [0.9, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!((b.width, b.height), (13, 10));
        assert_eq!(b.left, (1000 - 13) / 2);
    }

    #[test]
    fn hue_shift_of_a_full_turn_changes_nothing_and_half_a_turn_gives_the_complement() {
        let px = [0.8, 0.2, 0.4];
        let same = shift_hue(px, 0.0);
        let half = shift_hue(px, 0.5);
        for c in 0..3 {
            assert!((same[c] - px[c]).abs() < 1e-6);
        }
        // the complement of (0.8, 0.2, 0.4) with the same max and min is (0.2, 0.8, 0.6)
        for (a, b) in half.iter().zip([0.2, 0.8, 0.6]) {
            assert!((a - b).abs() < 1e-5, "{half:?}");
        }
    }

    #[test]
    fn a_grey_input_is_one_channel_of_luma_that_keeps_grey_pixels_exact() {
        let p = Preprocess::unit(2, 1);
        let img = RgbImage::from_fn(2, 2, |x, y| {
            if (x, y) == (1, 1) {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([51, 51, 51])
            }
        });
        let t = eval_tensor(&DynamicImage::ImageRgb8(img), &p, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 2, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.2).abs() < 1e-6, "{v:?}");
        // Pure red: Pillow's L is round(255 * 0.299) = 76.
        assert!((v[3] - 76.0 / 255.0).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn preprocess_written_before_grey_inputs_reads_as_rgb() {
        let json = r#"{"input_size":224,"crop_pct":0.875,"interpolation":"bilinear","mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225]}"#;
        let p: Preprocess = serde_json::from_str(json).unwrap();
        assert_eq!(p, Preprocess::imagenet(224));
        let bad = Preprocess {
            channels: 2,
            ..Preprocess::imagenet(8)
        };
        assert!(bad.validate().unwrap_err().to_string().contains("channels"));
    }

    #[test]
    fn an_augment_written_before_policies_existed_reads_with_them_off() {
        let json = r#"{"scale":[0.08,1.0],"ratio":[0.75,1.3333333333333333],"hflip":0.5,"color_jitter":null}"#;
        let a: Augment = serde_json::from_str(json).unwrap();
        assert_eq!(a, Augment::default());
        assert_eq!((a.auto, a.erasing), (None, 0.0));
        let bad = Augment {
            erasing: 2.0,
            ..Augment::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("augment.erasing"));
        let bad_rand = Augment {
            auto: Some(AutoAugment::Rand {
                num_ops: 2,
                magnitude: 40,
            }),
            ..Augment::default()
        };
        assert!(bad_rand
            .validate()
            .unwrap_err()
            .to_string()
            .contains("magnitude"));
    }

    #[test]
    fn preprocess_round_trips_through_json_with_lowercase_interpolation() {
        let p = Preprocess {
            interpolation: Interpolation::Bicubic,
            ..Preprocess::imagenet(224)
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"bicubic\""), "{json}");
        assert_eq!(serde_json::from_str::<Preprocess>(&json).unwrap(), p);
    }
}
