//! rustbpe: a byte-level BPE tokenizer trainer.
//!
//! `pretok` splits text exactly like the GPT-4 split regex (and nanochat's variant; or not at all,
//! for text the Python wrapper split with another pattern), `count` counts the chunks of a corpus on
//! worker threads (into `chunks::ChunkCounts`), `bpe` learns merges from those counts and encodes
//! with them, and `ffi` is the C ABI that the Python wrapper in `rustbpe/__init__.py` drives through
//! cffi.

pub mod bpe;
mod chunks;
pub mod count;
pub mod ffi;
mod hash;
pub mod pretok;
pub mod unicode_tables;

/// The threads to count and encode with: one per core.
pub fn n_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Asks the CPU to start loading `value` into cache: for scattered accesses whose addresses are
/// known ahead (a no-op off x86_64).
#[inline]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint that never faults (here on a live reference), and SSE is
        // part of x86_64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(value as *const T as *const i8) };
    }
}
