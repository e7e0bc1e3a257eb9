//! torchvision's `TrivialAugmentWide` and `RandAugment` (v0.2x) on 8-bit RGB images, as they run on PIL
//! images: the same op set, magnitude tables (`_augmentation_space`, 31 bins), random draws in the same order,
//! and each op computed as Pillow computes it (integer truncation, fixed-point affine maps, nearest
//! neighbour, fill 0), so an op gives the same bytes as `torchvision.transforms.autoaugment._apply_op`.
//!
//! Reference outputs made with Pillow: `scripts/augment-reference.py` ->
//! `tests/fixtures/augment-reference.json`, checked by `tests/data_transform.rs`.

use image::{Rgb, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Number of magnitude bins of both policies (torchvision's `num_magnitude_bins` default).
pub const MAGNITUDE_BINS: usize = 31;

/// An automatic augmentation policy, applied after the random resized crop and flip, before normalisation
/// (timm's order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoAugment {
    /// `TrivialAugmentWide()`: one op of the 14, a magnitude bin drawn uniformly from the wide ranges.
    TrivialWide,
    /// `RandAugment(num_ops, magnitude)`: `num_ops` ops drawn with replacement, each at bin `magnitude`
    /// (of 31) of the RandAugment ranges.
    Rand {
        #[serde(default = "default_num_ops")]
        num_ops: usize,
        #[serde(default = "default_magnitude")]
        magnitude: usize,
    },
}

fn default_num_ops() -> usize {
    2
}

fn default_magnitude() -> usize {
    9
}

impl AutoAugment {
    /// torchvision's `RandAugment()` defaults: two ops at magnitude 9.
    pub fn rand() -> Self {
        AutoAugment::Rand {
            num_ops: default_num_ops(),
            magnitude: default_magnitude(),
        }
    }

    /// Checks that a RandAugment magnitude indexes a bin and that it applies at least one op.
    pub fn validate(&self) -> crate::Result<()> {
        if let AutoAugment::Rand { num_ops, magnitude } = *self {
            if num_ops == 0 {
                return Err(crate::Error::config(
                    "augment.auto.rand.num_ops",
                    "must be at least 1",
                ));
            }
            if magnitude >= MAGNITUDE_BINS {
                return Err(crate::Error::config(
                    "augment.auto.rand.magnitude",
                    format!("{magnitude} is not a bin in 0..{MAGNITUDE_BINS}"),
                ));
            }
        }
        Ok(())
    }

    /// Applies the policy to `image`, every draw from `rng`, in torchvision's order (op index, then the
    /// magnitude bin for TrivialAugmentWide, then the sign of a signed op).
    pub fn apply(&self, image: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let size = image.dimensions();
        match *self {
            AutoAugment::TrivialWide => {
                let op = OPS[rng.random_range(0..OPS.len())];
                let bin = if op.has_magnitude() {
                    rng.random_range(0..MAGNITUDE_BINS)
                } else {
                    0
                };
                let m = signed(op, magnitude(Space::Wide, op, bin, size), rng);
                apply_op(image, op, m)
            }
            AutoAugment::Rand {
                num_ops,
                magnitude: bin,
            } => {
                let mut img = image.clone();
                for _ in 0..num_ops {
                    let op = OPS[rng.random_range(0..OPS.len())];
                    let m = signed(op, magnitude(Space::Rand, op, bin, img.dimensions()), rng);
                    img = apply_op(&img, op, m);
                }
                img
            }
        }
    }
}

fn signed(op: Op, m: f64, rng: &mut impl Rng) -> f64 {
    if op.signed() && rng.random_range(0..2) == 1 {
        -m
    } else {
        m
    }
}

/// The ops of both policies, in the order of torchvision's `_augmentation_space` (the op index draws from).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

pub const OPS: [Op; 14] = [
    Op::Identity,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
];

impl Op {
    /// Whether the op has a table of magnitudes (Identity, AutoContrast and Equalize have none).
    pub fn has_magnitude(self) -> bool {
        !matches!(self, Op::Identity | Op::AutoContrast | Op::Equalize)
    }

    /// Whether its magnitude gets a random sign.
    pub fn signed(self) -> bool {
        matches!(
            self,
            Op::ShearX
                | Op::ShearY
                | Op::TranslateX
                | Op::TranslateY
                | Op::Rotate
                | Op::Brightness
                | Op::Color
                | Op::Contrast
                | Op::Sharpness
        )
    }
}

/// Which `_augmentation_space`: TrivialAugmentWide's wide ranges or RandAugment's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Wide,
    Rand,
}

/// Value `i` of `torch.linspace(start, end, steps)` in float32, as torch's CPU kernel computes it: from the
/// start below the halfway index, from the end after it.
fn linspace_f32(start: f32, end: f32, steps: usize, i: usize) -> f32 {
    let step = (end - start) / (steps - 1) as f32;
    if i < steps / 2 {
        start + step * i as f32
    } else {
        end - step * (steps - i - 1) as f32
    }
}

/// Bin `bin` of the op's magnitude table (unsigned), for an image of `(width, height)` (RandAugment's
/// translations scale with it); 0 for ops without one. Floats are torch's float32 table values.
pub fn magnitude(space: Space, op: Op, bin: usize, (width, height): (u32, u32)) -> f64 {
    let n = MAGNITUDE_BINS;
    let wide = space == Space::Wide;
    let lin = |end: f64| linspace_f32(0.0, end as f32, n, bin) as f64;
    match op {
        Op::Identity | Op::AutoContrast | Op::Equalize => 0.0,
        Op::ShearX | Op::ShearY => lin(if wide { 0.99 } else { 0.3 }),
        Op::TranslateX => lin(if wide {
            32.0
        } else {
            150.0 / 331.0 * width as f64
        }),
        Op::TranslateY => lin(if wide {
            32.0
        } else {
            150.0 / 331.0 * height as f64
        }),
        Op::Rotate => lin(if wide { 135.0 } else { 30.0 }),
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => {
            lin(if wide { 0.99 } else { 0.9 })
        }
        Op::Posterize => {
            // 8 - (arange(n) / ((n - 1) / k)).round(): float32 division, round half to even
            let div = ((n - 1) as f64 / if wide { 6.0 } else { 4.0 }) as f32;
            8.0 - (bin as f32 / div).round_ties_even() as f64
        }
        Op::Solarize => linspace_f32(255.0, 0.0, n, bin) as f64,
    }
}

/// torchvision's `_apply_op` on a PIL image: `magnitude` is the signed value from the table.
pub fn apply_op(image: &RgbImage, op: Op, magnitude: f64) -> RgbImage {
    let (w, h) = image.dimensions();
    match op {
        Op::Identity => image.clone(),
        Op::ShearX => {
            let shear = magnitude.atan().to_degrees();
            affine_nearest(
                image,
                inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, [shear, 0.0]),
            )
        }
        Op::ShearY => {
            let shear = magnitude.atan().to_degrees();
            affine_nearest(
                image,
                inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, [0.0, shear]),
            )
        }
        Op::TranslateX | Op::TranslateY => {
            // int(magnitude): truncation toward zero
            let t = magnitude.trunc();
            let translate = if op == Op::TranslateX {
                [t, 0.0]
            } else {
                [0.0, t]
            };
            let center = [w as f64 * 0.5, h as f64 * 0.5];
            affine_nearest(
                image,
                inverse_affine_matrix(center, 0.0, translate, 1.0, [0.0, 0.0]),
            )
        }
        Op::Rotate => rotate(image, magnitude),
        Op::Brightness => blend(&RgbImage::new(w, h), image, 1.0 + magnitude),
        Op::Color => blend(&grey_rgb(image), image, 1.0 + magnitude),
        Op::Contrast => {
            let l = luma(image);
            let sum: f64 = l.iter().map(|&v| v as f64).sum();
            let mean = (sum / l.len().max(1) as f64 + 0.5) as u8;
            let degenerate = RgbImage::from_pixel(w, h, Rgb([mean; 3]));
            blend(&degenerate, image, 1.0 + magnitude)
        }
        Op::Sharpness => blend(&smooth(image), image, 1.0 + magnitude),
        Op::Posterize => {
            let bits = magnitude as i32;
            let mask = !((1u32 << (8 - bits.clamp(0, 8))) - 1) as u8;
            map_lut(image, &[std::array::from_fn(|i| i as u8 & mask); 3])
        }
        Op::Solarize => {
            let lut = std::array::from_fn(|i| {
                if (i as f64) < magnitude {
                    i as u8
                } else {
                    255 - i as u8
                }
            });
            map_lut(image, &[lut; 3])
        }
        Op::AutoContrast => {
            let luts = histograms(image).map(|h| {
                let lo = h.iter().position(|&c| c > 0);
                let hi = h.iter().rposition(|&c| c > 0);
                match (lo, hi) {
                    (Some(lo), Some(hi)) if hi > lo => {
                        let scale = 255.0 / (hi - lo) as f64;
                        let offset = -(lo as f64) * scale;
                        std::array::from_fn(|i| {
                            // Python's int(): toward zero, then clamped
                            ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8
                        })
                    }
                    _ => std::array::from_fn(|i| i as u8),
                }
            });
            map_lut(image, &luts)
        }
        Op::Equalize => {
            let luts = histograms(image).map(|h| {
                let used: Vec<u64> = h.iter().copied().filter(|&c| c > 0).collect();
                let identity = std::array::from_fn(|i| i as u8);
                if used.len() <= 1 {
                    return identity;
                }
                let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 255;
                if step == 0 {
                    return identity;
                }
                let mut n = step / 2;
                std::array::from_fn(|i| {
                    let v = (n / step).min(255) as u8;
                    n += h[i];
                    v
                })
            });
            map_lut(image, &luts)
        }
    }
}

/// torchvision's `_get_inverse_affine_matrix`: the output-to-input map of a rotation by `angle` degrees,
/// scale and shear (degrees) about `center`, then a translation; Pillow's `Image.AFFINE` data.
pub fn inverse_affine_matrix(
    center: [f64; 2],
    angle: f64,
    translate: [f64; 2],
    scale: f64,
    shear: [f64; 2],
) -> [f64; 6] {
    let rot = angle.to_radians();
    let (sx, sy) = (shear[0].to_radians(), shear[1].to_radians());
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0].map(|x| x / scale);
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

/// Pillow's `Image.rotate(angle, NEAREST, expand=False, fillcolor=0)`: counter-clockwise degrees about the
/// centre, with its exact fast paths for multiples of 90 degrees.
pub fn rotate(image: &RgbImage, angle: f64) -> RgbImage {
    let (w, h) = image.dimensions();
    let angle = angle.rem_euclid(360.0);
    if angle == 0.0 {
        return image.clone();
    }
    if angle == 180.0 {
        return image::imageops::rotate180(image);
    }
    if w == h && angle == 90.0 {
        return image::imageops::rotate270(image); // Pillow's ROTATE_90 is counter-clockwise
    }
    if w == h && angle == 270.0 {
        return image::imageops::rotate90(image);
    }
    let r = -angle.to_radians();
    let mut m = [
        round15(r.cos()),
        round15(r.sin()),
        0.0,
        round15(-r.sin()),
        round15(r.cos()),
        0.0,
    ];
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    // Pillow: m[2], m[5] = transform(-cx, -cy, m) = a x + b y + c (float addition commutes, so this is exact)
    m[2] += m[0] * -cx + m[1] * -cy;
    m[5] += m[3] * -cx + m[4] * -cy;
    m[2] += cx;
    m[5] += cy;
    affine_nearest(image, m)
}

/// Python's `round(x, 15)`: correctly rounded to 15 decimals (Rust's formatting rounds the exact value).
fn round15(x: f64) -> f64 {
    format!("{x:.15}")
        .parse()
        .expect("a formatted float parses")
}

/// Pillow's `ImagingTransformAffine` with nearest neighbour and fill 0: output pixel `(x, y)` samples input
/// `(a0 x + a1 y + a2, a3 x + a4 y + a5)` at pixel centres, with its scale-only path, its 16.16 fixed-point
/// path (every image graft handles) and its floating-point path, each stepping as Pillow steps.
pub fn affine_nearest(image: &RgbImage, a: [f64; 6]) -> RgbImage {
    let (w, h) = image.dimensions();
    let (wi, hi) = (w as i64, h as i64);
    let mut out = RgbImage::new(w, h);
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    if a[1] == 0.0 && a[3] == 0.0 {
        // ImagingScaleAffine
        let mut xo = a[2] + a[0] * 0.5;
        let mut yo = a[5] + a[4] * 0.5;
        let xin: Vec<i64> = (0..w)
            .map(|_| {
                let v = coord(xo);
                xo += a[0];
                v
            })
            .collect();
        for y in 0..h {
            let yi = coord(yo);
            if (0..hi).contains(&yi) {
                for x in 0..w {
                    let xi = xin[x as usize];
                    if (0..wi).contains(&xi) {
                        out.put_pixel(x, y, *image.get_pixel(xi as u32, yi as u32));
                    }
                }
            }
            yo += a[4];
        }
        return out;
    }
    let fits = |x: f64, y: f64| {
        (x * a[0] + y * a[1] + a[2]).abs() < 32768.0 && (x * a[3] + y * a[4] + a[5]).abs() < 32768.0
    };
    let (fw, fh) = (w as f64, h as f64);
    if fits(0.0, 0.0) && fits(fw, fh) && fits(0.0, fh) && fits(fw, 0.0) {
        // affine_fixed: FIX(v) = FLOOR(v * 65536 + 0.5), xin = xx >> 16
        let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
        let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
        let mut a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
        let mut a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
        for y in 0..h {
            let (mut xx, mut yy) = (a2, a5);
            for x in 0..w {
                let (xi, yi) = (xx >> 16, yy >> 16);
                if (0..wi).contains(&xi) && (0..hi).contains(&yi) {
                    out.put_pixel(x, y, *image.get_pixel(xi as u32, yi as u32));
                }
                xx += a0;
                yy += a3;
            }
            a2 += a1;
            a5 += a4;
        }
        return out;
    }
    let mut xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
    let mut yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
    for y in 0..h {
        let (mut xx, mut yy) = (xo, yo);
        for x in 0..w {
            let (xi, yi) = (coord(xx), coord(yy));
            if (0..wi).contains(&xi) && (0..hi).contains(&yi) {
                out.put_pixel(x, y, *image.get_pixel(xi as u32, yi as u32));
            }
            xx += a[0];
            yy += a[3];
        }
        xo += a[1];
        yo += a[4];
    }
    out
}

/// Pillow's `Image.blend(degenerate, image, factor)`, what every `ImageEnhance` class does: float32
/// `d + factor * (i - d)`, truncated, clamped when extrapolating.
pub fn blend(degenerate: &RgbImage, image: &RgbImage, factor: f64) -> RgbImage {
    let alpha = factor as f32;
    if alpha == 0.0 {
        return degenerate.clone();
    }
    if alpha == 1.0 {
        return image.clone();
    }
    let mut out = image.clone();
    for (o, (&d, &i)) in out
        .iter_mut()
        .zip(degenerate.as_raw().iter().zip(image.as_raw()))
    {
        let t = d as f32 + alpha * (i as i32 - d as i32) as f32;
        *o = if t <= 0.0 {
            0
        } else if t >= 255.0 {
            255
        } else {
            t as u8
        };
    }
    out
}

/// Pillow's `convert("L")`: ITU-R 601-2 luma in 16.16 fixed point.
fn luma(image: &RgbImage) -> Vec<u8> {
    image
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// `convert("L").convert("RGB")`: `ImageEnhance.Color`'s degenerate image.
fn grey_rgb(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let l = luma(image);
    RgbImage::from_fn(w, h, |x, y| Rgb([l[(y * w + x) as usize]; 3]))
}

/// Pillow's `ImageFilter.SMOOTH` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13, float32 sums plus 0.5,
/// truncated) with the border pixels copied: `ImageEnhance.Sharpness`'s degenerate image. An image smaller
/// than the kernel comes back unchanged, as in Pillow.
fn smooth(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let mut out = image.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let (k0, k1) = (1.0f32 / 13.0, 5.0f32 / 13.0);
    let px = |x: u32, y: u32, c: usize| image.get_pixel(x, y).0[c] as f32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let mut v = [0u8; 3];
            for (c, vc) in v.iter_mut().enumerate() {
                // Pillow sums the row below, the row itself, then the row above, each left to right.
                let row = |yy: u32, mid: f32| {
                    px(x - 1, yy, c) * k0 + px(x, yy, c) * mid + px(x + 1, yy, c) * k0
                };
                let mut ss = 0.5f32;
                ss += row(y + 1, k0);
                ss += row(y, k1);
                ss += row(y - 1, k0);
                *vc = ss.clamp(0.0, 255.0) as u8;
            }
            out.put_pixel(x, y, Rgb(v));
        }
    }
    out
}

fn histograms(image: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in image.pixels() {
        for c in 0..3 {
            h[c][p.0[c] as usize] += 1;
        }
    }
    h
}

fn map_lut(image: &RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = image.clone();
    for p in out.pixels_mut() {
        for c in 0..3 {
            p.0[c] = luts[c][p.0[c] as usize];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn magnitude_tables_hit_the_documented_ends() {
        let s = (224, 224);
        assert_eq!(magnitude(Space::Wide, Op::Rotate, 30, s), 135.0);
        assert_eq!(magnitude(Space::Wide, Op::TranslateX, 30, s), 32.0);
        assert_eq!(magnitude(Space::Wide, Op::Posterize, 0, s), 8.0);
        assert_eq!(magnitude(Space::Wide, Op::Posterize, 30, s), 2.0);
        assert_eq!(magnitude(Space::Rand, Op::Posterize, 30, s), 4.0);
        assert_eq!(magnitude(Space::Wide, Op::Solarize, 0, s), 255.0);
        assert_eq!(magnitude(Space::Wide, Op::Solarize, 30, s), 0.0);
        assert_eq!(magnitude(Space::Rand, Op::Rotate, 9, s), 9.0);
        let t = magnitude(Space::Rand, Op::TranslateY, 30, (224, 331));
        assert!((t - 150.0).abs() < 1e-4, "{t}");
        assert_eq!(magnitude(Space::Wide, Op::Equalize, 5, s), 0.0);
    }

    #[test]
    fn round15_rounds_like_python() {
        // math.cos(-math.radians(90)) = 6.123e-17, round(_, 15) = 0.0
        assert_eq!(round15((-(90f64).to_radians()).cos()), 0.0);
        assert_eq!(round15(0.1234567890123456), 0.123456789012346);
    }

    #[test]
    fn policies_are_deterministic_in_the_rng_and_keep_the_size() {
        let img = RgbImage::from_fn(12, 10, |x, y| Rgb([(x * 20) as u8, (y * 25) as u8, 90]));
        for policy in [AutoAugment::TrivialWide, AutoAugment::rand()] {
            for seed in 0..20 {
                let a = policy.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed));
                let b = policy.apply(&img, &mut ChaCha8Rng::seed_from_u64(seed));
                assert_eq!(a, b);
                assert_eq!(a.dimensions(), (12, 10));
            }
        }
    }

    #[test]
    fn rand_augment_checks_its_magnitude_and_op_count() {
        assert!(AutoAugment::rand().validate().is_ok());
        let bad = AutoAugment::Rand {
            num_ops: 2,
            magnitude: 31,
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("magnitude"));
        let none = AutoAugment::Rand {
            num_ops: 0,
            magnitude: 9,
        };
        assert!(none.validate().unwrap_err().to_string().contains("num_ops"));
    }

    #[test]
    fn policies_read_from_json_with_rand_defaults() {
        let t: AutoAugment = serde_json::from_str(r#""trivial_wide""#).unwrap();
        assert_eq!(t, AutoAugment::TrivialWide);
        let r: AutoAugment = serde_json::from_str(r#"{"rand":{}}"#).unwrap();
        assert_eq!(r, AutoAugment::rand());
        let json = serde_json::to_string(&AutoAugment::rand()).unwrap();
        assert_eq!(serde_json::from_str::<AutoAugment>(&json).unwrap(), r);
    }
}
