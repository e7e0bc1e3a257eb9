//! Resizing 8-bit RGB images the way Pillow does, because torchvision and timm resize with Pillow and
//! pretrained weights expect its pixels.
//!
//! Like `PIL.Image.resize`, a resize is two separable passes (horizontal, then vertical), each output
//! sample a weighted sum of input samples under a filter centred at `(x + 0.5) * scale`, and the filter
//! is stretched by the scale when shrinking, so downsampling is antialiased. Bilinear is the triangle
//! filter, bicubic the cubic convolution with `a = -0.5`, nearest takes the pixel under
//! `floor((x + 0.5) * scale)`. Pillow rounds between the two passes to 8 bits, and so do we. Pillow
//! accumulates in fixed point and we in `f32`, so a sample may differ by one level.

use super::transform::Interpolation;
use image::RgbImage;

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

/// The filter taps of one output sample: the first input index and the normalised weights.
struct Taps {
    start: usize,
    weights: Vec<f32>,
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

/// Pillow's `precompute_coeffs`, in floating point.
fn taps(in_size: usize, out_size: usize, interpolation: Interpolation) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_support(interpolation) * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter_value(interpolation, (x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps {
                start: xmin,
                weights: weights.into_iter().map(|w| w as f32).collect(),
            }
        })
        .collect()
}

fn to_u8(v: f32) -> u8 {
    (v + 0.5).clamp(0.0, 255.0) as u8
}

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
        for (t, px) in taps.iter().zip(out_row.chunks_exact_mut(3)) {
            let (mut r, mut g, mut b) = (0f32, 0f32, 0f32);
            let pixels = &row[t.start * 3..(t.start + t.weights.len()) * 3];
            for (w, p) in t.weights.iter().zip(pixels.chunks_exact(3)) {
                r += w * p[0] as f32;
                g += w * p[1] as f32;
                b += w * p[2] as f32;
            }
            px[0] = to_u8(r);
            px[1] = to_u8(g);
            px[2] = to_u8(b);
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
    let mut acc = vec![0f32; stride];
    for (t, out_row) in taps.iter().zip(out.chunks_exact_mut(stride)) {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (k, &w) in t.weights.iter().enumerate() {
            let row = &src[(t.start + k) * stride..(t.start + k + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += w * p as f32;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = to_u8(a);
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
