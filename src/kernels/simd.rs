//! graft's own loops compiled for the widest vector instructions the CPU has, chosen at run time.
//!
//! The binary is built for baseline x86-64 so that it runs on every x86-64 CPU (cheap laptops' Celerons
//! and Pentiums have no AVX at all). The GEMM crate picks AVX2 or AVX-512 kernels at run time, but our
//! own loops (BatchNorm, the max-pool backward, the Winograd and depthwise kernels, optimizer steps)
//! were compiled for SSE2 alone: four f32 per instruction, and no vector compare-and-select, so masked
//! loops ran one value at a time. [`vectorized!`] runs a closure inside a function compiled for AVX-512 or AVX2 + FMA when the
//! CPU has them; LLVM inlines the closure there (a function may inline callees built for fewer features)
//! and vectorises it for the wider registers.
//!
//! Results are bit-identical on every level: Rust never contracts `a * b + c` into a fused multiply-add
//! nor reorders floating-point sums on its own, so only the width of the instructions changes.
//!
//! `GRAFT_SIMD=base|avx2|avx512` caps the level (read once), to compare levels or rule them out.

use std::sync::OnceLock;

/// An instruction-set level for [`vectorized!`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// What the binary was built for (SSE2 on x86-64).
    Base,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4).
    Avx512,
}

/// The level [`vectorized!`] uses: the best the CPU has, capped by `GRAFT_SIMD` if set (`base` or
/// `avx2`; any other value caps nothing).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("GRAFT_SIMD").as_deref() {
            Ok("base") => Level::Base,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        Level::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Level::Avx2
    } else {
        Level::Base
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Level {
    Level::Base
}

/// `vectorized!(statements; value)`: the block run by [`run`] as a closure marked `#[inline(always)]`,
/// without which LLVM may leave the closure out of line, compiled for the baseline (it did for loops
/// that capture mutable sums). Meant for the inner loop of one work item (a plane, a chunk): the block
/// should hold the whole loop, since what it calls out of line stays compiled for the baseline
/// (helpers it calls per value should be `#[inline(always)]` too).
macro_rules! vectorized {
    ($($body:tt)*) => {
        $crate::kernels::simd::run(
            #[inline(always)]
            || { $($body)* },
        )
    };
}
pub(crate) use vectorized;

/// Runs `f` compiled for [`level`]; see [`vectorized!`], which is how callers should reach it.
#[inline]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: `level` returns these only when the CPU reports every feature the functions enable.
        Level::Avx512 => return unsafe { avx512(f) },
        Level::Avx2 => return unsafe { avx2(f) },
        Level::Base => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(
    enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,avx,fma,f16c,bmi1,bmi2,lzcnt,popcnt"
)]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Values per parallel work item of [`par_map`]: large enough that task overhead vanishes, small
/// enough to split any tensor worth splitting.
const CHUNK: usize = 1 << 14;

/// `[f(a[i], b[i])]` over two slices of the same length, in parallel chunks, each chunk's loop
/// [`vectorized!`] (`f` should be a small closure: it is inlined there). For one input, pass it twice.
///
/// `f` is `Copy` (a `move` closure over plain values) and copied into each chunk's loop: read through
/// a reference, its captured values were reloaded for every element (the compiler cannot tell they
/// do not alias the output), which kept the loop scalar.
pub fn par_map<A, B, T>(a: &[A], b: &[B], f: impl Fn(A, B) -> T + Sync + Copy) -> Vec<T>
where
    A: Copy + Sync,
    B: Copy + Sync,
    T: candle_core::WithDType,
{
    assert_eq!(a.len(), b.len(), "par_map: operands of different lengths");
    super::par::par_zeroed(a.len(), CHUNK, |i, o| {
        let (a, b) = (&a[i * CHUNK..][..o.len()], &b[i * CHUNK..][..o.len()]);
        // A copy of `f` on this task's stack (see above).
        let kernel = f;
        vectorized! {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = kernel(a, b);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked, scaled sum in f64 lanes and an elementwise map, as the kernels write them: the
    /// same bits inside [`vectorized!`] as compiled for the baseline.
    #[test]
    fn vectorized_loops_give_the_baseline_bits() {
        let a: Vec<f32> = (0..10_007)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.)
            .collect();
        let b: Vec<f32> = (0..10_007)
            .map(|i| ((i * 104_729) % 997) as f32 / -53.)
            .collect();
        let kernel = |a: &[f32], b: &[f32]| {
            let mut lanes = [0f64; 8];
            for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                let z = x * 1.5 + y;
                lanes[i % 8] += if z > 0. && z < 6. { (z * y) as f64 } else { 0. };
            }
            lanes.iter().sum::<f64>()
        };
        let plain = kernel(&a, &b);
        let wide = vectorized! { kernel(&a, &b) };
        assert_eq!(plain.to_bits(), wide.to_bits());
        let mapped = par_map(&a, &b, |x, y| (x * y + 0.25).max(-1.));
        let expected: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (x * y + 0.25).max(-1.))
            .collect();
        assert_eq!(mapped, expected);
        println!("simd level here: {:?}", level());
    }
}
