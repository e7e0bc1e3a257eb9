//! Dense convolution (`groups == 1`) on the CPU as GEMMs over the whole batch, forward and backward: the
//! general algorithm, which [`super::conv::choose`] falls back to where Winograd and the shifted GEMMs do
//! not apply or do not pay.
//!
//! Forward: the batch is folded into the GEMM's columns: the input is unfolded into `cols`
//! `[K * K * C, N * OH * OW]` (rows tap-major: row `(ky * K + kx) * C + c`), and the output is one
//! product `W [O, K * K * C] x cols`. One product per layer instead of one per image matters: the GEMM
//! packs its left operand on every call, and for the late layers (a few output pixels per image) packing
//! the filter once per image cost as much as the multiplication itself.
//!
//! Backward ([`filter_grad`], [`input_grad`]): the images are split into one chunk per thread, and each
//! thread runs single-threaded GEMMs on pixel-major operands (`[pixels, K * K * C]`, `[pixels, O]`),
//! the layout in which the GEMM reads both operands along their rows.
//!
//! Why tap-major rows: candle's tiled conv2d orders its reduction the same way, so the forward sums in
//! candle's order: bit-identical for short reductions (ResNet's stem, 3 x 7 x 7) and within rounding
//! (1e-5 relative) for long ones, where the GEMM blocks the reduction differently (the tests below check
//! both). The stem is where it matters for PyTorch gradient parity: its output goes through a max-pool,
//! and an earlier channel-major forward, different in the last bits, moved the golden ResNet-18 stem
//! gradients by 1e-3 relative (near-ties in the max-pool flip), against 4e-6 with these values.

use super::common::{
    gemm_into, image_chunks, inner_parallelism, span, transpose_into, Epilogue, Geom, View,
};
use super::par::par_zeroed;
use super::precision::Precision;
use super::simd::vectorized;
use candle_core::{DType, WithDType};
use rayon::prelude::*;

/// `conv2d(x, w)` `[N, O, OH, OW]` for `x` `[N, C, H, W]`, `w` `[O, C, KH, KW]`, the whole batch unfolded
/// into one column matrix and multiplied by the filter in one GEMM (see the module comment), with the
/// epilogue (if any) applied while the product is laid out.
pub(super) fn forward<T: WithDType>(
    g: Geom,
    x: &[T],
    w: &[T],
    o: usize,
    epilogue: Option<&Epilogue>,
) -> Vec<T> {
    let ckk = g.c * g.kh * g.kw;
    let (oh, ow) = g.out_hw();
    let l = oh * ow;
    let n = x.len() / (g.c * g.h * g.w);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let cols = im2col_folded(g, x);
    let y = product(
        o,
        n * l,
        ckk,
        (&tap_major(w, o, g), 1, ckk),
        (&cols, 1, n * l),
        (g.precision, par),
    );
    drop(cols);
    // [O, N * L] -> [N, O, L], with the epilogue if any.
    par_zeroed(n * o * l, l, |p, dst: &mut [T]| {
        let (b, oc) = (p / o, p % o);
        dst.copy_from_slice(&y[(oc * n + b) * l..(oc * n + b + 1) * l]);
        if let Some(e) = epilogue {
            e.apply(oc, dst);
        }
    })
}

/// `weight` `[O, C, KH, KW]` as `[O, KH * KW * C]` (tap-major, the row order of [`im2col_folded`]).
fn tap_major<T: WithDType>(w: &[T], o: usize, g: Geom) -> Vec<T> {
    transpose_blocks(w, o, g.c, g.kh * g.kw)
}

/// `v` as `blocks` consecutive `[rows, cols]` matrices, each transposed to `[cols, rows]`, in parallel over
/// the blocks (one filter each here: the late layers' filters are millions of values).
fn transpose_blocks<T: WithDType>(v: &[T], blocks: usize, rows: usize, cols: usize) -> Vec<T> {
    if rows == 1 || cols == 1 {
        return v.to_vec();
    }
    let size = rows * cols;
    par_zeroed(blocks * size, size, |i, dst: &mut [T]| {
        vectorized! { transpose_into(&v[i * size..][..size], rows, cols, dst) }
    })
}

/// Unfolds `x` `[N, C, H, W]` into `[KH * KW * C, N * OH * OW]`: row `tap * C + c` holds, for every image
/// and output position, the input pixel that filter tap `tap` of channel `c` sees (zero in the padding).
fn im2col_folded<T: WithDType>(g: Geom, x: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let nl = x.len() / (g.c * g.h * g.w) * oh * ow;
    par_zeroed(g.c * g.kh * g.kw * nl, nl, |row, dst: &mut [T]| {
        vectorized! { im2col_row(g, x, row, 0..oh, dst) }
    })
}

/// Row `row` (`tap * C + c`) of [`im2col_folded`] into `dst` (`N * OH * OW` values), or of the output
/// rows `rows` of a single image (`dst` then holds `rows.len() * OW` values); the padding's positions are
/// not written (zero in a fresh buffer, and the same positions for every image and band of rows).
#[inline(always)]
fn im2col_row<T: WithDType>(
    g: Geom,
    x: &[T],
    row: usize,
    rows: std::ops::Range<usize>,
    dst: &mut [T],
) {
    let (_, ow) = g.out_hw();
    let plane_in = g.h * g.w;
    let l = rows.len() * ow;
    let skip = rows.start * ow;
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
    let (tap, ch) = (row / g.c, row % g.c);
    for (b, dst) in dst.chunks_exact_mut(l).enumerate() {
        let src = &x[(b * g.c + ch) * plane_in..(b * g.c + ch + 1) * plane_in];
        if pointwise {
            dst.copy_from_slice(&src[skip..skip + l]);
            continue;
        }
        g.for_each_run_of_tap(tap, |r| {
            if r.out < skip || r.out >= skip + l {
                return;
            }
            let row = &mut dst[r.out - skip..r.out - skip + r.len];
            let seen = &src[span(r, g.stride)];
            if g.stride == 1 {
                row.copy_from_slice(seen);
            } else {
                for (d, &v) in row.iter_mut().zip(seen.iter().step_by(g.stride)) {
                    *d = v;
                }
            }
        })
    }
}

/// Column-matrix bytes per image above which the convolution runs image by image (each thread
/// unfolding one image at a time, a band of output rows at a time, into a buffer of at most about this
/// size that it keeps) instead of unfolding the whole batch: about the size of a core's L2 cache here,
/// so the columns are read back from cache. It splits ResNet's stem
/// (3 x 7 x 7 taps over 64 x 64 output pixels at 128: 2.4 MB per image, 38 MB per batch of 16); the late
/// layers, a few pixels per image, stay batched, where one GEMM amortises packing the filter.
pub(super) const IMAGE_BY_IMAGE_BYTES: usize = 1 << 20;

/// [`forward`] image by image (see [`IMAGE_BY_IMAGE_BYTES`]): per chunk of images (one per thread),
/// each band of output rows of each image unfolded into the thread's column buffer and multiplied
/// straight into those rows of the image's output `[O, OH * OW]`, which is already NCHW: no layout pass.
/// f32 and f64 only.
pub(super) fn forward_image_by_image<T: WithDType>(
    g: Geom,
    x: &[T],
    w: &[T],
    o: usize,
    epilogue: Option<&Epilogue>,
) -> Vec<T> {
    let wm = &tap_major(w, o, g)[..];
    let (oh, ow) = g.out_hw();
    let (plane_x, l, ckk) = (g.c * g.h * g.w, oh * ow, g.c * g.kh * g.kw);
    let n = x.len() / plane_x;
    let chunks = image_chunks(n);
    let par = inner_parallelism(chunks.len());
    let per = chunks.first().map_or(1, |c| c.1);
    let band = (IMAGE_BY_IMAGE_BYTES / (ckk * ow * std::mem::size_of::<T>())).clamp(1, oh);
    par_zeroed(n * o * l, per * o * l, |ci, dst: &mut [T]| {
        let b0 = chunks[ci].0;
        let mut cols = vec![T::from_f64(0.); ckk * band * ow];
        for (i, y) in dst.chunks_exact_mut(o * l).enumerate() {
            let img = &x[(b0 + i) * plane_x..][..plane_x];
            for rows in (0..oh).step_by(band).map(|r| r..(r + band).min(oh)) {
                // Zeroed for each band: which positions are padding differs between bands.
                let n_cols = rows.len() * ow;
                let cols = &mut cols[..ckk * n_cols];
                cols.fill(T::from_f64(0.));
                vectorized! {
                    for (row, r) in cols.chunks_exact_mut(n_cols).enumerate() {
                        im2col_row(g, img, row, rows.clone(), r);
                    }
                }
                gemm_into(
                    (o, n_cols, ckk),
                    (y, View::strided(rows.start * ow, l, 1)),
                    false,
                    (wm, View::strided(0, ckk, 1)),
                    (cols, View::strided(0, n_cols, 1)),
                    (g.precision, par),
                );
            }
            if let Some(e) = epilogue {
                for (oc, plane) in y.chunks_exact_mut(l).enumerate() {
                    e.apply(oc, plane);
                }
            }
        }
    })
}

/// The filter gradient `dW [O, C, KH, KW]` of [`forward`] from `x [N, C, H, W]` and `dY [N, O, OH, OW]`.
///
/// `dW = dY x cols` reduces over every image and output pixel. A GEMM parallelises over the rows and
/// columns of its result, which are few here (`O x K * K * C`) against a long reduction, so instead the
/// images are split into one chunk per thread ([`image_chunks`]): each thread unfolds only its own images
/// and runs a single-threaded GEMM over them, and the partial filters are summed. The columns are
/// pixel-major (`[pixels, K * K * C]`) so that the GEMM reads both operands along their rows: about 2x
/// faster on ResNet-18's shapes than reading the channel-major columns transposed. Only a chunk's columns
/// are in memory at a time; with `by_image` (large images, see [`IMAGE_BY_IMAGE_BYTES`]) only one image's.
pub(super) fn filter_grad<T: WithDType>(
    g: Geom,
    x: &[T],
    grad: &[T],
    o: usize,
    by_image: bool,
) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let (plane_c, l, taps) = (g.c * g.h * g.w, oh * ow, g.kh * g.kw);
    let ckk = g.c * taps;
    let n = x.len() / plane_c;
    let partials: Vec<Vec<T>> = image_chunks(n)
        .into_par_iter()
        .map(|(b0, nb)| {
            if by_image {
                // `dY` of one image is `[O, L]` already: the GEMM reads it in place.
                let mut dw = vec![T::from_f64(0.); o * ckk];
                for b in b0..b0 + nb {
                    let cols = im2col_pixel_major(g, &x[b * plane_c..(b + 1) * plane_c]);
                    gemm_into(
                        (o, ckk, l),
                        (&mut dw, View::strided(0, ckk, 1)),
                        b > b0,
                        (&grad[b * o * l..(b + 1) * o * l], View::strided(0, l, 1)),
                        (&cols, View::strided(0, ckk, 1)),
                        (g.precision, gemm::Parallelism::None),
                    );
                }
                return dw;
            }
            let k = nb * l;
            let cols = im2col_pixel_major(g, &x[b0 * plane_c..(b0 + nb) * plane_c]);
            let gt = channel_major(&grad[b0 * o * l..(b0 + nb) * o * l], o, l);
            product(
                o,
                ckk,
                k,
                (&gt, 1, k),
                (&cols, 1, ckk),
                (g.precision, gemm::Parallelism::None),
            )
        })
        .collect();
    let mut sum = partials.into_iter();
    let mut dw = sum.next().unwrap_or_else(|| vec![T::from_f64(0.); o * ckk]);
    for p in sum {
        dw.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
    }
    // [O, taps, C] -> [O, C, KH, KW]
    transpose_blocks(&dw, o, taps, g.c)
}

/// The input gradient `dX [N, C, H, W]` of [`forward`] from `dY [N, O, OH, OW]` and `w [O, C, KH, KW]`.
///
/// Per chunk of images (one per thread): the pixel-major columns' gradient `dY^T [pixels, O] x W
/// [O, K * K * C]`, a single-threaded GEMM reading both operands along their rows (about 1.6x faster
/// than `W^T x dY` on ResNet-18's shapes), folded back into the chunk's images by
/// [`col2im_pixel_major`].
pub(super) fn input_grad<T: WithDType>(g: Geom, grad: &[T], w: &[T], o: usize) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let (plane_c, l) = (g.c * g.h * g.w, oh * ow);
    let ckk = g.c * g.kh * g.kw;
    let n = grad.len() / (o * l).max(1);
    let wm = tap_major(w, o, g);
    let chunks = image_chunks(n);
    let per = chunks.first().map_or(1, |c| c.1);
    par_zeroed(n * plane_c, per * plane_c, |i, dst: &mut [T]| {
        let (b0, nb) = chunks[i];
        let k = nb * l;
        // [nb, O, L] -> [nb * L, O]
        let gp = channels_last(&grad[b0 * o * l..(b0 + nb) * o * l], o, l);
        let gcols = product(
            k,
            ckk,
            o,
            (&gp, 1, o),
            (&wm, 1, ckk),
            (g.precision, gemm::Parallelism::None),
        );
        col2im_pixel_major(g, &gcols, dst);
    })
}

/// `dst [m, n] = lhs [m, k] x rhs [k, n]` with `par` threads (`Parallelism::None`: the calling thread),
/// each operand given as `(values, column stride, row stride)`. f32 and f64 run on the GEMM crate's
/// kernels; half types are computed in f32.
fn product<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    (precision, par): (Precision, gemm::Parallelism),
) -> Vec<T> {
    if !matches!(T::DTYPE, DType::F32 | DType::F64) {
        let f32s = |v: &[T]| v.iter().map(|x| x.to_f64() as f32).collect::<Vec<f32>>();
        let (l, r) = (f32s(lhs.0), f32s(rhs.0));
        return product(
            m,
            n,
            k,
            (&l, lhs.1, lhs.2),
            (&r, rhs.1, rhs.2),
            (precision, par),
        )
        .into_iter()
        .map(|v| T::from_f64(v as f64))
        .collect();
    }
    let mut dst = vec![T::from_f64(0.); m * n];
    gemm_into(
        (m, n, k),
        (&mut dst, View::strided(0, n, 1)),
        false,
        (lhs.0, View::strided(0, lhs.2, lhs.1)),
        (rhs.0, View::strided(0, rhs.2, rhs.1)),
        (precision, par),
    );
    dst
}

/// `dY` of some images, `[nb, O, L]`, as `[O, nb * L]`.
fn channel_major<T: WithDType>(grad: &[T], o: usize, l: usize) -> Vec<T> {
    let nb = grad.len() / (o * l).max(1);
    let k = nb * l;
    let mut gt = vec![T::from_f64(0.); o * k];
    for b in 0..nb {
        for oc in 0..o {
            gt[oc * k + b * l..oc * k + (b + 1) * l]
                .copy_from_slice(&grad[(b * o + oc) * l..(b * o + oc + 1) * l]);
        }
    }
    gt
}

/// Images `[nb, C, P]` as `[nb, P, C]` (channels last).
fn channels_last<T: WithDType>(x: &[T], c: usize, p: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    for (dst, img) in out.chunks_exact_mut(c * p).zip(x.chunks_exact(c * p)) {
        vectorized! { transpose_into(img, c, p, dst) }
    }
    out
}

/// Unfolds images `x` `[nb, C, H, W]` into pixel-major columns `[nb * OH * OW, KH * KW * C]`: row
/// `(b, oy, ox)` holds the patch that output pixel sees, tap-major (entry `tap * C + c`), zero in the
/// padding. With the images channels-last, each tap of each pixel is one contiguous copy of `C` values.
fn im2col_pixel_major<T: WithDType>(g: Geom, x: &[T]) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let ckk = g.c * g.kh * g.kw;
    let plane = g.h * g.w;
    let xh = channels_last(x, g.c, plane);
    let n = x.len() / (g.c * plane);
    par_zeroed(n * oh * ow * ckk, ow * ckk, |row, dst: &mut [T]| {
        let (b, oy) = (row / oh, row % oh);
        for ky in 0..g.kh {
            let Some(iy) = g.in_row(oy, ky) else {
                continue;
            };
            let src = &xh[(b * plane + iy * g.w) * g.c..(b * plane + (iy + 1) * g.w) * g.c];
            for kx in 0..g.kw {
                let (lo, hi) = g.col_range(kx, ow);
                let at = (ky * g.kw + kx) * g.c;
                for ox in lo..hi {
                    let ix = ox * g.stride + kx - g.padding;
                    dst[ox * ckk + at..ox * ckk + at + g.c]
                        .copy_from_slice(&src[ix * g.c..(ix + 1) * g.c]);
                }
            }
        }
    })
}

/// The adjoint of [`im2col_pixel_major`]: adds the columns `[nb * OH * OW, KH * KW * C]` back into the
/// images `x` `[nb, C, H, W]`, one image per task: summed channels-last (each tap one contiguous add of
/// `C` values), then transposed into `x`.
fn col2im_pixel_major<T: WithDType>(g: Geom, cols: &[T], x: &mut [T]) {
    let (oh, ow) = g.out_hw();
    let (ckk, l) = (g.c * g.kh * g.kw, oh * ow);
    let plane = g.h * g.w;
    x.par_chunks_mut(g.c * plane)
        .zip(cols.par_chunks(l * ckk))
        .for_each(|(img, cols)| {
            vectorized! {
                let mut acc = vec![T::from_f64(0.); plane * g.c];
                for oy in 0..oh {
                    for ky in 0..g.kh {
                        let Some(iy) = g.in_row(oy, ky) else {
                            continue;
                        };
                        let row = &mut acc[iy * g.w * g.c..(iy + 1) * g.w * g.c];
                        for kx in 0..g.kw {
                            let (lo, hi) = g.col_range(kx, ow);
                            let at = (ky * g.kw + kx) * g.c;
                            for ox in lo..hi {
                                let ix = ox * g.stride + kx - g.padding;
                                let src = &cols[(oy * ow + ox) * ckk + at..][..g.c];
                                for (d, &v) in row[ix * g.c..(ix + 1) * g.c].iter_mut().zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
                transpose_into(&acc, plane, g.c, img);
            }
        });
}
