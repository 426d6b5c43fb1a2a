//! rustbpe: a byte-level BPE tokenizer trainer.
//!
//! `pretok` splits text exactly like the GPT-4 split regex (and nanochat's variant), `count` counts
//! the chunks of a corpus on worker threads, `bpe` learns merges from those counts and encodes with
//! them, and `ffi` is the C ABI that the Python wrapper in `rustbpe/__init__.py` drives through cffi.

pub mod bpe;
pub mod count;
pub mod ffi;
mod hash;
pub mod pretok;
pub mod unicode_tables;

/// The threads to count and encode with: one per core.
pub fn n_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
