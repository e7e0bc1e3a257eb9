//! Stride-1 dense convolution as a sum of shifted GEMMs, one image at a time, with no column matrix.
//!
//! Zero-pad the image into `[C, HP, WP]` (`HP = H + 2p`, pitch `WP = W + 2p`). Filter tap `(ky, kx)`
//! sees, for output pixel `(oy, ox)`, the padded pixel at flat offset `(oy + ky) * WP + ox + kx`: the
//! output pixel's own offset in a `WP`-pitched grid plus the constant `ky * WP + kx`. So one tap's share of
//! the output is the GEMM `W_tap [O, C] x Xpad[:, shift..][C, n]` over the first
//! `n = (OH - 1) * WP + OW` pitched positions, and the convolution is one such GEMM per tap, accumulated
//! into a pitched output `[O, OH, WP]`. The `WP - OW` columns past each row's end are junk (their taps wrap
//! into the next row) and are dropped when the output is laid out as `[O, OH, OW]`.
//!
//! The backward passes are the same GEMMs transposed, on `dY` laid out in the pitched grid with zeros in
//! the junk columns (so they contribute nothing): the filter gradient of a tap is `dYp x Xpad[:, shift..]^T`,
//! written straight into `dW[:, :, ky, kx]`, and the input gradient adds `W_tap^T x dYp` into the padded
//! image at the tap's shift.
//!
//! Against [`super::im2col`], this never writes and reads back a column matrix `K * K` times the size of
//! the input, which on this 2-core machine cost more than the GEMM itself on ResNet's first stage. The
//! price is the junk columns (`(WP - OW) / OW` more work) and packing the filter once per image and tap,
//! both small only when the image is large: hence the thresholds in [`super::conv::choose`]. Stand-alone timings of one 3x3 convolution
//! of ResNet-18, batch 16, 2 threads (ms, im2col -> shifted): 64 channels at 32x32, forward 27 -> 7,
//! backward 27 -> 16; at 56x56, forward 70 -> 23, backward 134 -> 46; 128 channels at 16x16, about equal;
//! 256 channels at 8x8, backward 16 -> 19; 512 channels at 4x4, backward 40 -> 55.

use super::common::{gemm_into, image_chunks, inner_parallelism, Epilogue, Geom, View};
use super::par::par_zeroed;
use candle_core::{DType, WithDType};
use rayon::prelude::*;

/// Whether [`forward`], [`filter_grad`] and [`input_grad`] can compute this convolution at all: stride 1,
/// in a dtype the GEMM crate computes natively. Where they are also the fastest is
/// [`super::conv::choose`]'s to say.
pub(super) fn can_run(g: Geom, dtype: DType) -> bool {
    g.stride == 1 && matches!(dtype, DType::F32 | DType::F64)
}

/// The padded, pitched geometry of one image.
#[derive(Clone, Copy)]
struct Pitch {
    g: Geom,
    hp: usize,
    wp: usize,
    oh: usize,
    ow: usize,
    /// Pitched output positions each tap's GEMM covers: `(OH - 1) * WP + OW`.
    n: usize,
}

impl Pitch {
    fn new(g: Geom) -> Self {
        let (oh, ow) = g.out_hw();
        let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
        Self {
            g,
            hp,
            wp,
            oh,
            ow,
            n: (oh - 1) * wp + ow,
        }
    }

    fn taps(&self) -> usize {
        self.g.kh * self.g.kw
    }

    /// Values per channel of the padded image.
    fn padded_plane(&self) -> usize {
        self.hp * self.wp
    }

    /// Values per channel of the pitched output.
    fn pitched_plane(&self) -> usize {
        self.oh * self.wp
    }

    /// Whether the input needs a padded copy (else the image itself is the padded image).
    fn padded(&self) -> bool {
        self.g.padding > 0
    }

    /// Whether the output has junk columns (else the pitched output is the output itself).
    fn pitched(&self) -> bool {
        self.wp != self.ow
    }

    /// Flat offset of `tap` in the padded image.
    fn shift(&self, tap: usize) -> usize {
        (tap / self.g.kw) * self.wp + tap % self.g.kw
    }

    /// Copies `img` `[C, H, W]` into the interior of `padded` `[C, HP, WP]`; the border is left as it is
    /// (zero, written once).
    fn pad<T: WithDType>(&self, img: &[T], padded: &mut [T]) {
        let (g, p) = (self.g, self.g.padding);
        for (src, dst) in img
            .chunks_exact(g.h * g.w)
            .zip(padded.chunks_exact_mut(self.padded_plane()))
        {
            for (y, row) in src.chunks_exact(g.w).enumerate() {
                dst[(y + p) * self.wp + p..][..g.w].copy_from_slice(row);
            }
        }
    }

    /// The interior of `padded` `[C, HP, WP]` into `img` `[C, H, W]`.
    fn unpad<T: WithDType>(&self, padded: &[T], img: &mut [T]) {
        let (g, p) = (self.g, self.g.padding);
        for (src, dst) in padded
            .chunks_exact(self.padded_plane())
            .zip(img.chunks_exact_mut(g.h * g.w))
        {
            for (y, row) in dst.chunks_exact_mut(g.w).enumerate() {
                row.copy_from_slice(&src[(y + p) * self.wp + p..][..g.w]);
            }
        }
    }

    /// `y` `[O, OH, OW]` into the valid columns of `pitched` `[O, OH, WP]`; the junk columns are left as
    /// they are (zero, written once).
    fn pitch<T: WithDType>(&self, y: &[T], pitched: &mut [T]) {
        for (src, dst) in y
            .chunks_exact(self.oh * self.ow)
            .zip(pitched.chunks_exact_mut(self.pitched_plane()))
        {
            for (row, pitched_row) in src.chunks_exact(self.ow).zip(dst.chunks_mut(self.wp)) {
                pitched_row[..self.ow].copy_from_slice(row);
            }
        }
    }

    /// The valid columns of `pitched` `[O, OH, WP]` into `y` `[O, OH, OW]`.
    fn unpitch<T: WithDType>(&self, pitched: &[T], y: &mut [T]) {
        for (src, dst) in pitched
            .chunks_exact(self.pitched_plane())
            .zip(y.chunks_exact_mut(self.oh * self.ow))
        {
            for (pitched_row, row) in src.chunks(self.wp).zip(dst.chunks_exact_mut(self.ow)) {
                row.copy_from_slice(&pitched_row[..self.ow]);
            }
        }
    }

    /// A zeroed buffer for one padded image (empty when [`Self::padded`] is false: the image is used as is).
    fn image_scratch<T: WithDType>(&self) -> Vec<T> {
        let len = if self.padded() {
            self.g.c * self.padded_plane()
        } else {
            0
        };
        vec![T::from_f64(0.); len]
    }

    /// A zeroed buffer for one pitched output or `dY` of `o` channels (empty when [`Self::pitched`] is
    /// false).
    fn output_scratch<T: WithDType>(&self, o: usize) -> Vec<T> {
        let len = if self.pitched() {
            o * self.pitched_plane()
        } else {
            0
        };
        vec![T::from_f64(0.); len]
    }

    /// `img` padded into `scratch` (from [`Self::image_scratch`]), or `img` itself when unpadded.
    fn padded_image<'a, T: WithDType>(&self, img: &'a [T], scratch: &'a mut [T]) -> &'a [T] {
        if self.padded() {
            self.pad(img, scratch);
            scratch
        } else {
            img
        }
    }

    /// `dy` of one image pitched into `scratch` (from [`Self::output_scratch`]), or `dy` itself.
    fn pitched_grad<'a, T: WithDType>(&self, dy: &'a [T], scratch: &'a mut [T]) -> &'a [T] {
        if self.pitched() {
            self.pitch(dy, scratch);
            scratch
        } else {
            dy
        }
    }

    /// The padded image, pitched output or `dY` as a GEMM operand starting at `offset`: `[rows, n]`,
    /// each row one channel of `plane` values.
    fn rows(plane: usize, offset: usize) -> View {
        View {
            offset,
            rs: plane,
            cs: 1,
        }
    }
}

/// What the three passes share: the pitched geometry, the values per image of input and output, and the
/// batch split into one chunk of images per thread.
struct Plan {
    p: Pitch,
    taps: usize,
    plane_x: usize,
    plane_y: usize,
    chunks: Vec<(usize, usize)>,
    /// Images per chunk (all but the last).
    per: usize,
    par: gemm::Parallelism,
}

impl Plan {
    fn new(g: Geom, o: usize, images: usize) -> Self {
        let p = Pitch::new(g);
        let chunks = image_chunks(images);
        Self {
            p,
            taps: p.taps(),
            plane_x: g.c * g.h * g.w,
            plane_y: o * p.oh * p.ow,
            per: chunks.first().map_or(1, |c| c.1),
            par: inner_parallelism(chunks.len()),
            chunks,
        }
    }
}

/// `conv2d(x, w)` `[N, O, OH, OW]` for `x` `[N, C, H, W]`, `w` `[O, C, KH, KW]`, with the epilogue (if
/// any) applied to each output plane. Requires [`can_run`].
pub(super) fn forward<T: WithDType>(
    g: Geom,
    x: &[T],
    w: &[T],
    o: usize,
    epilogue: Option<&Epilogue>,
) -> Vec<T> {
    let Plan {
        p,
        taps,
        plane_x,
        plane_y,
        chunks,
        per,
        par,
    } = Plan::new(g, o, x.len() / (g.c * g.h * g.w));
    par_zeroed(
        x.len() / plane_x * plane_y,
        per * plane_y,
        |ci, dst: &mut [T]| {
            let b0 = chunks[ci].0;
            let (mut xp, mut yp) = (p.image_scratch(), p.output_scratch(o));
            for (i, y) in dst.chunks_exact_mut(plane_y).enumerate() {
                let src = p.padded_image(&x[(b0 + i) * plane_x..][..plane_x], &mut xp);
                {
                    let acc = if p.pitched() { &mut yp[..] } else { &mut *y };
                    for t in 0..taps {
                        gemm_into(
                            (o, p.n, g.c),
                            (acc, Pitch::rows(p.pitched_plane(), 0)),
                            t > 0,
                            (w, View::strided(t, g.c * taps, taps)),
                            (src, Pitch::rows(p.padded_plane(), p.shift(t))),
                            (g.precision, par),
                        );
                    }
                }
                if p.pitched() {
                    p.unpitch(&yp, y);
                }
                if let Some(e) = epilogue {
                    for (oc, plane) in y.chunks_exact_mut(p.oh * p.ow).enumerate() {
                        e.apply(oc, plane);
                    }
                }
            }
        },
    )
}

/// The filter gradient `[O, C, KH, KW]` of [`forward`] (no epilogue) from `x` and `dy` `[N, O, OH, OW]`:
/// per chunk of images (one per thread), each tap's `dYp x Xpad[:, shift..]^T` accumulated straight into
/// `dW[:, :, ky, kx]`; the chunks' filters are then summed.
pub(super) fn filter_grad<T: WithDType>(g: Geom, x: &[T], dy: &[T], o: usize) -> Vec<T> {
    let Plan {
        p,
        taps,
        plane_x,
        plane_y,
        chunks,
        par,
        ..
    } = Plan::new(g, o, x.len() / (g.c * g.h * g.w));
    let zero = T::from_f64(0.);
    let partials: Vec<Vec<T>> = chunks
        .into_par_iter()
        .map(|(b0, nb)| {
            let mut dw = vec![zero; o * g.c * taps];
            let (mut xp, mut dyp) = (p.image_scratch(), p.output_scratch(o));
            for b in b0..b0 + nb {
                let src = p.padded_image(&x[b * plane_x..][..plane_x], &mut xp);
                let grad = p.pitched_grad(&dy[b * plane_y..][..plane_y], &mut dyp);
                for t in 0..taps {
                    gemm_into(
                        (o, g.c, p.n),
                        (&mut dw, View::strided(t, g.c * taps, taps)),
                        b > b0,
                        (grad, Pitch::rows(p.pitched_plane(), 0)),
                        (src, View::strided(p.shift(t), 1, p.padded_plane())),
                        (g.precision, par),
                    );
                }
            }
            dw
        })
        .collect();
    let mut sum = partials.into_iter();
    let mut dw = sum.next().unwrap_or_else(|| vec![zero; o * g.c * taps]);
    for part in sum {
        dw.iter_mut().zip(&part).for_each(|(a, &b)| *a += b);
    }
    dw
}

/// The input gradient `[N, C, H, W]` of [`forward`] (no epilogue) from `dy` `[N, O, OH, OW]` and `w`:
/// per image, each tap's `W_tap^T x dYp` added into the padded image at the tap's shift.
pub(super) fn input_grad<T: WithDType>(g: Geom, dy: &[T], w: &[T], o: usize) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let Plan {
        p,
        taps,
        plane_x,
        plane_y,
        chunks,
        per,
        par,
    } = Plan::new(g, o, dy.len() / (o * oh * ow));
    let zero = T::from_f64(0.);
    par_zeroed(
        dy.len() / plane_y * plane_x,
        per * plane_x,
        |ci, dst: &mut [T]| {
            let b0 = chunks[ci].0;
            let (mut dxp, mut dyp) = (p.image_scratch(), p.output_scratch(o));
            for (i, dx) in dst.chunks_exact_mut(plane_x).enumerate() {
                let grad = p.pitched_grad(&dy[(b0 + i) * plane_y..][..plane_y], &mut dyp);
                {
                    // Every tap adds into the image (their windows overlap), so it starts at zero.
                    let acc = if p.padded() {
                        dxp.fill(zero);
                        &mut dxp[..]
                    } else {
                        &mut *dx
                    };
                    for t in 0..taps {
                        gemm_into(
                            (g.c, p.n, o),
                            (acc, Pitch::rows(p.padded_plane(), p.shift(t))),
                            true,
                            (w, View::strided(t, taps, g.c * taps)),
                            (grad, Pitch::rows(p.pitched_plane(), 0)),
                            (g.precision, par),
                        );
                    }
                }
                if p.padded() {
                    p.unpad(&dxp, dx);
                }
            }
        },
    )
}
