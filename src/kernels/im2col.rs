//! Dense convolution (`groups == 1`) on the CPU as GEMMs over the whole batch, forward and backward.
//!
//! Forward: the batch is folded into the GEMM's columns: the input is unfolded into `cols`
//! `[K * K * C, N * OH * OW]` (rows tap-major: row `(ky * K + kx) * C + c`), and the output is one
//! product `W [O, K * K * C] x cols`. One product per layer instead of one per image matters: the GEMM
//! packs its left operand on every call, and for the late layers (a few output pixels per image) packing
//! the filter once per image cost as much as the multiplication itself.
//!
//! Backward ([`FilterGrad`], [`InputGrad`]): the images are split into one chunk per thread, and each
//! thread runs single-threaded GEMMs on pixel-major operands (`[pixels, K * K * C]`, `[pixels, O]`),
//! the layout in which the GEMM reads both operands along their rows.
//!
//! Why tap-major rows: candle's tiled conv2d orders its reduction the same way, so the forward sums in
//! candle's order: bit-identical for short reductions (ResNet's stem, 3 x 7 x 7) and within rounding
//! (1e-5 relative) for long ones, where the GEMM blocks the reduction differently (the tests below check
//! both). The stem is where it matters for PyTorch gradient parity: its output goes through a max-pool,
//! and an earlier channel-major forward, different in the last bits, moved the golden ResNet-18 stem
//! gradients by 1e-3 relative (near-ties in the max-pool flip), against 4e-6 with these values.

use super::depthwise::{contiguous_slice, dispatch2, impl_forward_only_op2, span, Epilogue, Geom};
use super::{shifted, winograd};
use crate::par::par_zeroed;
use crate::simd::vectorized;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `bias-free conv2d(x, weight)` for `groups == 1`: `x` `[N, C, H, W]`, `weight` `[O, C, K, K]`, symmetric
/// zero `padding`, `stride`. Differentiable in both arguments (an input that tracks no gradient gets none
/// computed). CPU only (the caller checks the device).
pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let geom = Geom::of(x, weight, padding, stride)?;
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        FoldedConv {
            geom,
            epilogue: None,
            keep_filter: x.track_op(),
            keep_input: weight.track_op(),
            kept: Default::default(),
        },
    )
}

/// `clamp(conv2d(x, weight) + shift[o], 0, max)` (no clamp when `max` is `None`) in one op, for inference
/// (no gradient is recorded): the shift and clamp are applied in the pass that lays the product out, so a
/// folded conv + BatchNorm + activation costs no pass of its own. Same contract as [`conv2d`] otherwise.
pub(super) fn conv2d_shift_clamp(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    epilogue: Epilogue,
) -> candle_core::Result<Tensor> {
    let o = weight.dims4()?.0;
    if epilogue.shift.len() != o {
        candle_core::bail!(
            "conv2d_shift_clamp: {} shifts for {o} channels",
            epilogue.shift.len()
        );
    }
    let geom = Geom::of(x, weight, padding, stride)?;
    x.contiguous()?.apply_op2_no_bwd(
        &weight.contiguous()?,
        &FoldedConv {
            geom,
            epilogue: Some(epilogue),
            keep_filter: false,
            keep_input: false,
            kept: Default::default(),
        },
    )
}

/// `(x, weight) -> conv2d(x, weight)`, see the module comment, with an optional inference epilogue.
struct FoldedConv {
    geom: Geom,
    epilogue: Option<Epilogue>,
    /// Whether a Winograd forward keeps its transformed filter (the input gradient reads it: the input
    /// tracks a gradient) and its transformed input (the filter gradient reads it: the filter does).
    /// Decided when the op is built, so that inference and frozen layers hold neither.
    keep_filter: bool,
    keep_input: bool,
    /// A Winograd forward's transforms, kept for the backward. Taken, so freed, by the backward;
    /// dropped with the op when no backward comes (inference: the op is not recorded).
    kept: std::sync::Mutex<Kept>,
}

/// A Winograd forward's transformed filter and input (each a `Vec<T>`), see [`FoldedConv::kept`].
///
/// The input gradient reads the same filter transform, and the filter gradient the same input
/// transform: one memory-bound pass less each per layer and step (16 MB for a 512-channel filter; 4x
/// the layer's input for the input), for holding them from the forward to the backward.
#[derive(Default)]
struct Kept {
    filter: Option<Box<dyn std::any::Any + Send>>,
    input: Option<Box<dyn std::any::Any + Send>>,
}

impl FoldedConv {
    fn run<T: WithDType>(&self, x: &[T], w: &[T]) -> (CpuStorage, Shape) {
        let g = self.geom;
        let ckk = g.c * g.kh * g.kw;
        let o = w.len() / ckk;
        let (oh, ow) = g.out_hw();
        let l = oh * ow;
        let n = x.len() / (g.c * g.h * g.w);
        if winograd::serves::<T>(g, o) {
            let u = winograd::filter_transform(w, o, g.c);
            let e = self.epilogue.as_ref();
            let (out, v) = winograd::forward_with(g, x, &u, o, e, self.keep_input);
            if let Ok(mut kept) = self.kept.lock() {
                *kept = Kept {
                    filter: self
                        .keep_filter
                        .then(|| Box::new(u) as Box<dyn std::any::Any + Send>),
                    input: v.map(|v| Box::new(v) as Box<dyn std::any::Any + Send>),
                };
            }
            return (T::to_cpu_storage_owned(out), Shape::from((n, o, oh, ow)));
        }
        if shifted::applies::<T>(g) {
            let out = shifted::forward(g, x, w, o, self.epilogue.as_ref());
            return (T::to_cpu_storage_owned(out), Shape::from((n, o, oh, ow)));
        }
        if image_by_image::<T>(g) {
            let out = forward_image_by_image(g, x, &tap_major(w, o, g), o, self.epilogue.as_ref());
            return (T::to_cpu_storage_owned(out), Shape::from((n, o, oh, ow)));
        }
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
            par,
        );
        drop(cols);
        // [O, N * L] -> [N, O, L], with the epilogue if any.
        let out = par_zeroed(n * o * l, l, |p, dst: &mut [T]| {
            let (b, oc) = (p / o, p % o);
            dst.copy_from_slice(&y[(oc * n + b) * l..(oc * n + b + 1) * l]);
            if let Some(e) = &self.epilogue {
                e.apply(oc, dst);
            }
        });
        (T::to_cpu_storage_owned(out), Shape::from((n, o, oh, ow)))
    }
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

/// `dst [cols, rows] = src [rows, cols]^T`, in square tiles so that both sides stay in cache (a
/// row-by-row transpose strides through `dst` a whole column apart at every value).
#[inline(always)]
pub(super) fn transpose_into<T: Copy>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    const TILE: usize = 16;
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                let out = &mut dst[c * rows + r0..c * rows + r1];
                for (d, r) in out.iter_mut().zip(r0..r1) {
                    *d = src[r * cols + c];
                }
            }
        }
    }
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
const IMAGE_BY_IMAGE_BYTES: usize = 1 << 20;

/// Whether `g` runs image by image: a column matrix above [`IMAGE_BY_IMAGE_BYTES`] per image, in a
/// dtype the GEMM crate computes natively.
fn image_by_image<T: WithDType>(g: Geom) -> bool {
    let (oh, ow) = g.out_hw();
    g.c * g.kh * g.kw * oh * ow * std::mem::size_of::<T>() > IMAGE_BY_IMAGE_BYTES
        && matches!(T::DTYPE, DType::F32 | DType::F64)
}

/// [`FoldedConv`] image by image (see [`IMAGE_BY_IMAGE_BYTES`]): per chunk of images (one per thread),
/// each band of output rows of each image unfolded into the thread's column buffer and multiplied
/// straight into those rows of the image's output `[O, OH * OW]`, which is already NCHW: no layout pass.
fn forward_image_by_image<T: WithDType>(
    g: Geom,
    x: &[T],
    wm: &[T],
    o: usize,
    epilogue: Option<&Epilogue>,
) -> Vec<T> {
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
                    par,
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

impl CustomOp2 for FoldedConv {
    fn name(&self) -> &'static str {
        "graft-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch2!(self, s1, l1, s2, l2)
    }

    /// Filter gradient `dY x cols^T` (only when the filter tracks a gradient) and input gradient
    /// `col2im(W^T x dY)` (only when the input does: not for the image, nor for a frozen group's output).
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.epilogue.is_some() {
            candle_core::bail!("graft-conv2d: the inference epilogue has no backward");
        }
        let g = self.geom;
        let grad = grad.contiguous()?;
        let kept = self
            .kept
            .lock()
            .map(|mut k| std::mem::take(&mut *k))
            .unwrap_or_default();
        let gw = if weight.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &FilterGrad(g, kept.input))?)
        } else {
            None
        };
        if !x.track_op() {
            return Ok((None, gw));
        }
        let dx = grad.apply_op2_no_bwd(weight, &InputGrad(g, kept.filter))?;
        Ok((Some(dx), gw))
    }
}

/// The filter gradient of [`FoldedConv`]: `(x [N, C, H, W], dY [N, O, OH, OW]) -> dW [O, C, KH, KW]`.
///
/// `dW = dY x cols` reduces over every image and output pixel. A GEMM parallelises over the rows and
/// columns of its result, which are few here (`O x K * K * C`) against a long reduction, so instead the
/// images are split into one chunk per thread ([`image_chunks`]): each thread unfolds only its own images
/// and runs a single-threaded GEMM over them, and the partial filters are summed. The columns are
/// pixel-major (`[pixels, K * K * C]`) so that the GEMM reads both operands along their rows: about 2x
/// faster on ResNet-18's shapes than reading the channel-major columns transposed. Only a chunk's columns
/// are in memory at a time.
struct FilterGrad(Geom, Option<Box<dyn std::any::Any + Send>>);

impl FilterGrad {
    fn run<T: WithDType>(&self, x: &[T], grad: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane_c, l, taps) = (g.c * g.h * g.w, oh * ow, g.kh * g.kw);
        let ckk = g.c * taps;
        let n = x.len() / plane_c;
        let o = grad.len() / (n * l).max(1);
        if winograd::serves_filter_grad::<T>(g, o) {
            let kept = self.1.as_ref().and_then(|v| v.downcast_ref::<Vec<T>>());
            let dw = winograd::filter_grad_with(g, x, kept.map(|v| &v[..]), grad, o);
            return (
                T::to_cpu_storage_owned(dw),
                Shape::from((o, g.c, g.kh, g.kw)),
            );
        }
        if shifted::applies::<T>(g) {
            let dw = shifted::filter_grad(g, x, grad, o);
            return (
                T::to_cpu_storage_owned(dw),
                Shape::from((o, g.c, g.kh, g.kw)),
            );
        }
        // Image by image for large images (see `IMAGE_BY_IMAGE_BYTES`), else the whole chunk at once.
        let by_image = image_by_image::<T>(g);
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
                            gemm::Parallelism::None,
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
                    gemm::Parallelism::None,
                )
            })
            .collect();
        let mut sum = partials.into_iter();
        let mut dw = sum.next().unwrap_or_else(|| vec![T::from_f64(0.); o * ckk]);
        for p in sum {
            dw.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
        }
        // [O, taps, C] -> [O, C, KH, KW]
        let out = transpose_blocks(&dw, o, taps, g.c);
        (
            T::to_cpu_storage_owned(out),
            Shape::from((o, g.c, g.kh, g.kw)),
        )
    }
}

impl_forward_only_op2!(FilterGrad, "graft-conv2d-filter-grad");

/// The input gradient of [`FoldedConv`]: `(dY [N, O, OH, OW], weight [O, C, KH, KW]) -> dX [N, C, H, W]`.
///
/// Per chunk of images (one per thread): the pixel-major columns' gradient `dY^T [pixels, O] x W
/// [O, K * K * C]`, a single-threaded GEMM reading both operands along their rows (about 1.6x faster
/// than `W^T x dY` on ResNet-18's shapes), folded back into the chunk's images by
/// [`col2im_pixel_major`].
struct InputGrad(Geom, Option<Box<dyn std::any::Any + Send>>);

impl InputGrad {
    fn run<T: WithDType>(&self, grad: &[T], w: &[T]) -> (CpuStorage, Shape) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane_c, l) = (g.c * g.h * g.w, oh * ow);
        let ckk = g.c * g.kh * g.kw;
        let o = w.len() / ckk;
        let n = grad.len() / (o * l).max(1);
        if winograd::serves::<T>(g, o) {
            let kept = self.1.as_ref().and_then(|u| u.downcast_ref::<Vec<T>>());
            let dx = match kept {
                Some(u) => winograd::input_grad_with(g, grad, u, o),
                None => winograd::input_grad(g, grad, w, o),
            };
            return (T::to_cpu_storage_owned(dx), Shape::from((n, g.c, g.h, g.w)));
        }
        if shifted::applies::<T>(g) {
            let dx = shifted::input_grad(g, grad, w, o);
            return (T::to_cpu_storage_owned(dx), Shape::from((n, g.c, g.h, g.w)));
        }
        let wm = tap_major(w, o, g);
        let chunks = image_chunks(n);
        let per = chunks.first().map_or(1, |c| c.1);
        let out = par_zeroed(n * plane_c, per * plane_c, |i, dst: &mut [T]| {
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
                gemm::Parallelism::None,
            );
            col2im_pixel_major(g, &gcols, dst);
        });
        (
            T::to_cpu_storage_owned(out),
            Shape::from((n, g.c, g.h, g.w)),
        )
    }
}

impl_forward_only_op2!(InputGrad, "graft-conv2d-input-grad");

/// Splits `n` images into one contiguous chunk per rayon thread, as `(first image, images)`; every chunk
/// but the last has the same size.
pub(super) fn image_chunks(n: usize) -> Vec<(usize, usize)> {
    let per = n
        .div_ceil(rayon::current_num_threads().clamp(1, n.max(1)))
        .max(1);
    (0..n)
        .step_by(per)
        .map(|b0| (b0, per.min(n - b0)))
        .collect()
}

/// The GEMM threading inside one chunk of images: single-threaded when there is a chunk per thread,
/// else (fewer images than threads) the GEMM's own.
pub(super) fn inner_parallelism(chunks: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if chunks >= threads || threads < 2 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

/// Where a matrix lies in a slice: element `(i, j)` at `offset + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub(super) struct View {
    pub(super) offset: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl View {
    pub(super) fn strided(offset: usize, rs: usize, cs: usize) -> Self {
        Self { offset, rs, cs }
    }

    /// Whether a `rows x cols` matrix at this view stays inside `len` values.
    fn fits(&self, rows: usize, cols: usize, len: usize) -> bool {
        rows == 0 || cols == 0 || self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs < len
    }
}

/// `dst [m, n] (+)= lhs [m, k] x rhs [k, n]` on the GEMM crate's kernels with `par` threads
/// (`Parallelism::None`: the calling thread): added to `dst` when `accumulate`, else written over it.
/// f32 and f64 only (the crate's native types); panics if a view runs past its slice.
pub(super) fn gemm_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, d): (&mut [T], View),
    accumulate: bool,
    (lhs, l): (&[T], View),
    (rhs, r): (&[T], View),
    par: gemm::Parallelism,
) {
    assert!(
        matches!(T::DTYPE, DType::F32 | DType::F64),
        "gemm_into: {:?} is not a GEMM kernel type",
        T::DTYPE
    );
    assert!(
        d.fits(m, n, dst.len()) && l.fits(m, k, lhs.len()) && r.fits(k, n, rhs.len()),
        "gemm_into: a view runs past its values"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: T is f32 or f64 (the GEMM crate's own kernels), and the assertion above keeps every
    // element of the three views inside its slice; `dst` is borrowed mutably, so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(d.offset),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr().add(l.offset),
            l.cs as isize,
            l.rs as isize,
            rhs.as_ptr().add(r.offset),
            r.cs as isize,
            r.rs as isize,
            T::from_f64(1.),
            T::from_f64(1.),
            false,
            false,
            false,
            par,
        )
    }
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
    par: gemm::Parallelism,
) -> Vec<T> {
    if !matches!(T::DTYPE, DType::F32 | DType::F64) {
        let f32s = |v: &[T]| v.iter().map(|x| x.to_f64() as f32).collect::<Vec<f32>>();
        let (l, r) = (f32s(lhs.0), f32s(rhs.0));
        return product(m, n, k, (&l, lhs.1, lhs.2), (&r, rhs.1, rhs.2), par)
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
        par,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::test_support::{gradient_gaps, max_abs};
    use candle_core::{DType, Device, Var};

    /// (in, out, h, w, kernel, padding, stride): ResNet's stem, 3x3 at stride 1 and 2, 1x1 at stride 1
    /// and 2, odd and non-square sizes; then four large enough for the shifted GEMMs ([`shifted`]):
    /// padded, unpadded with junk columns, 1x1 (neither), and 5x5; and two that run image by image
    /// (over [`IMAGE_BY_IMAGE_BYTES`] of columns per image): the stem at 96x96, and a 3x3 at stride 2.
    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 15] = [
        (256, 16, 6, 6, 3, 1, 1),
        (512, 8, 4, 4, 1, 0, 2),
        (3, 8, 20, 20, 7, 3, 2),
        (8, 8, 9, 9, 3, 1, 1),
        (8, 16, 9, 9, 3, 1, 2),
        (8, 16, 8, 8, 1, 0, 2),
        (8, 16, 8, 8, 1, 0, 1),
        (3, 2, 6, 7, 1, 0, 1),
        (2, 3, 11, 9, 5, 0, 2),
        (16, 8, 16, 16, 3, 1, 1),
        (16, 4, 19, 18, 3, 0, 1),
        (20, 6, 16, 17, 1, 0, 1),
        (16, 5, 16, 17, 5, 2, 1),
        (3, 8, 96, 96, 7, 3, 2),
        (64, 8, 48, 48, 3, 1, 2),
    ];

    fn geom(c: usize, h: usize, w: usize, k: usize, padding: usize, stride: usize) -> Geom {
        Geom {
            c,
            h,
            w,
            kh: k,
            kw: k,
            padding,
            stride,
        }
    }

    #[test]
    fn f32_forward_rounds_like_candle_conv2d() {
        let dev = Device::Cpu;
        for (ci, co, h, w, k, p, s) in CASES {
            let x = Tensor::randn(0f32, 1., (3, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (co, ci, k, k), &dev).unwrap();
            let ours = conv2d(&x, &wt, p, s).unwrap();
            let theirs = x.conv2d(&wt, p, s, 1, 1).unwrap();
            let what = format!("{ci}->{co} {h}x{w} k{k} p{p} s{s}");
            assert_eq!(ours.dims(), theirs.dims(), "{what}");
            assert_eq!(ours.dtype(), DType::F32);
            let gap = max_abs(&ours, &theirs);
            if ci * k * k <= 147 && !shifted::applies::<f32>(geom(ci, h, w, k, p, s)) {
                // Short reductions (ResNet's stem: 3 x 7 x 7) sum in candle's order exactly.
                assert_eq!(gap, 0.0, "{what}");
            } else {
                let scale = max_abs(&theirs, &theirs.zeros_like().unwrap());
                assert!(gap <= 1e-5 * scale, "{what}: {gap} of {scale}");
            }
        }
    }

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        let dev = Device::Cpu;
        for (ci, co, h, w, k, p, s) in CASES {
            let x = Var::randn(0f64, 1., (2, ci, h, w), &dev).unwrap();
            let wt = Var::randn(0f64, 1., (co, ci, k, k), &dev).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            let what = format!("{ci}->{co} {h}x{w} k{k} p{p} s{s}");
            assert_eq!(ours.dims(), theirs.dims(), "{what}");
            assert!(max_abs(&ours, &theirs) < 1e-10, "forward {what}");
            let probe = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
            for gap in gradient_gaps(&ours, &theirs, &probe, &[&x, &wt]) {
                assert!(gap < 1e-10, "gradient {what}");
            }
        }
    }

    #[test]
    fn shift_and_clamp_epilogue_matches_the_separate_ops() {
        // Batched im2col, shifted GEMMs, image-by-image im2col.
        for (c, size, stride) in [(4, 7, 2), (16, 16, 1), (64, 48, 2)] {
            shift_and_clamp_case(c, size, stride);
        }
    }

    fn shift_and_clamp_case(c: usize, size: usize, stride: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, c, size, size), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1., (5, c, 3, 3), &dev).unwrap();
        let shift = vec![-1.0, -0.5, 0.0, 0.5, 1.0];
        let shifted = conv2d(&x, &wt, 1, stride)
            .unwrap()
            .broadcast_add(
                &Tensor::new(&[-1f32, -0.5, 0.0, 0.5, 1.0], &dev)
                    .unwrap()
                    .reshape((1, 5, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        for max in [None, Some(f64::INFINITY), Some(2.)] {
            let e = Epilogue {
                shift: shift.clone(),
                max,
            };
            let ours = conv2d_shift_clamp(&x, &wt, 1, stride, e).unwrap();
            let theirs = match max {
                None => shifted.clone(),
                Some(m) => shifted.clamp(0f32, m as f32).unwrap(),
            };
            assert_eq!(max_abs(&ours, &theirs), 0.0, "{max:?}");
        }
    }

    #[test]
    fn an_input_without_gradient_gets_none_computed() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev).unwrap();
        let wt = Var::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap();
        let y = conv2d(&x, wt.as_tensor(), 1, 1).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert_eq!(grads.get(wt.as_tensor()).unwrap().dims(), &[4, 3, 3, 3]);
    }
}
