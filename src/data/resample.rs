//! Resizing 8-bit RGB images the way Pillow does, because torchvision and timm resize with Pillow and
//! pretrained weights expect its pixels.
//!
//! Like `PIL.Image.resize`, a resize is two separable passes (horizontal, then vertical), each output
//! sample a weighted sum of input samples under a filter centred at `(x + 0.5) * scale`, and the filter
//! is stretched by the scale when shrinking, so downsampling is antialiased. Bilinear is the triangle
//! filter, bicubic the cubic convolution with `a = -0.5`, nearest takes the pixel under
//! `floor((x + 0.5) * scale)`. Weights are computed in `f64` and rounded to 22-bit fixed point, sums
//! are accumulated in `i32` and rounded to 8 bits after each pass, all exactly as Pillow's
//! `Resample.c` does, so the pixels are Pillow's to the bit.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// How pixels are resampled when an image is resized (Pillow's filters of the same names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    #[default]
    Bilinear,
    Bicubic,
    Nearest,
}

/// Resizes `image` to `width` x `height` with `interpolation`.
pub fn resize(image: &RgbImage, width: u32, height: u32, interpolation: Interpolation) -> RgbImage {
    let (w0, h0) = image.dimensions();
    assert!(
        w0 > 0 && h0 > 0 && width > 0 && height > 0,
        "resize of an empty image"
    );
    if (w0, h0) == (width, height) {
        return image.clone();
    }
    if interpolation == Interpolation::Nearest {
        return resize_nearest(image, width, height);
    }
    let horizontal = if w0 != width {
        resample_horizontal(image, width, interpolation)
    } else {
        image.clone()
    };
    if h0 != height {
        resample_vertical(&horizontal, height, interpolation)
    } else {
        horizontal
    }
}

fn resize_nearest(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w0, h0) = image.dimensions();
    let (sx, sy) = (w0 as f64 / width as f64, h0 as f64 / height as f64);
    let xs: Vec<usize> = (0..width)
        .map(|x| (((x as f64 + 0.5) * sx) as usize).min(w0 as usize - 1))
        .collect();
    let src = image.as_raw();
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        let yi = (((y as f64 + 0.5) * sy) as usize).min(h0 as usize - 1);
        let row = &src[yi * w0 as usize * 3..(yi + 1) * w0 as usize * 3];
        for &xi in &xs {
            out.extend_from_slice(&row[xi * 3..xi * 3 + 3]);
        }
    }
    RgbImage::from_raw(width, height, out).expect("buffer size matches")
}

/// Pillow's fixed-point precision for 8-bit images: weights are integers scaled by 2^22, so that the
/// sum of 255 * |weight| over all taps fits an `i32`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The filter taps of every output sample: `start[i]` is the first input index of output `i`, and
/// `weights[i * ksize..][..len[i]]` its fixed-point weights.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

fn filter_support(interpolation: Interpolation) -> f64 {
    match interpolation {
        Interpolation::Bilinear => 1.0,
        Interpolation::Bicubic => 2.0,
        Interpolation::Nearest => 0.0,
    }
}

fn filter_value(interpolation: Interpolation, x: f64) -> f64 {
    let x = x.abs();
    match interpolation {
        Interpolation::Bilinear => (1.0 - x).max(0.0),
        Interpolation::Bicubic => {
            const A: f64 = -0.5;
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
        Interpolation::Nearest => f64::from(u8::from(x < 0.5)),
    }
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, step for step, so the weights
/// are the same integers.
fn taps(in_size: usize, out_size: usize, interpolation: Interpolation) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_support(interpolation) * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut taps = Taps {
        start: Vec::with_capacity(out_size),
        len: Vec::with_capacity(out_size),
        ksize,
        weights: vec![0; out_size * ksize],
    };
    let one = f64::from(1u32 << PRECISION_BITS);
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut total = 0.0;
        for (x, w) in k[..n].iter_mut().enumerate() {
            *w = filter_value(
                interpolation,
                (x as f64 + xmin as f64 - center + 0.5) / filter_scale,
            );
            total += *w;
        }
        let out = &mut taps.weights[xx * ksize..xx * ksize + n];
        for (o, &w) in out.iter_mut().zip(&k[..n]) {
            let w = if total != 0.0 { w / total } else { w };
            *o = if w < 0.0 {
                (-0.5 + w * one) as i32
            } else {
                (0.5 + w * one) as i32
            };
        }
        taps.start.push(xmin);
        taps.len.push(n);
    }
    taps
}

/// Rounds a fixed-point sum (which started at one half) to a clamped byte, as Pillow's `clip8`.
#[inline]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

fn resample_horizontal(image: &RgbImage, width: u32, interpolation: Interpolation) -> RgbImage {
    let (w0, h0) = image.dimensions();
    let taps = taps(w0 as usize, width as usize, interpolation);
    let src = image.as_raw();
    let mut out = vec![0u8; width as usize * h0 as usize * 3];
    let in_stride = w0 as usize * 3;
    let out_stride = width as usize * 3;
    for (row, out_row) in src
        .chunks_exact(in_stride)
        .zip(out.chunks_exact_mut(out_stride))
    {
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (start, n) = (taps.start[xx], taps.len[xx]);
            let weights = &taps.weights[xx * taps.ksize..xx * taps.ksize + n];
            let pixels = &row[start * 3..(start + n) * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (&w, p) in weights.iter().zip(pixels.chunks_exact(3)) {
                r += p[0] as i32 * w;
                g += p[1] as i32 * w;
                b += p[2] as i32 * w;
            }
            px[0] = clip8(r);
            px[1] = clip8(g);
            px[2] = clip8(b);
        }
    }
    RgbImage::from_raw(width, h0, out).expect("buffer size matches")
}

fn resample_vertical(image: &RgbImage, height: u32, interpolation: Interpolation) -> RgbImage {
    let (w0, h0) = image.dimensions();
    let taps = taps(h0 as usize, height as usize, interpolation);
    let src = image.as_raw();
    let stride = w0 as usize * 3;
    let mut out = vec![0u8; stride * height as usize];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, n) = (taps.start[yy], taps.len[yy]);
        let weights = &taps.weights[yy * taps.ksize..yy * taps.ksize + n];
        acc.iter_mut().for_each(|a| *a = HALF);
        for (k, &w) in weights.iter().enumerate() {
            let row = &src[(start + k) * stride..(start + k + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage::from_raw(w0, height, out).expect("buffer size matches")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 90])
        })
    }

    #[test]
    fn a_constant_image_stays_constant_under_every_filter() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 200, 77]));
        for interp in [
            Interpolation::Bilinear,
            Interpolation::Bicubic,
            Interpolation::Nearest,
        ] {
            for (w, h) in [(11, 9), (80, 50), (37, 5)] {
                let out = resize(&img, w, h, interp);
                assert_eq!(out.dimensions(), (w, h));
                assert!(
                    out.pixels().all(|p| p.0 == [10, 200, 77]),
                    "{interp:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn halving_with_bilinear_averages_pixel_pairs() {
        // Pillow's bilinear at scale 2 has support 2 around centres 1, 3, ...: weights 1/4 3/4 3/4 1/4
        // over pixels 0..4 for output 1 (normalised), and 3/4 1/4 at the left border (after clipping).
        let img = RgbImage::from_fn(4, 1, |x, _| {
            image::Rgb([[0, 100, 200, 40][x as usize], 0, 0])
        });
        let out = resize(&img, 2, 1, Interpolation::Bilinear);
        // left: taps x=0,1,2 with weights 0.75,0.75,0.25 (triangle at distances .75,.25,... scaled)
        // computed independently: centre 1.0, support 2: xmin 0, xmax 3; w(x) = 1 - |x + .5 - 1| / 2
        let w = [0.75f32, 0.75, 0.25];
        let expect = (w[0] * 0.0 + w[1] * 100.0 + w[2] * 200.0) / (w[0] + w[1] + w[2]);
        assert_eq!(out.get_pixel(0, 0).0[0], (expect + 0.5) as u8);
    }

    #[test]
    fn nearest_picks_the_pixel_under_the_sample_centre() {
        let img = gradient(10, 4);
        let out = resize(&img, 5, 2, Interpolation::Nearest);
        assert_eq!(out.get_pixel(0, 0), img.get_pixel(1, 1));
        assert_eq!(out.get_pixel(4, 1), img.get_pixel(9, 3));
    }
}
