//! Mixup and CutMix, as timm's `Mixup` does them in its default `batch` mode: one mixing weight per batch, each
//! image mixed with its mirror in the batch (`x.flip(0)`), and the loss mixed with the same weight (which for
//! cross-entropy equals timm's mixed soft targets: `lam * CE(y) + (1 - lam) * CE(y.flip)`).
//!
//! With both on, each batch is CutMix with probability `switch_prob` (0.5) and mixup otherwise. CutMix's
//! weight is corrected to the area of the box actually pasted (timm's `correct_lam`). The draws come from a
//! generator seeded by (run seed, epoch, batch position), so a resumed run mixes as an uninterrupted one.

use crate::rng::{mix, seeded};
use crate::{Error, Result};
use candle_core::Tensor;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How batches are mixed: the Beta distributions' alphas (0: off), timm's defaults when on being 0.8 and 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
}

impl MixConfig {
    pub fn is_on(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }

    pub fn validate(&self) -> Result<()> {
        for (flag, a) in [
            ("--mixup", self.mixup_alpha),
            ("--cutmix", self.cutmix_alpha),
        ] {
            if !(a >= 0.0 && a.is_finite()) {
                return Err(Error::config(
                    flag,
                    format!("the Beta distribution's alpha must be >= 0 (0: off), got {a}"),
                ));
            }
        }
        Ok(())
    }

    /// The mixing of the batch at `batch` of `epoch` for images of `h x w` pixels.
    pub fn draw(&self, seed: u64, epoch: usize, batch: usize, h: usize, w: usize) -> Mixing {
        let mut rng = seeded(mix(seed
            ^ mix(0x6d69_7875_7000
                ^ mix(epoch as u64)
                ^ mix(batch as u64).rotate_left(17))));
        let cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.random::<f64>() < 0.5,
            (false, true) => true,
            (true, false) => false,
            (false, false) => return Mixing::None,
        };
        if cutmix {
            let lam = beta(&mut rng, self.cutmix_alpha);
            let (y0, y1, x0, x1) = rand_bbox(&mut rng, h, w, lam);
            let lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
            Mixing::CutMix {
                lam,
                rows: (y0, y1),
                cols: (x0, x1),
            }
        } else {
            Mixing::Mixup {
                lam: beta(&mut rng, self.mixup_alpha),
            }
        }
    }
}

/// One batch's mixing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mixing {
    None,
    /// `lam * x + (1 - lam) * x.flip(0)`.
    Mixup {
        lam: f64,
    },
    /// The box `rows x cols` (half-open) pasted from `x.flip(0)`; `lam` is the share of pixels kept.
    CutMix {
        lam: f64,
        rows: (usize, usize),
        cols: (usize, usize),
    },
}

impl Mixing {
    /// The weight of each image's own label.
    pub fn lam(&self) -> f64 {
        match *self {
            Mixing::None => 1.0,
            Mixing::Mixup { lam } | Mixing::CutMix { lam, .. } => lam,
        }
    }

    /// The mixed images of a `[N, C, H, W]` batch.
    pub fn images(&self, x: &Tensor) -> Result<Tensor> {
        let flipped = || flip0(x);
        Ok(match *self {
            Mixing::None => x.clone(),
            Mixing::Mixup { lam } => ((x * lam)? + (flipped()? * (1.0 - lam))?)?,
            Mixing::CutMix { rows, cols, .. } => {
                let (_, _, h, w) = x.dims4()?;
                let mask: Vec<f32> = (0..h * w)
                    .map(|i| {
                        let (r, c) = (i / w, i % w);
                        let inside = (rows.0..rows.1).contains(&r) && (cols.0..cols.1).contains(&c);
                        if inside {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
                let keep = mask.affine(-1.0, 1.0)?;
                (x.broadcast_mul(&keep)? + flipped()?.broadcast_mul(&mask)?)?
            }
        })
    }

    /// The loss of mixed images: `lam * loss(y) + (1 - lam) * loss(y.flip(0))`.
    pub fn loss(
        &self,
        labels: &Tensor,
        loss: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let own = loss(labels)?;
        let lam = self.lam();
        if lam >= 1.0 {
            return Ok(own);
        }
        Ok(((own * lam)? + (loss(&flip0(labels)?)? * (1.0 - lam))?)?)
    }

    /// The labels training accuracy is counted against: each image's dominant label.
    pub fn dominant_labels(&self, labels: &Tensor) -> Result<Tensor> {
        if self.lam() >= 0.5 {
            Ok(labels.clone())
        } else {
            flip0(labels)
        }
    }
}

/// `x.flip(0)`.
fn flip0(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let idx = Tensor::from_vec((0..n as u32).rev().collect::<Vec<_>>(), n, x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

/// timm's `rand_bbox` (no margin): a box of `sqrt(1 - lam)` of each side centred at a uniform pixel, clipped.
fn rand_bbox(rng: &mut impl Rng, h: usize, w: usize, lam: f64) -> (usize, usize, usize, usize) {
    let cut = (1.0 - lam).sqrt();
    let (ch, cw) = ((h as f64 * cut) as i64, (w as f64 * cut) as i64);
    let cy = rng.random_range(0..h.max(1)) as i64;
    let cx = rng.random_range(0..w.max(1)) as i64;
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    (
        clip(cy - ch / 2, h),
        clip(cy + ch / 2, h),
        clip(cx - cw / 2, w),
        clip(cx + cw / 2, w),
    )
}

/// A draw of `Beta(a, a)`, from two gamma draws.
fn beta(rng: &mut impl Rng, a: f64) -> f64 {
    let (x, y) = (gamma(rng, a), gamma(rng, a));
    if x + y > 0.0 {
        x / (x + y)
    } else {
        0.5
    }
}

/// Marsaglia and Tsang's gamma sampler (shape `a`, scale 1); shapes below 1 by the `U^(1/a)` boost.
fn gamma(rng: &mut impl Rng, a: f64) -> f64 {
    if a < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, a + 1.0) * u.powf(1.0 / a);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = normal(rng);
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>();
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn beta_draws_have_the_beta_mean_and_variance() {
        let mut rng = seeded(1);
        for a in [0.4, 0.8, 1.0, 2.0] {
            let n = 20_000;
            let xs: Vec<f64> = (0..n).map(|_| beta(&mut rng, a)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let want_var = 1.0 / (4.0 * (2.0 * a + 1.0));
            assert!((mean - 0.5).abs() < 0.01, "a {a}: mean {mean}");
            assert!(
                (var - want_var).abs() < 0.01,
                "a {a}: var {var} vs {want_var}"
            );
        }
    }

    #[test]
    fn cutmix_pastes_the_mirror_images_box_and_weighs_by_its_area() {
        let x = Tensor::arange(0f32, 2.0 * 16.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 4, 4))
            .unwrap();
        let m = Mixing::CutMix {
            lam: 0.75,
            rows: (0, 2),
            cols: (1, 3),
        };
        let v = m
            .images(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Image 0, pixel (0, 1) comes from image 1; pixel (3, 3) is its own.
        assert_eq!(v[1], 16.0 + 1.0);
        assert_eq!(v[15], 15.0);
        assert_eq!(v[16 + 6], 6.0);
        let cfg = MixConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 1.0,
        };
        for b in 0..20 {
            if let Mixing::CutMix { lam, rows, cols } = cfg.draw(7, 0, b, 32, 32) {
                let area = (rows.1 - rows.0) * (cols.1 - cols.0);
                assert!((lam - (1.0 - area as f64 / 1024.0)).abs() < 1e-12);
            } else {
                panic!("cutmix only");
            }
        }
        assert_eq!(cfg.draw(7, 3, 5, 32, 32), cfg.draw(7, 3, 5, 32, 32));
    }

    #[test]
    fn mixed_loss_weighs_both_labels() {
        let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        let m = Mixing::Mixup { lam: 0.3 };
        let loss = m
            .loss(&y, |t| Ok(t.to_dtype(DType::F64)?.sum_all()?))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((loss - 3.0).abs() < 1e-12);
        let d = m.dominant_labels(&y).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(d, vec![2, 1, 0]);
    }
}
