//! What the kernels share: dtype checks and the float-dtype dispatch of custom ops, a convolution's
//! geometry and inference epilogue, and the GEMM helpers (views, transposes, the batch cut into one chunk
//! of images per thread).
//!
//! The bottom of the kernels' import graph: it imports no other kernel module.

pub(super) use super::matrix::View;
use super::precision::Precision;
use crate::{Error, Result};
use candle_core::{CpuStorage, DType, Layout, Tensor, WithDType};

/// Checks that `t` has a float dtype the CPU kernels handle.
pub(super) fn check_float(t: &Tensor, op: &str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::config(
            format!("{op} input dtype"),
            format!("{other:?} is not a float type"),
        )),
    }
}

/// Zero padding per side of a convolution's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding2d {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding2d {
    /// `p` on every side.
    pub fn symmetric(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// What an inference convolution applies to each output value: `+ shift[channel]`, then a clamp to
/// `[0, max]` when `max` is given (a folded BatchNorm and its ReLU / ReLU6), or else the smooth activation
/// when `smooth` is given (SiLU, hard-swish), while the plane is still in cache.
#[derive(Debug, Clone)]
pub(crate) struct Epilogue {
    pub(crate) shift: Vec<f64>,
    pub(crate) max: Option<f64>,
    pub(crate) smooth: Option<super::activation::Smooth>,
}

impl Epilogue {
    /// `+ shift[channel]` alone (a convolution's bias), read from a `[C]` tensor.
    pub(crate) fn shift(shift: &Tensor) -> Result<Self> {
        Ok(Self {
            shift: shift
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?,
            max: None,
            smooth: None,
        })
    }

    /// The epilogue on a whole `[N, C, H, W]` output in candle ops (devices without the kernel).
    pub(super) fn apply_composed(&self, y: &Tensor) -> Result<Tensor> {
        let c = self.shift.len();
        let shift = Tensor::new(self.shift.as_slice(), y.device())?
            .to_dtype(y.dtype())?
            .reshape((1, c, 1, 1))?;
        let y = y.broadcast_add(&shift)?;
        Ok(match self.max {
            None => match self.smooth {
                Some(f) => f.composed(&y)?,
                None => y,
            },
            Some(max) if max.is_infinite() => y.relu()?,
            Some(max) => y.clamp(0f64, max)?,
        })
    }

    /// Applies the epilogue of channel `ch` to `plane` in place.
    pub(super) fn apply<T: WithDType>(&self, ch: usize, plane: &mut [T]) {
        let (zero, shift) = (T::from_f64(0.), T::from_f64(self.shift[ch]));
        match self.max.map(T::from_f64) {
            None => match self.smooth {
                Some(f) => plane.iter_mut().for_each(|v| *v = f.value_of(*v + shift)),
                None => plane.iter_mut().for_each(|v| *v += shift),
            },
            Some(max) => plane.iter_mut().for_each(|v| {
                let z = *v + shift;
                *v = if z > zero {
                    if z < max {
                        z
                    } else {
                        max
                    }
                } else {
                    zero
                };
            }),
        }
    }
}

/// The geometry of a convolution: input channels and size, filter size, symmetric zero padding and stride
/// (dilation 1).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) padding: usize,
    pub(super) stride: usize,
    /// What its GEMMs multiply in: the [`super::precision::autocast`] scope the op was built in.
    pub(super) precision: Precision,
}

impl Geom {
    /// The geometry of `x` `[N, C, H, W]` under a filter `weight` `[_, _, KH, KW]`.
    pub(super) fn of(
        x: &Tensor,
        weight: &Tensor,
        padding: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        let (_, c, h, w) = x.dims4()?;
        let (_, _, kh, kw) = weight.dims4()?;
        Ok(Self {
            c,
            h,
            w,
            kh,
            kw,
            padding,
            stride,
            precision: super::precision::for_convolution(c),
        })
    }

    pub(super) fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.kh) / self.stride + 1,
            (self.w + 2 * self.padding - self.kw) / self.stride + 1,
        )
    }

    /// Input row of output row `oy` at filter row `ky`, if inside the image.
    #[inline]
    pub(super) fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.padding)
            .filter(|&y| y < self.h)
    }

    /// Output columns `lo..hi` whose input column `ox * stride + kx - padding` is inside the image.
    #[inline]
    pub(super) fn col_range(&self, kx: usize, ow: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if self.padding > kx {
            (self.padding - kx).div_ceil(s)
        } else {
            0
        };
        let hi = if self.w + self.padding > kx {
            ((self.w - 1 + self.padding - kx) / s + 1).min(ow)
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// Calls `f(run)` for every output row of one plane whose filter tap `tap` (`ky * kw + kx`) falls
    /// inside the image.
    #[inline(always)]
    pub(super) fn for_each_run_of_tap(&self, tap: usize, mut f: impl FnMut(Run)) {
        let (oh, ow) = self.out_hw();
        let (ky, kx) = (tap / self.kw, tap % self.kw);
        let (lo, hi) = self.col_range(kx, ow);
        if lo >= hi {
            return;
        }
        for oy in 0..oh {
            if let Some(iy) = self.in_row(oy, ky) {
                f(Run {
                    out: oy * ow + lo,
                    inp: iy * self.w + lo * self.stride + kx - self.padding,
                    len: hi - lo,
                });
            }
        }
    }
}

/// A row segment of one filter tap: outputs `out..out + len` of a plane read inputs
/// `inp + j * stride` (see [`Geom::for_each_run_of_tap`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    pub(super) out: usize,
    pub(super) inp: usize,
    pub(super) len: usize,
}

/// Input span of a run: from `inp`, `len` taps `stride` apart.
#[inline]
pub(super) fn span(r: Run, stride: usize) -> std::ops::Range<usize> {
    r.inp..r.inp + (r.len - 1) * stride + 1
}

pub(super) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Dispatches a one-input kernel over the float dtypes: `run(x, extra...)`.
macro_rules! dispatch1 {
    ($self:ident, $s:ident, $l:ident, $($extra:expr),*) => {{
        use $crate::kernels::common::contiguous_slice;
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage;
        let name = $self.name();
        match $s {
            CpuStorage::F32(_) => Ok($self.run(contiguous_slice::<f32>($s, $l, name)?, $($extra),*)),
            CpuStorage::F64(_) => Ok($self.run(contiguous_slice::<f64>($s, $l, name)?, $($extra),*)),
            CpuStorage::F16(_) => Ok($self.run(contiguous_slice::<half::f16>($s, $l, name)?, $($extra),*)),
            CpuStorage::BF16(_) => Ok($self.run(contiguous_slice::<half::bf16>($s, $l, name)?, $($extra),*)),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", $s.dtype()),
        }
    }};
}
pub(super) use dispatch1;

/// Dispatches a two-input kernel over the float dtypes: `run(x1, x2, extra...)`.
macro_rules! dispatch2 {
    ($self:ident, $s1:ident, $l1:ident, $s2:ident, $l2:ident $(, $arg:expr)*) => {{
        use $crate::kernels::common::contiguous_slice;
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage;
        let name = $self.name();
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => Ok($self.run(
                contiguous_slice::<f32>($s1, $l1, name)?,
                contiguous_slice::<f32>($s2, $l2, name)?,
                $($arg),*
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => Ok($self.run(
                contiguous_slice::<f64>($s1, $l1, name)?,
                contiguous_slice::<f64>($s2, $l2, name)?,
                $($arg),*
            )),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => Ok($self.run(
                contiguous_slice::<half::f16>($s1, $l1, name)?,
                contiguous_slice::<half::f16>($s2, $l2, name)?,
                $($arg),*
            )),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => Ok($self.run(
                contiguous_slice::<half::bf16>($s1, $l1, name)?,
                contiguous_slice::<half::bf16>($s2, $l2, name)?,
                $($arg),*
            )),
            _ => candle_core::bail!(
                "{name}: unsupported or mixed dtypes {:?}, {:?}",
                $s1.dtype(),
                $s2.dtype()
            ),
        }
    }};
}
pub(super) use dispatch2;

/// Dispatches a three-input kernel over the float dtypes: `run(x1, x2, x3, extra...)`.
macro_rules! dispatch3 {
    ($self:ident, $s1:ident, $l1:ident, $s2:ident, $l2:ident, $s3:ident, $l3:ident $(, $arg:expr)*) => {{
        use $crate::kernels::common::contiguous_slice;
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage;
        let name = $self.name();
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => Ok($self.run(
                contiguous_slice::<f32>($s1, $l1, name)?,
                contiguous_slice::<f32>($s2, $l2, name)?,
                contiguous_slice::<f32>($s3, $l3, name)?,
                $($arg),*
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => Ok($self.run(
                contiguous_slice::<f64>($s1, $l1, name)?,
                contiguous_slice::<f64>($s2, $l2, name)?,
                contiguous_slice::<f64>($s3, $l3, name)?,
                $($arg),*
            )),
            (CpuStorage::F16(_), CpuStorage::F16(_), CpuStorage::F16(_)) => Ok($self.run(
                contiguous_slice::<half::f16>($s1, $l1, name)?,
                contiguous_slice::<half::f16>($s2, $l2, name)?,
                contiguous_slice::<half::f16>($s3, $l3, name)?,
                $($arg),*
            )),
            (CpuStorage::BF16(_), CpuStorage::BF16(_), CpuStorage::BF16(_)) => Ok($self.run(
                contiguous_slice::<half::bf16>($s1, $l1, name)?,
                contiguous_slice::<half::bf16>($s2, $l2, name)?,
                contiguous_slice::<half::bf16>($s3, $l3, name)?,
                $($arg),*
            )),
            _ => candle_core::bail!(
                "{name}: unsupported or mixed dtypes {:?}, {:?}, {:?}",
                $s1.dtype(),
                $s2.dtype(),
                $s3.dtype()
            ),
        }
    }};
}
pub(super) use dispatch3;

/// `impl CustomOp2` for an op with no backward of its own (a gradient op): its name, and `cpu_fwd`
/// running its `run::<T>` through [`dispatch2!`].
macro_rules! impl_forward_only_op2 {
    ($ty:ty, $name:literal) => {
        impl candle_core::CustomOp2 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::kernels::common::dispatch2!(self, s1, l1, s2, l2)
            }
        }
    };
}
pub(super) use impl_forward_only_op2;

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

/// `dst [m, n] (+)= lhs [m, k] x rhs [k, n]` on the GEMM crate's kernels with `par` threads
/// (`Parallelism::None`: the calling thread): added to `dst` when `accumulate`, else written over it.
/// f32 and f64 only (the crate's native types); panics if a view runs past its slice. In
/// [`Precision::Bf16`], f32 products run on [`super::bf16::gemm`] where the CPU has it (f64 stays f64).
pub(super) fn gemm_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, d): (&mut [T], View),
    accumulate: bool,
    (lhs, l): (&[T], View),
    (rhs, r): (&[T], View),
    (precision, par): (Precision, gemm::Parallelism),
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
    if precision == Precision::Bf16 && T::DTYPE == DType::F32 && super::bf16::available() {
        let threads = match par {
            gemm::Parallelism::Rayon(t) => t.max(1),
            gemm::Parallelism::None => 1,
        };
        // SAFETY: T is f32 (checked just above), so the slices reinterpret as what they hold.
        let (dst, lhs, rhs) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut f32, dst.len()),
                std::slice::from_raw_parts(lhs.as_ptr() as *const f32, lhs.len()),
                std::slice::from_raw_parts(rhs.as_ptr() as *const f32, rhs.len()),
            )
        };
        super::bf16::gemm((m, n, k), (dst, d), accumulate, (lhs, l), (rhs, r), threads);
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
