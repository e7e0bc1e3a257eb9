//! 3x3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), the whole batch at once.
//!
//! The output is cut into 2x2 tiles; the 4x4 input patch `d` under a tile and the 3x3 filter `g` are
//! transformed into 4x4 arrays, `V = B^T d B` and `U = G g G^T`, whose elementwise product, transformed
//! back (`A^T (U . V) A`), is the tile. Summed over input channels, the elementwise products become 16
//! independent GEMMs, one per position `xi` of the 4x4 array: `M[xi] = U[xi] [O, C] x V[xi] [C, tiles]`.
//! That is 16 multiply-adds per tile and channel pair where direct convolution needs 4 x 9 = 36: 2.25x
//! fewer. The transforms cost a few additions per value, and the transformed input and product are
//! 4x the size of the input and output, so this wins where the products dominate: many channels,
//! ResNet's stages after the first (where exactly, measured, is in [`super::conv::choose`]).
//!
//! Numerics: the transforms use only additions, subtractions and halvings (constants exact in binary);
//! the few extra roundings they add are small for F(2x2, 3x3), unlike the larger tiles' transforms: the
//! golden PyTorch parity tests (real ResNet layers of 128-512 channels, gradients included) pass
//! unchanged, and the unit tests compare against candle's conv2d in f64.
//!
//! The input gradient of such a convolution is a convolution of the same kind (the filter flipped and
//! its channel axes swapped), so [`input_grad`] is [`forward_with`] reading the same transformed filter
//! differently.
//!
//! Layouts, chosen so that every GEMM operand has contiguous rows and each parallel task writes one
//! contiguous block: `U` `[O, 16, C]` (one task per output channel), `V` `[C, 16, tiles]` (one task per
//! input channel), `M` `[16, O, tiles]` (one GEMM per `xi`), the output `[N, O, H, W]` (one task per plane).
//! Tile `t = (b * TH + ty) * TW + tx` for image `b`, tile row `ty`, tile column `tx`.

use super::common::{gemm_into, transpose_into, Epilogue, Geom, View};
use super::par::{par_zeroed, par_zeroed_init};
use super::simd::vectorized;
use candle_core::{DType, WithDType};

/// Positions of a transformed 4x4 tile.
const XI: usize = 16;

/// Whether [`forward_with`], [`input_grad`] and [`filter_grad_with`] can compute the convolution at all: a
/// 3x3 filter, stride 1, padding 1, in a dtype the GEMM crate computes natively. Where they are also the
/// fastest is [`super::conv::choose`]'s to say.
pub(super) fn can_run(g: Geom, dtype: DType) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.padding == 1
        && matches!(dtype, DType::F32 | DType::F64)
}

/// How the images of a batch are cut into 2x2 output tiles.
#[derive(Clone, Copy)]
struct Tiles {
    n: usize,
    h: usize,
    w: usize,
    /// Tile rows and columns per image (a last, half-empty one when `h` or `w` is odd).
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(n: usize, h: usize, w: usize) -> Self {
        Self {
            n,
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }

    fn per_image(&self) -> usize {
        self.th * self.tw
    }

    fn total(&self) -> usize {
        self.n * self.per_image()
    }
}

/// `conv2d(x, weight)` (3x3, stride 1, padding 1) with the optional inference epilogue applied to each
/// output plane: `x` `[N, C, H, W]`, `weight` `[O, C, 3, 3]`, result `[N, O, H, W]`.
/// (Tests only; the op calls [`forward_with`].)
#[cfg(test)]
pub(super) fn forward<T: WithDType>(
    g: Geom,
    x: &[T],
    weight: &[T],
    o: usize,
    epilogue: Option<&Epilogue>,
) -> Vec<T> {
    forward_with(g, x, &filter_transform(weight, o, g.c), o, epilogue, false).0
}

/// `conv2d(x, weight)` (3x3, stride 1, padding 1) with the optional inference epilogue applied to each
/// output plane, the filter given already transformed by [`filter_transform`] (`u` `[O, 16, C]`), which
/// the caller may keep for [`input_grad_with`]. With `keep_input`, also the transformed input `V`, for
/// [`filter_grad_with`] (one pass over 4x the input less per layer and step, for 4x the input's memory
/// held until the backward).
pub(super) fn forward_with<T: WithDType>(
    g: Geom,
    x: &[T],
    u: &[T],
    o: usize,
    epilogue: Option<&Epilogue>,
    keep_input: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let c = g.c;
    let lhs = |xi| View::strided(xi * c, XI * c, 1);
    convolve(g, x, u, lhs, o, epilogue, keep_input)
}

/// The input gradient of [`forward_with`]: `grad` `[N, O, H, W]`, `weight` `[O, C, 3, 3]`, result `dX`
/// `[N, C, H, W]`: the forward convolution of `grad` with the filter flipped in both spatial axes and
/// its channel axes swapped.
///
/// That filter's transform needs no pass of its own. `G J = P G`, where `J` reverses the three taps and
/// `P` swaps rows 0 and 3 (rows 1 and 2 of `G` are symmetric), so the flipped filter's `U` is the
/// forward's with positions `(i, j)` read at `(p(i), p(j))`, `p = [3, 1, 2, 0]`; and swapping the
/// channel axes is reading `U [O, 16, C]` transposed, which the GEMM does through its strides.
pub(super) fn input_grad<T: WithDType>(g: Geom, grad: &[T], weight: &[T], o: usize) -> Vec<T> {
    input_grad_with(g, grad, &filter_transform(weight, o, g.c), o)
}

/// [`input_grad`] with the forward's transformed filter `u` `[O, 16, C]` (see [`forward_with`]).
pub(super) fn input_grad_with<T: WithDType>(g: Geom, grad: &[T], u: &[T], o: usize) -> Vec<T> {
    const P: [usize; 4] = [3, 1, 2, 0];
    let c = g.c;
    let flipped = |xi: usize| View::strided((P[xi / 4] * 4 + P[xi % 4]) * c, 1, XI * c);
    convolve(Geom { c: o, ..g }, grad, u, flipped, c, None, false).0
}

/// The filter gradient of [`forward_with`]: `x` `[N, C, H, W]`, `grad` `[N, O, H, W]`, result `dW`
/// `[O, C, 3, 3]`. The forward tile is `A^T (U . V) A`, so the gradient of `U` is `(A dY A^T) . V`
/// summed over tiles: per `xi` the GEMM `dU[xi] = dZ[xi] [O, tiles] x V[xi]^T [tiles, C]`, and
/// `dW = G^T dU G`.
#[cfg(test)]
pub(super) fn filter_grad<T: WithDType>(g: Geom, x: &[T], grad: &[T], o: usize) -> Vec<T> {
    filter_grad_with(g, x, None, grad, o)
}

/// [`filter_grad`] with the forward's transformed input `v` (`[C, 16, tiles]`, see [`forward_with`])
/// when the caller kept it; `x` is transformed again otherwise.
pub(super) fn filter_grad_with<T: WithDType>(
    g: Geom,
    x: &[T],
    v: Option<&[T]>,
    grad: &[T],
    o: usize,
) -> Vec<T> {
    let plane = g.h * g.w;
    let n = x.len() / (g.c * plane).max(1);
    let tiles = Tiles::new(n, g.h, g.w);
    let t = tiles.total();
    let fresh;
    let v = match v {
        Some(v) if v.len() == g.c * XI * t => v,
        _ => {
            fresh = input_transform(g, x, tiles);
            &fresh[..]
        }
    };
    let dz = grad_transform(grad, o, tiles);
    let du = par_zeroed(XI * o * g.c, o * g.c, |xi, dst: &mut [T]| {
        gemm_into(
            (o, g.c, t),
            (dst, View::strided(0, g.c, 1)),
            false,
            (&dz, View::strided(xi * t, XI * t, 1)),
            (v, View::strided(xi * t, 1, XI * t)),
            (g.precision, gemm::Parallelism::None),
        );
    });
    drop(dz);
    filter_untransform(&du, o, g.c)
}

/// `dZ = A dY A^T` for every tile of every output channel, as `[O, 16, tiles]`, with `A` `[[1, 0],
/// [1, 1], [1, -1], [0, -1]]` (`A^T` of the forward's output transform); `dY` is zero past the image
/// where its size is odd.
fn grad_transform<T: WithDType>(grad: &[T], o: usize, tiles: Tiles) -> Vec<T> {
    let t = tiles.total();
    let (plane, per, tw) = (tiles.h * tiles.w, tiles.per_image(), tiles.tw);
    let dz = par_zeroed(o * XI * t, XI * t, |oc, dst: &mut [T]| {
        vectorized! {
            // The plane cut to whole tiles: padded[y * 2 tw + x], zero past the image.
            let mut padded = vec![T::zero(); 2 * tiles.th * 2 * tw];
            let mut cols = vec![T::zero(); 2 * tw];
            for b in 0..tiles.n {
                let src = &grad[(b * o + oc) * plane..][..plane];
                for (y, row) in src.chunks_exact(tiles.w).enumerate() {
                    padded[y * 2 * tw..][..tiles.w].copy_from_slice(row);
                }
                for ty in 0..tiles.th {
                    let (y0, y1) = padded[2 * ty * 2 * tw..][..4 * tw].split_at(2 * tw);
                    // A dY: rows y0, y0 + y1, y0 - y1, -y1; each split into even (a) and odd (b) columns.
                    let first = b * per + ty * tw;
                    for i in 0..4 {
                        let (ea, eb) = cols.split_at_mut(tw);
                        for tx in 0..tw {
                            let (a0, b0, a1, b1) =
                                (y0[2 * tx], y0[2 * tx + 1], y1[2 * tx], y1[2 * tx + 1]);
                            let (a, bb) = match i {
                                0 => (a0, b0),
                                1 => (a0 + a1, b0 + b1),
                                2 => (a0 - a1, b0 - b1),
                                _ => (T::zero() - a1, T::zero() - b1),
                            };
                            ea[tx] = a;
                            eb[tx] = bb;
                        }
                        // ... A^T on the columns: a, a + b, a - b, -b.
                        let (ea, eb) = (&cols[..tw], &cols[tw..2 * tw]);
                        let row = |j: usize| (i * 4 + j) * t + first;
                        dst[row(0)..][..tw].copy_from_slice(ea);
                        for ((d, &a), &bb) in dst[row(1)..][..tw].iter_mut().zip(ea).zip(eb) {
                            *d = a + bb;
                        }
                        for ((d, &a), &bb) in dst[row(2)..][..tw].iter_mut().zip(ea).zip(eb) {
                            *d = a - bb;
                        }
                        for (d, &bb) in dst[row(3)..][..tw].iter_mut().zip(eb) {
                            *d = T::zero() - bb;
                        }
                    }
                }
            }
        }
    });
    dz
}

/// `dW = G^T dU G` for every filter: `du` `[16, O, C]` -> `[O, C, 3, 3]`. `G^T` is `[[1, 1/2, 1/2, 0],
/// [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]]`. Per output channel, as row combinations over the input
/// channels.
fn filter_untransform<T: WithDType>(du: &[T], o: usize, c: usize) -> Vec<T> {
    // [a, b, c, d] -> [a + (b + c) / 2, (b - c) / 2, (b + c) / 2 + d], elementwise over runs.
    #[inline(always)]
    fn g_t<T: WithDType>(a: &[T], b: &[T], cc: &[T], d: &[T], out: &mut [T]) {
        let half = T::from_f64(0.5);
        let (r0, rest) = out.split_at_mut(a.len());
        let (r1, r2) = rest.split_at_mut(a.len());
        for i in 0..a.len() {
            let s = (b[i] + cc[i]) * half;
            r0[i] = a[i] + s;
            r1[i] = (b[i] - cc[i]) * half;
            r2[i] = s + d[i];
        }
    }
    let dw = par_zeroed(o * c * 9, c * 9, |oc, dst: &mut [T]| {
        vectorized! {
            let run = |xi: usize| &du[(xi * o + oc) * c..][..c];
            // p[(r * 4 + j) * c..]: row r of G^T dU, column j.
            let mut p = vec![T::zero(); 12 * c];
            let mut col = vec![T::zero(); 3 * c];
            for j in 0..4 {
                g_t(run(j), run(4 + j), run(8 + j), run(12 + j), &mut col);
                for r in 0..3 {
                    p[(r * 4 + j) * c..][..c].copy_from_slice(&col[r * c..][..c]);
                }
            }
            for r in 0..3 {
                let pr = |j: usize| &p[(r * 4 + j) * c..][..c];
                g_t(pr(0), pr(1), pr(2), pr(3), &mut col);
                for kx in 0..3 {
                    for (ci, &v) in col[kx * c..][..c].iter().enumerate() {
                        dst[ci * 9 + r * 3 + kx] = v;
                    }
                }
            }
        }
    });
    dw
}

/// The shared pass: `x` `[N, g.c, H, W]` convolved into `cout` channels, with the transformed
/// filters of position `xi` the `[cout, g.c]` matrix `lhs(xi)` of `u`.
fn convolve<T: WithDType>(
    g: Geom,
    x: &[T],
    u: &[T],
    lhs: impl Fn(usize) -> View + Sync,
    cout: usize,
    epilogue: Option<&Epilogue>,
    keep_input: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let plane = g.h * g.w;
    let n = x.len() / (g.c * plane).max(1);
    let tiles = Tiles::new(n, g.h, g.w);
    let v = input_transform(g, x, tiles);
    let t = tiles.total();
    let m = par_zeroed(XI * cout * t, cout * t, |xi, mx: &mut [T]| {
        gemm_into(
            (cout, t, g.c),
            (mx, View::strided(0, t, 1)),
            false,
            (u, lhs(xi)),
            (&v, View::strided(xi * t, XI * t, 1)),
            (g.precision, gemm::Parallelism::None),
        );
    });
    // Freed before the output is allocated unless the caller keeps it.
    let v = keep_input.then_some(v);
    let out = par_zeroed_init(n * cout * plane, plane, Vec::new, |s, p, y: &mut [T]| {
        let (b, oc) = (p / cout, p % cout);
        vectorized! { output_transform(&m, tiles, (cout, b, oc), s, y) };
        if let Some(e) = epilogue {
            e.apply(oc, y);
        }
    });
    (out, v)
}

/// `U = G g G^T` for every filter, as `[O, 16, C]`. `G` is `[[1, 0, 0], [1/2, 1/2, 1/2],
/// [1/2, -1/2, 1/2], [0, 0, 1]]`. Per output channel, over all input channels at once: the filters'
/// taps transposed into nine runs of `C` values, then both products as combinations of whole runs
/// (which vectorise; filter by filter, the arithmetic was scalar and the 512-channel layers' transform
/// took ~3 ms). The same operations in the same order per value as filter by filter.
pub(super) fn filter_transform<T: WithDType>(weight: &[T], o: usize, c: usize) -> Vec<T> {
    par_zeroed_init(
        o * XI * c,
        XI * c,
        || vec![T::zero(); 21 * c],
        |s, oc, dst: &mut [T]| {
            vectorized! {
                // taps[t * c..]: tap t (row-major 3x3) of every input channel's filter; cols[(k * 4 +
                // i) * c..]: position i of column k of the filters times G.
                let (taps, cols) = s.split_at_mut(9 * c);
                transpose_into(&weight[oc * c * 9..][..c * 9], c, 9, taps);
                let tap = |t: usize| &taps[t * c..][..c];
                for k in 0..3 {
                    g_runs(tap(k), tap(3 + k), tap(6 + k), &mut cols[k * 4 * c..][..4 * c]);
                }
                for i in 0..4 {
                    let col = |k: usize| &cols[(k * 4 + i) * c..][..c];
                    g_runs(col(0), col(1), col(2), &mut dst[i * 4 * c..][..4 * c]);
                }
            }
        },
    )
}

/// `[a, (a + b + c) / 2, (a - b + c) / 2, c]` (a product with `G`) elementwise over runs of equal
/// length, into the four consecutive runs of `out`.
#[inline(always)]
fn g_runs<T: WithDType>(a: &[T], b: &[T], cc: &[T], out: &mut [T]) {
    let half = T::from_f64(0.5);
    let n = a.len();
    let (b, cc) = (&b[..n], &cc[..n]);
    let (o0, rest) = out.split_at_mut(n);
    let (o1, rest) = rest.split_at_mut(n);
    let (o2, o3) = rest.split_at_mut(n);
    o0.copy_from_slice(a);
    o3[..n].copy_from_slice(cc);
    for i in 0..n {
        o1[i] = (a[i] + b[i] + cc[i]) * half;
        o2[i] = (a[i] - b[i] + cc[i]) * half;
    }
}

/// `V = B^T d B` for every tile of every channel, as `[C, 16, tiles]`. `B^T` is `[[1, 0, -1, 0],
/// [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`; `d` is the 4x4 input patch whose top-left corner is
/// pixel `(2 ty - 1, 2 tx - 1)`, zero outside the image.
///
/// Per tile row: `B^T d` as four combinations of whole padded rows, each split into its even and odd
/// columns, so that `... B` is combinations of contiguous runs (tile `tx` reads even and odd columns
/// `tx` and `tx + 1`).
fn input_transform<T: WithDType>(g: Geom, x: &[T], tiles: Tiles) -> Vec<T> {
    let t = tiles.total();
    let (plane, per, tw) = (g.h * g.w, tiles.per_image(), tiles.tw);
    // A zero-padded image plane: one border pixel, and one more row/column where the size is odd.
    let (hp, wp) = (2 * tiles.th + 2, 2 * tw + 2);
    let v = par_zeroed(g.c * XI * t, XI * t, |ch, dst: &mut [T]| {
        vectorized! {
            let mut padded = vec![T::zero(); hp * wp];
            // Row combination i, split: even[i * (tw + 1) + k] = column 2k, odd[...] = column 2k + 1.
            let mut even = vec![T::zero(); 4 * (tw + 1)];
            let mut odd = vec![T::zero(); 4 * (tw + 1)];
            for b in 0..tiles.n {
                let src = &x[(b * g.c + ch) * plane..][..plane];
                for (y, row) in src.chunks_exact(g.w).enumerate() {
                    padded[(y + 1) * wp + 1..][..g.w].copy_from_slice(row);
                }
                for ty in 0..tiles.th {
                    let r = |i: usize| &padded[(2 * ty + i) * wp..][..wp];
                    let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                    for k in 0..=tw {
                        for (par, dst) in [(0, &mut even), (1, &mut odd)] {
                            let j = 2 * k + par;
                            dst[k] = r0[j] - r2[j];
                            dst[tw + 1 + k] = r1[j] + r2[j];
                            dst[2 * (tw + 1) + k] = r2[j] - r1[j];
                            dst[3 * (tw + 1) + k] = r1[j] - r3[j];
                        }
                    }
                    let first = b * per + ty * tw;
                    for i in 0..4 {
                        let e = &even[i * (tw + 1)..][..tw + 1];
                        let od = &odd[i * (tw + 1)..][..tw + 1];
                        let (a, bb, c, d) = (&e[..tw], &od[..tw], &e[1..], &od[1..]);
                        let row = |j: usize| (i * 4 + j) * t + first;
                        for ((dv, &a), &c) in dst[row(0)..][..tw].iter_mut().zip(a).zip(c) {
                            *dv = a - c;
                        }
                        for ((dv, &bb), &c) in dst[row(1)..][..tw].iter_mut().zip(bb).zip(c) {
                            *dv = bb + c;
                        }
                        for ((dv, &bb), &c) in dst[row(2)..][..tw].iter_mut().zip(bb).zip(c) {
                            *dv = c - bb;
                        }
                        for ((dv, &bb), &d) in dst[row(3)..][..tw].iter_mut().zip(bb).zip(d) {
                            *dv = bb - d;
                        }
                    }
                }
            }
        }
    });
    v
}

/// Output plane `(b, oc)` from the products `m` `[16, cout, tiles]`: `A^T M A` per tile, with `A^T`
/// `[[1, 1, 1, 0], [0, 1, -1, -1]]`, cropped to the image where its size is odd. The plane's tiles
/// are one contiguous run of each `M[xi]`, so both halves of the transform are loops over all of
/// them (which vectorise), into `s`, before the values are interleaved into the plane.
#[inline(always)]
fn output_transform<T: WithDType>(
    m: &[T],
    tiles: Tiles,
    (cout, b, oc): (usize, usize, usize),
    s: &mut Vec<T>,
    y: &mut [T],
) {
    let (t, per, tw) = (tiles.total(), tiles.per_image(), tiles.tw);
    s.resize(10 * per, T::zero());
    let run = |xi: usize| &m[(xi * cout + oc) * t + b * per..][..per];
    // s[(dy * 4 + j) * per + tile]: row dy of A^T M, column j.
    let (rows, cols) = s.split_at_mut(8 * per);
    for j in 0..4 {
        let (m0, m1, m2, m3) = (run(j), run(4 + j), run(8 + j), run(12 + j));
        let (s0, s1) = rows.split_at_mut(4 * per);
        for (((d, &a), &bb), &c) in s0[j * per..][..per].iter_mut().zip(m0).zip(m1).zip(m2) {
            *d = a + bb + c;
        }
        for (((d, &bb), &c), &dd) in s1[j * per..][..per].iter_mut().zip(m1).zip(m2).zip(m3) {
            *d = bb - c - dd;
        }
    }
    for dy in 0..2 {
        // ... times A: the tile's two output columns, in `cols` (even, then odd).
        let col = |j: usize| &rows[(dy * 4 + j) * per..][..per];
        let (a, bb, c, d) = (col(0), col(1), col(2), col(3));
        let (even, odd) = cols.split_at_mut(per);
        for i in 0..per {
            even[i] = a[i] + bb[i] + c[i];
            odd[i] = bb[i] - c[i] - d[i];
        }
        for ty in 0..tiles.th {
            let oy = 2 * ty + dy;
            if oy >= tiles.h {
                continue;
            }
            let row = &mut y[oy * tiles.w..][..tiles.w];
            let (e, o) = (&even[ty * tw..][..tw], &odd[ty * tw..][..tw]);
            for (tx, pair) in row.chunks_mut(2).enumerate() {
                pair[0] = e[tx];
                if let Some(second) = pair.get_mut(1) {
                    *second = o[tx];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::precision::Precision;
    use candle_core::{Device, Tensor};

    fn geom(c: usize, h: usize, w: usize) -> Geom {
        Geom {
            c,
            h,
            w,
            kh: 3,
            kw: 3,
            padding: 1,
            stride: 1,
            precision: Precision::F32,
        }
    }

    /// Forward and both gradients against candle's conv2d, conv_transpose2d and autograd in f64 (where rounding
    /// cannot hide a wrong transform), on even, odd and 1-pixel-wide images.
    #[test]
    fn forward_and_gradients_match_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (n, c, o, h, w) in [
            (2, 3, 4, 4, 4),
            (1, 5, 2, 7, 5),
            (3, 2, 3, 1, 6),
            (2, 4, 6, 8, 8),
        ] {
            let x = Tensor::randn(0f64, 1., (n, c, h, w), &dev)?;
            let k = Tensor::randn(0f64, 1., (o, c, 3, 3), &dev)?;
            let g = geom(c, h, w);
            let y: Vec<f64> = forward(
                g,
                &x.flatten_all()?.to_vec1()?,
                &k.flatten_all()?.to_vec1()?,
                o,
                None,
            );
            let want: Vec<f64> = x.conv2d(&k, 1, 1, 1, 1)?.flatten_all()?.to_vec1()?;
            assert_eq!(y.len(), want.len());
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-10,
                    "forward {n}x{c}x{h}x{w} -> {o}: {a} vs {b}"
                );
            }
            let gy = Tensor::randn(0f64, 1., (n, o, h, w), &dev)?;
            let dx: Vec<f64> = input_grad(
                g,
                &gy.flatten_all()?.to_vec1()?,
                &k.flatten_all()?.to_vec1()?,
                o,
            );
            let want: Vec<f64> = gy
                .conv_transpose2d(&k, 1, 0, 1, 1)?
                .flatten_all()?
                .to_vec1()?;
            assert_eq!(dx.len(), want.len());
            for (a, b) in dx.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-10,
                    "input grad {n}x{c}x{h}x{w} -> {o}: {a} vs {b}"
                );
            }
            let kv = candle_core::Var::from_tensor(&k)?;
            let grads = (x.conv2d(kv.as_tensor(), 1, 1, 1, 1)? * &gy)?
                .sum_all()?
                .backward()?;
            let want: Vec<f64> = grads
                .get(&kv)
                .expect("filter grad")
                .flatten_all()?
                .to_vec1()?;
            let dw: Vec<f64> = filter_grad(
                g,
                &x.flatten_all()?.to_vec1()?,
                &gy.flatten_all()?.to_vec1()?,
                o,
            );
            assert_eq!(dw.len(), want.len());
            for (a, b) in dw.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-9,
                    "filter grad {n}x{c}x{h}x{w} -> {o}: {a} vs {b}"
                );
            }
            // The forward's kept transforms give the same values as transforming again.
            let (xs, ks) = (x.flatten_all()?.to_vec1()?, k.flatten_all()?.to_vec1()?);
            let u = filter_transform(&ks, o, c);
            let (y_kept, v) = forward_with(g, &xs, &u, o, None, true);
            assert_eq!(y_kept, y);
            let gys: Vec<f64> = gy.flatten_all()?.to_vec1()?;
            assert_eq!(filter_grad_with(g, &xs, v.as_deref(), &gys, o), dw);
            assert_eq!(input_grad_with(g, &gys, &u, o), dx);
        }
        Ok(())
    }
}
