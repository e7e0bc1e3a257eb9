//! A GEMM that multiplies in bf16 and accumulates in f32: f32 matrices in and out (any strides), their
//! values rounded to bf16 (nearest even) while they are packed, multiplied by AVX512-BF16's `vdpbf16ps`.
//!
//! `vdpbf16ps` multiplies pairs of bf16 and adds both products to one f32 lane: 32 multiply-adds per
//! instruction against 16 for an f32 FMA, at the same issue rate (on AMD Zen 4 and Intel since Cooper
//! Lake). So the packed operands hold, for each pair of reduction indices `(2p, 2p + 1)`, both values
//! side by side in one 32-bit word: A broadcasts a row's word, B holds one word per output column.
//!
//! Blocking as in GotoBLAS/BLIS: a `KC`-deep block of B (`NC` columns) is packed once and stays in L2,
//! a `MC x KC` block of A is packed per B block, and the `MR x NR` micro-kernel keeps its 16 f32 column
//! vectors of C in registers while it streams one B micro-panel (16 KB, in L1) against A's.

use super::matrix::View;

/// Rows of C per micro-kernel.
const MR: usize = 8;
/// Columns of C per micro-kernel: two 16-lane vectors.
const NR: usize = 32;
/// Reduction depth of a packed block (even: pairs).
const KC: usize = 256;
/// Rows of A per packed block (a multiple of `MR`).
const MC: usize = 64;
/// Columns of B per packed block (a multiple of `NR`).
const NC: usize = 1024;

/// Whether the CPU has what [`gemm`] runs on (AVX512-F/BW and AVX512-BF16) and `GRAFT_SIMD` allows
/// AVX-512.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            super::simd::level() == super::simd::Level::Avx512
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 bits of `x`, rounded to nearest even (NaN stays NaN), as `vcvtne2ps2bf16` rounds.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    half::bf16::from_f32(x).to_bits() as u32
}

/// `dst [m, n] (+)= lhs [m, k] x rhs [k, n]` with bf16 products and f32 sums; the contract of
/// `common::gemm_into` (views checked by the caller), on `threads` threads (1: the calling thread).
///
/// # Panics
/// If [`available`] is false.
pub(super) fn gemm(
    (m, n, k): (usize, usize, usize),
    (dst, d): (&mut [f32], View),
    accumulate: bool,
    (lhs, l): (&[f32], View),
    (rhs, r): (&[f32], View),
    threads: usize,
) {
    assert!(available(), "bf16::gemm: the CPU has no AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    // The kernel stores rows of C along its columns: a column-major C is the transposed product.
    if d.cs != 1 && d.rs == 1 {
        let t = |v: View| View::strided(v.offset, v.cs, v.rs);
        return gemm(
            (n, m, k),
            (dst, t(d)),
            accumulate,
            (rhs, t(r)),
            (lhs, t(l)),
            threads,
        );
    }
    if d.cs != 1 {
        // Neither rows nor columns contiguous (one tap of a filter gradient): the product goes to a
        // contiguous buffer, then once into C, instead of a strided read-modify-write of every tile
        // per reduction block.
        let mut tmp = vec![0f32; m * n];
        let tv = View::strided(0, n, 1);
        gemm(
            (m, n, k),
            (&mut tmp, tv),
            false,
            (lhs, l),
            (rhs, r),
            threads,
        );
        for i in 0..m {
            for (j, &v) in tmp[i * n..(i + 1) * n].iter().enumerate() {
                let at = &mut dst[d.offset + i * d.rs + j * d.cs];
                *at = if accumulate { *at + v } else { v };
            }
        }
        return;
    }
    let c = Out {
        ptr: dst.as_mut_ptr(),
        view: d,
    };
    let a = In { s: lhs, view: l };
    let b = In { s: rhs, view: r };
    if threads <= 1 || m * n * k < 1 << 18 {
        serial(m, n, k, c, accumulate, a, b, 0..m, 0..n);
        return;
    }
    // Split the longer side into one range per thread, in whole micro-kernel tiles.
    let (along_n, len, unit) = if n >= m {
        (true, n, NR)
    } else {
        (false, m, MR)
    };
    let per = len.div_ceil(threads).div_ceil(unit) * unit;
    rayon::scope(|s| {
        for start in (0..len).step_by(per) {
            let end = (start + per).min(len);
            s.spawn(move |_| {
                let (rows, cols) = if along_n {
                    (0..m, start..end)
                } else {
                    (start..end, 0..n)
                };
                serial(m, n, k, c, accumulate, a, b, rows, cols);
            });
        }
    });
}

/// An input matrix: its values and where it lies in them.
#[derive(Clone, Copy)]
struct In<'a> {
    s: &'a [f32],
    view: View,
}

impl In<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.s[self.view.offset + i * self.view.rs + j * self.view.cs]
    }
}

/// The output matrix, written through a pointer so that threads can fill disjoint tiles of it.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    view: View,
}

// SAFETY: the threads of [`gemm`] write disjoint row or column ranges of C, and the `&mut` borrow of
// `dst` it was made from outlives the scope they run in.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// C's `rows x cols` part on the calling thread, block by block.
#[allow(clippy::too_many_arguments)]
fn serial(
    m: usize,
    n: usize,
    k: usize,
    c: Out,
    accumulate: bool,
    a: In,
    b: In,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    debug_assert!(rows.end <= m && cols.end <= n);
    if k == 0 {
        if !accumulate {
            for i in rows {
                for j in cols.clone() {
                    // SAFETY: (i, j) lies inside C, whose view the caller checked.
                    unsafe { *c.ptr.add(c.view.offset + i * c.view.rs + j * c.view.cs) = 0.0 };
                }
            }
        }
        return;
    }
    // The packed blocks, reused by every call on this thread: fresh ones cost a page fault and the
    // kernel's zeroing per page (14% of a ResNet-18 training step's samples, and 6% memset).
    thread_local! {
        static PACKED: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }
    let (mut pb, mut pa) = PACKED.with(|c| c.take());
    let mut tile = [0f32; MR * NR];
    for j0 in cols.clone().step_by(NC) {
        let nc = NC.min(cols.end - j0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let kp = kc.div_ceil(2);
            pack_b(b, k0, kc, j0, nc, &mut pb);
            let add = accumulate || k0 > 0;
            for i0 in rows.clone().step_by(MC) {
                let mc = MC.min(rows.end - i0);
                pack_a(a, i0, mc, k0, kc, &mut pa);
                for q in 0..nc.div_ceil(NR) {
                    let bp = &pb[q * NR * kp..(q + 1) * NR * kp];
                    for rr in 0..mc.div_ceil(MR) {
                        let ap = &pa[rr * MR * kp..(rr + 1) * MR * kp];
                        let (i, j) = (i0 + rr * MR, j0 + q * NR);
                        let (h, w) = (MR.min(i0 + mc - i), NR.min(j0 + nc - j));
                        if h == MR && w == NR && c.view.cs == 1 {
                            // SAFETY: `available()` was checked by `gemm`; both panels hold `kp`
                            // words per row/column; the whole tile lies inside C (checked by the
                            // caller's view), rows `c.view.rs` apart, and no other thread writes it.
                            unsafe {
                                micro(
                                    kp,
                                    ap.as_ptr(),
                                    bp.as_ptr(),
                                    (c.ptr.add(c.view.offset + i * c.view.rs + j), c.view.rs),
                                    add,
                                )
                            };
                            continue;
                        }
                        // SAFETY: as above, into the tile buffer (NR values per row).
                        unsafe {
                            micro(kp, ap.as_ptr(), bp.as_ptr(), (tile.as_mut_ptr(), NR), false)
                        };
                        store(&tile, c, (i, j), (h, w), add);
                    }
                }
            }
        }
    }
    PACKED.with(|c| c.set((pb, pa)));
}

/// Packs `B[k0..k0 + kc, j0..j0 + nc]` into `out`: per panel of `NR` columns, per pair `p`, the `NR`
/// words `(B[k0 + 2p, j], B[k0 + 2p + 1, j])` (zeros past the matrix).
fn pack_b(b: In, k0: usize, kc: usize, j0: usize, nc: usize, out: &mut Vec<u32>) {
    let kp = kc.div_ceil(2);
    let panels = nc.div_ceil(NR);
    if out.len() < panels * NR * kp {
        out.resize(panels * NR * kp, 0);
    }
    for q in 0..panels {
        let panel = &mut out[q * NR * kp..(q + 1) * NR * kp];
        let (jq, width) = (j0 + q * NR, NR.min(nc - q * NR));
        if width < NR {
            panel.fill(0); // the columns past the matrix
        }
        if b.view.cs == 1 && width == NR {
            // Rows contiguous: two rows of 16 values convert and interleave per vector.
            for p in 0..kp {
                let r0 = b.view.offset + (k0 + 2 * p) * b.view.rs + jq;
                let row0 = &b.s[r0..r0 + NR];
                let row1 = if 2 * p + 1 < kc {
                    let r1 = r0 + b.view.rs;
                    Some(&b.s[r1..r1 + NR])
                } else {
                    None
                };
                // SAFETY: available() holds (checked by `gemm`); both rows hold NR values.
                unsafe { interleave_rows(row0, row1, &mut panel[p * NR..(p + 1) * NR]) };
            }
        } else if b.view.rs == 1 {
            // Columns contiguous: each column's run of values converts in pairs, in order; eight
            // columns at a time are transposed into the panel in registers.
            for j in (0..width).step_by(8) {
                let start = |jj: usize| b.view.offset + (jq + jj) * b.view.cs + k0;
                if j + 8 <= width {
                    let runs: [&[f32]; 8] =
                        std::array::from_fn(|r| &b.s[start(j + r)..start(j + r) + kc]);
                    // SAFETY: available() holds; the runs lie in `b.s`, the panel has NR words per pair.
                    unsafe { pairs_transposed(runs, &mut panel[j..], NR) };
                } else {
                    for jj in j..width {
                        // SAFETY: as above, one column.
                        unsafe {
                            pairs_strided(&b.s[start(jj)..start(jj) + kc], &mut panel[jj..], NR)
                        };
                    }
                }
            }
        } else {
            for j in 0..width {
                for p in 0..kp {
                    let lo = bf16_bits(b.at(k0 + 2 * p, jq + j));
                    let hi = if 2 * p + 1 < kc {
                        bf16_bits(b.at(k0 + 2 * p + 1, jq + j))
                    } else {
                        0
                    };
                    panel[p * NR + j] = lo | hi << 16;
                }
            }
        }
    }
}

/// Packs `A[i0..i0 + mc, k0..k0 + kc]` into `out`: per panel of `MR` rows, per pair `p`, the `MR` words
/// `(A[i, k0 + 2p], A[i, k0 + 2p + 1])` (zeros past the matrix).
fn pack_a(a: In, i0: usize, mc: usize, k0: usize, kc: usize, out: &mut Vec<u32>) {
    let kp = kc.div_ceil(2);
    let panels = mc.div_ceil(MR);
    if out.len() < panels * MR * kp {
        out.resize(panels * MR * kp, 0);
    }
    for rr in 0..panels {
        let panel = &mut out[rr * MR * kp..(rr + 1) * MR * kp];
        let rows = MR.min(mc - rr * MR);
        if rows < MR {
            panel.fill(0); // the rows past the matrix
        }
        if a.view.rs == 1 && rows == MR {
            // Columns contiguous (a transposed operand): two columns' MR values interleave per vector.
            let r0 = i0 + rr * MR;
            for p in 0..kp {
                let c0 = a.view.offset + (k0 + 2 * p) * a.view.cs + r0;
                let col1 = (2 * p + 1 < kc).then(|| &a.s[c0 + a.view.cs..c0 + a.view.cs + MR]);
                // SAFETY: available() holds; both columns hold MR values, the panel MR per pair.
                unsafe {
                    interleave_columns(&a.s[c0..c0 + MR], col1, &mut panel[p * MR..(p + 1) * MR])
                };
            }
            continue;
        }
        if a.view.cs != 1 && rows == MR {
            // Neither contiguous (one tap of a filter, `taps` apart): each row gathered into a
            // contiguous run first, then converted and transposed like contiguous rows.
            let mut gathered = [[0f32; KC]; MR];
            for (i, g) in gathered.iter_mut().enumerate() {
                for (q, v) in g[..kc].iter_mut().enumerate() {
                    *v = a.at(i0 + rr * MR + i, k0 + q);
                }
            }
            let runs: [&[f32]; MR] = std::array::from_fn(|i| &gathered[i][..kc]);
            // SAFETY: available() holds; the panel has MR words per pair.
            unsafe { pairs_transposed(runs, panel, MR) };
            continue;
        }
        if a.view.cs == 1 && rows == MR {
            // Rows contiguous: the MR rows' pairs transposed into the panel in registers.
            let start = |i: usize| a.view.offset + (i0 + rr * MR + i) * a.view.rs + k0;
            let runs: [&[f32]; MR] = std::array::from_fn(|i| &a.s[start(i)..start(i) + kc]);
            // SAFETY: available() holds; the runs lie in `a.s`, the panel has MR words per pair.
            unsafe { pairs_transposed(runs, panel, MR) };
            continue;
        }
        for i in 0..rows {
            let row = i0 + rr * MR + i;
            if a.view.cs == 1 {
                let start = a.view.offset + row * a.view.rs + k0;
                // SAFETY: available() holds; the row's run lies in `a.s`, the panel has `kp` words per row.
                unsafe { pairs_strided(&a.s[start..start + kc], &mut panel[i..], MR) };
            } else {
                for p in 0..kp {
                    let lo = bf16_bits(a.at(row, k0 + 2 * p));
                    let hi = if 2 * p + 1 < kc {
                        bf16_bits(a.at(row, k0 + 2 * p + 1))
                    } else {
                        0
                    };
                    panel[p * MR + i] = lo | hi << 16;
                }
            }
        }
    }
}

/// `out[j] = (bf16(row0[j]), bf16(row1[j]))` for `NR` columns (`row1` absent: zeros).
///
/// # Safety
/// The CPU must have AVX512-F/BW/BF16; `row0` (and `row1`) and `out` hold `NR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_rows(row0: &[f32], row1: Option<&[f32]>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    // out word j <- (lane j, lane 16 + j) of [row0's 16 | row1's 16].
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for h in 0..NR / 16 {
        let lo = _mm512_loadu_ps(row0.as_ptr().add(16 * h));
        let hi = match row1 {
            Some(r) => _mm512_loadu_ps(r.as_ptr().add(16 * h)),
            None => _mm512_setzero_ps(),
        };
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        let words = _mm512_permutexvar_epi16(idx, both);
        _mm512_storeu_si512(out.as_mut_ptr().add(16 * h) as *mut _, words);
    }
}

/// `out[q * stride] = (bf16(src[2q]), bf16(src[2q + 1]))` for every pair of `src` (an odd last value is
/// paired with zero).
///
/// # Safety
/// The CPU must have AVX512-F/BW/BF16; `out` holds `(src.len() / 2 rounded up - 1) * stride + 1` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs_strided(src: &[f32], out: &mut [u32], stride: usize) {
    use std::arch::x86_64::*;
    let pairs = src.len().div_ceil(2);
    debug_assert!(pairs == 0 || out.len() > (pairs - 1) * stride);
    let full = src.len() / 32;
    let mut words = [0u32; 16];
    for c in 0..full {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * c));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * c + 16));
        // The 32 bf16 in order: word q holds values 2q and 2q + 1.
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(words.as_mut_ptr() as *mut _, both);
        let o = out.as_mut_ptr().add(16 * c * stride);
        for (q, &w) in words.iter().enumerate() {
            *o.add(q * stride) = w;
        }
    }
    for q in 16 * full..pairs {
        let hi = src.get(2 * q + 1).map_or(0, |&v| bf16_bits(v));
        *out.get_unchecked_mut(q * stride) = bf16_bits(src[2 * q]) | hi << 16;
    }
}

/// `out[p * stride + r] = (bf16(runs[r][2p]), bf16(runs[r][2p + 1]))` for the eight runs (of one length)
/// and every pair: [`pairs_strided`] for eight runs at once, 32 values of each converted per step and the
/// 8 x 16 words transposed in registers, so the panel is written eight words at a time.
///
/// # Safety
/// The CPU must have AVX512-F/BW/VL/BF16; `out` holds `(pairs - 1) * stride + 8` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pairs_transposed(runs: [&[f32]; 8], out: &mut [u32], stride: usize) {
    use std::arch::x86_64::*;
    let len = runs[0].len();
    debug_assert!(runs.iter().all(|r| r.len() == len));
    let pairs = len.div_ceil(2);
    debug_assert!(pairs == 0 || out.len() >= (pairs - 1) * stride + 8);
    let full = len / 32;
    for c in 0..full {
        // Row r's 16 words (pairs 16c..16c + 16), as two halves of 8.
        let mut lo = [_mm256_setzero_si256(); 8];
        let mut hi = [_mm256_setzero_si256(); 8];
        for r in 0..8 {
            let src = runs[r].as_ptr().add(32 * c);
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(src.add(16)),
                _mm512_loadu_ps(src),
            ));
            lo[r] = _mm512_castsi512_si256(both);
            hi[r] = _mm512_extracti64x4_epi64::<1>(both);
        }
        for (half, rows) in [lo, hi].iter().enumerate() {
            let cols = transpose8(rows);
            for (q, col) in cols.iter().enumerate() {
                let p = 16 * c + 8 * half + q;
                _mm256_storeu_si256(out.as_mut_ptr().add(p * stride) as *mut _, *col);
            }
        }
    }
    for q in 16 * full..pairs {
        for (r, run) in runs.iter().enumerate() {
            let hi = run.get(2 * q + 1).map_or(0, |&v| bf16_bits(v));
            *out.get_unchecked_mut(q * stride + r) = bf16_bits(run[2 * q]) | hi << 16;
        }
    }
}

/// The 8 x 8 transpose of 32-bit words: `out[j]` holds word `j` of every `rows[r]`, in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8(rows: &[std::arch::x86_64::__m256i; 8]) -> [std::arch::x86_64::__m256i; 8] {
    use std::arch::x86_64::*;
    let r = rows;
    let t: [__m256i; 8] = [
        _mm256_unpacklo_epi32(r[0], r[1]),
        _mm256_unpackhi_epi32(r[0], r[1]),
        _mm256_unpacklo_epi32(r[2], r[3]),
        _mm256_unpackhi_epi32(r[2], r[3]),
        _mm256_unpacklo_epi32(r[4], r[5]),
        _mm256_unpackhi_epi32(r[4], r[5]),
        _mm256_unpacklo_epi32(r[6], r[7]),
        _mm256_unpackhi_epi32(r[6], r[7]),
    ];
    let u: [__m256i; 8] = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    [
        _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
        _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
    ]
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pairs_transposed(_: [&[f32]; 8], _: &mut [u32], _: usize) {
    unreachable!("bf16::available() is false off x86-64")
}

/// `out[i] = (bf16(col0[i]), bf16(col1[i]))` for `MR` rows (`col1` absent: zeros).
///
/// # Safety
/// The CPU must have AVX512-F/BW/VL/BF16; `col0` (and `col1`) and `out` hold `MR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn interleave_columns(col0: &[f32], col1: Option<&[f32]>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    const _: () = assert!(MR == 8, "one 256-bit vector per column");
    let idx = _mm256_set_epi16(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
    let lo = _mm256_loadu_ps(col0.as_ptr());
    let hi = match col1 {
        Some(c) => _mm256_loadu_ps(c.as_ptr()),
        None => _mm256_setzero_ps(),
    };
    let both: __m256i = std::mem::transmute(_mm256_cvtne2ps_pbh(hi, lo));
    let words = _mm256_permutexvar_epi16(idx, both);
    _mm256_storeu_si256(out.as_mut_ptr() as *mut _, words);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pairs_strided(_: &[f32], _: &mut [u32], _: usize) {
    unreachable!("bf16::available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_columns(_: &[f32], _: Option<&[f32]>, _: &mut [u32]) {
    unreachable!("bf16::available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_rows(_: &[f32], _: Option<&[f32]>, _: &mut [u32]) {
    unreachable!("bf16::available() is false off x86-64")
}

/// `C [MR, NR] (+)= A panel x B panel` over `kp` pairs, C's rows `ldc` apart (added to when `add`).
///
/// # Safety
/// The CPU must have AVX512-F/BF16; `a` holds `kp * MR` words, `b` `kp * NR`, and C `MR` rows of `NR`
/// values `ldc` apart that nothing else accesses meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro(
    kp: usize,
    a: *const u32,
    b: *const u32,
    (tile, ldc): (*mut f32, usize),
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut c = [_mm512_setzero_ps(); 2 * MR];
    if add {
        for (v, cv) in c.iter_mut().enumerate() {
            *cv = _mm512_loadu_ps(tile.add((v / 2) * ldc + 16 * (v % 2)));
        }
    }
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        for i in 0..MR {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + i) as i32));
            c[2 * i] = _mm512_dpbf16_ps(c[2 * i], ai, b0);
            c[2 * i + 1] = _mm512_dpbf16_ps(c[2 * i + 1], ai, b1);
        }
    }
    for (v, cv) in c.iter().enumerate() {
        _mm512_storeu_ps(tile.add((v / 2) * ldc + 16 * (v % 2)), *cv);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(_: usize, _: *const u32, _: *const u32, _: (*mut f32, usize), _: bool) {
    unreachable!("bf16::available() is false off x86-64")
}

/// Writes (or adds, when `add`) the `rows x cols` top-left part of `tile` into C at `(i, j)`.
fn store(
    tile: &[f32; MR * NR],
    c: Out,
    (i, j): (usize, usize),
    (rows, cols): (usize, usize),
    add: bool,
) {
    for r in 0..rows {
        let src = &tile[r * NR..r * NR + cols];
        let start = c.view.offset + (i + r) * c.view.rs + j * c.view.cs;
        // SAFETY: the tile's part lies inside C (the caller clips it to C's extent), whose view
        // `gemm_into` checked; threads write disjoint tiles.
        unsafe {
            if c.view.cs == 1 {
                let dst = std::slice::from_raw_parts_mut(c.ptr.add(start), cols);
                if add {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(src);
                }
            } else {
                for (q, s) in src.iter().enumerate() {
                    let d = c.ptr.add(start + q * c.view.cs);
                    *d = if add { *d + s } else { *s };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product in f64 of the bf16-rounded inputs: what the kernel computes up to f32 summation.
    fn reference(m: usize, n: usize, k: usize, a: &In, b: &In) -> Vec<f64> {
        let r = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| r(a.at(i, p)) * r(b.at(p, j))).sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                    / (1 << 24) as f32
                    - 0.5
            })
            .collect()
    }

    #[test]
    fn products_match_the_rounded_inputs_for_every_layout_edge_and_thread_count() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16");
            return;
        }
        // (m, n, k): tile edges in each direction, odd depths, several K and N blocks.
        for &(m, n, k) in &[
            (1, 1, 1),
            (8, 32, 2),
            (9, 33, 3),
            (17, 70, 257),
            (64, 1100, 300),
            (130, 40, 513),
        ] {
            let a_rm = values(m * k, 1);
            let b_rm = values(k * n, 2);
            // Each operand row-major and column-major (the same matrix), C row- and column-major.
            let a_cm: Vec<f32> = (0..m * k).map(|x| a_rm[(x % m) * k + x / m]).collect();
            let b_cm: Vec<f32> = (0..k * n).map(|x| b_rm[(x % k) * n + x / k]).collect();
            // And A with neither stride 1 (one tap of a filter): every value 3 apart, rows 3k + 1 apart.
            let mut a_st = vec![f32::NAN; m * (3 * k + 1) + 3];
            for i in 0..m {
                for p in 0..k {
                    a_st[1 + i * (3 * k + 1) + 3 * p] = a_rm[i * k + p];
                }
            }
            let a_views = [
                (&a_rm, View::strided(0, k, 1)),
                (&a_cm, View::strided(0, 1, m)),
                (&a_st, View::strided(1, 3 * k + 1, 3)),
            ];
            let b_views = [
                (&b_rm, View::strided(0, n, 1)),
                (&b_cm, View::strided(0, 1, k)),
            ];
            let want = reference(
                m,
                n,
                k,
                &In {
                    s: &a_rm,
                    view: a_views[0].1,
                },
                &In {
                    s: &b_rm,
                    view: b_views[0].1,
                },
            );
            for (a, av) in a_views {
                for (b, bv) in b_views {
                    for c_cm in [false, true] {
                        for threads in [1, 2] {
                            for accumulate in [false, true] {
                                let dv = if c_cm {
                                    View::strided(0, 1, m)
                                } else {
                                    View::strided(0, n, 1)
                                };
                                let mut c = vec![1f32; m * n];
                                gemm(
                                    (m, n, k),
                                    (&mut c, dv),
                                    accumulate,
                                    (a, av),
                                    (b, bv),
                                    threads,
                                );
                                for i in 0..m {
                                    for j in 0..n {
                                        let got = c[i * dv.rs + j * dv.cs] as f64;
                                        let w =
                                            want[i * n + j] + if accumulate { 1.0 } else { 0.0 };
                                        assert!(
                                            (got - w).abs()
                                                <= 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(),
                                            "({m},{n},{k}) at ({i},{j}): {got} vs {w}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values: it rounds to the even one, 1.0.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(f32::from_bits(bf16_bits(f32::NAN) << 16).is_nan());
    }
}
