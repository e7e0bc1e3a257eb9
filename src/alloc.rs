//! Settings of the binaries' allocator (mimalloc, see `src/main.rs`).

/// `mi_option_purge_delay`: entry 15 of `mi_option_e` in mimalloc 2's and 3's `mimalloc.h` (the Rust
/// bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the kernel.
///
/// A training step frees and reallocates the same activation-sized buffers every step. With mimalloc's
/// default 10 ms purge delay they go back to the kernel between uses, and each reuse pays page faults
/// and the kernel's zeroing of fresh huge pages: on a ResNet-18 training step at 128x128 that was about
/// 41,000 page faults and 12% of the time, against 500 faults with purging off. The resident size stays
/// at the peak of a step, as with PyTorch's caching allocators. Harmless when mimalloc is not the
/// global allocator (its own heap is then unused).
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide integer option; mimalloc reads it at each purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
