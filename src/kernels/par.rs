//! Work on rayon's thread pool: running a training step on it ([`on_pool`]), and buffers filled in
//! parallel ([`par_zeroed`] and its variants).

use rayon::prelude::*;

/// Runs `f` on one of rayon's worker threads and returns its result; directly when already on one.
///
/// Why: every parallel kernel called from outside the pool is injected into it, and the calling
/// thread sleeps until a worker finishes it; from inside the pool the kernel's first half runs on the
/// calling worker itself and the rest is stolen by the others. A training step runs a few hundred
/// kernels: a ResNet-18 benchmark run at 128x128 (10 steps, with warm-up and set-up) made 12,932 context
/// switches with its steps on the main thread and 2,057 on a worker, and its steps took 1-3% less time
/// (EfficientNet-Lite0's up to 6%; `benches/train_step.rs`, alternated runs).
///
/// `f` must not wait for other work on the pool from outside it (a channel fed by a thread that itself
/// uses the pool could then wait forever on a one-thread pool): a training step's forward, backward
/// and update qualify, fetching its batch from the loader does not.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // The caller's autocast scope goes with the work (it is a thread-local).
    let precision = super::precision::current();
    rayon::scope(|_| super::precision::autocast(precision, f))
}

/// `vec![T::zero(); len]` built in parallel: chunk `i` (`chunk` values, the last one possibly shorter)
/// is zero-filled and handed to `f(i, chunk)` on a rayon task, which may overwrite or accumulate into it.
///
/// Why not `vec![T::zero(); len]` and then `par_chunks_mut`: the allocator zero-fills reused memory
/// on the calling thread, one core writing the whole buffer out to memory while the others wait. On a
/// ResNet-18 training step at 128x128 that `memset` was ~5% of the CPU samples, all of it on the main
/// thread. Here each task zeroes its own chunk just before using it, in cache.
pub fn par_zeroed<T: candle_core::WithDType>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    par_zeroed_init(len, chunk, || (), |_, i, c| f(i, c))
}

/// [`par_zeroed`] with per-task scratch: `init` builds a value that `f(&mut scratch, i, chunk)` reuses
/// across the chunks one task handles (rayon's `for_each_init`).
pub fn par_zeroed_init<T: candle_core::WithDType, S>(
    len: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each_init(init, |s, (i, c)| f(s, i, zero_filled(c)));
    // SAFETY: the chunks cover `0..len` and `for_each_init` zero-filled every one of them before
    // returning (a panic in `f` propagates out of it, before this line).
    unsafe { v.set_len(len) };
    v
}

/// [`par_zeroed`] for `M` outputs of the same length at once: `f(i, chunks)` gets chunk `i` of each.
pub fn par_zeroed_n<T: candle_core::WithDType, const M: usize>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, [&mut [T]; M]) + Sync + Send,
) -> [Vec<T>; M] {
    let chunk = chunk.max(1);
    let mut outs: [Vec<T>; M] = std::array::from_fn(|_| Vec::with_capacity(len));
    {
        let mut parts: Vec<_> = outs
            .iter_mut()
            .map(|o| o.spare_capacity_mut()[..len].chunks_mut(chunk))
            .collect();
        let items: Vec<Vec<_>> = (0..len.div_ceil(chunk))
            .map(|_| parts.iter_mut().filter_map(Iterator::next).collect())
            .collect();
        items.into_par_iter().enumerate().for_each(|(i, cs)| {
            let cs: Vec<&mut [T]> = cs.into_iter().map(zero_filled).collect();
            let Ok(cs) = <[&mut [T]; M]>::try_from(cs) else {
                unreachable!("one chunk per output")
            };
            f(i, cs);
        });
    }
    for o in &mut outs {
        // SAFETY: as in `par_zeroed_init`: every chunk of `0..len` of every output was zero-filled.
        unsafe { o.set_len(len) };
    }
    outs
}

/// `c` filled with zeros, as the initialised values it now holds.
fn zero_filled<T: candle_core::WithDType>(c: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    c.fill(std::mem::MaybeUninit::new(T::zero()));
    // SAFETY: every element of `c` was initialised on the line above, and `MaybeUninit<T>` has the
    // layout of `T`.
    unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_runs_on_a_worker_and_returns_the_result() {
        let outer = on_pool(|| {
            let here = rayon::current_thread_index();
            // Nested: already on a worker, so it runs in place.
            let inner = on_pool(rayon::current_thread_index);
            (here, inner)
        });
        assert!(outer.0.is_some());
        assert_eq!(outer.0, outer.1);
    }

    #[test]
    fn par_zeroed_hands_out_every_chunk_zeroed_once() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 4), (12, 4), (7, 0)] {
            let v: Vec<f32> = par_zeroed(len, chunk, |i, c| {
                let size = chunk.max(1);
                assert!(c.len() == size || (c.len() < size && (i + 1) * size >= len));
                for (k, x) in c.iter_mut().enumerate() {
                    assert_eq!(*x, 0.0);
                    *x = (i * size + k) as f32;
                }
            });
            let want: Vec<f32> = (0..len).map(|k| k as f32).collect();
            assert_eq!(v, want, "len {len}, chunk {chunk}");
        }
    }

    #[test]
    fn par_zeroed_n_gives_each_output_its_own_chunk() {
        let [a, b] = par_zeroed_n::<f64, 2>(11, 3, |i, [a, b]| {
            assert_eq!(a.len(), b.len());
            for (k, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                assert_eq!((*x, *y), (0.0, 0.0));
                *x = (i * 3 + k) as f64;
                *y = -*x;
            }
        });
        assert_eq!(a, (0..11).map(|k| k as f64).collect::<Vec<_>>());
        assert_eq!(b, (0..11).map(|k| -(k as f64)).collect::<Vec<_>>());
        let [e] = par_zeroed_n::<f32, 1>(0, 8, |_, _| unreachable!("no chunk of nothing"));
        assert!(e.is_empty());
    }

    #[test]
    fn par_zeroed_init_reuses_scratch_within_a_task() {
        let v: Vec<f32> = par_zeroed_init(100, 10, Vec::<usize>::new, |seen, i, c| {
            seen.push(i);
            c.fill(seen.len() as f32);
        });
        assert_eq!(v.len(), 100);
        assert!(v.iter().all(|&x| x >= 1.0));
    }
}
