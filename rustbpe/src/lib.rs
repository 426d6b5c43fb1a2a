//! rustbpe: a byte-level BPE tokenizer trainer.
//!
//! `pretok` splits text exactly like the GPT-4 split regex (and nanochat's variant), `ffi` is the
//! C ABI that the Python wrapper in `rustbpe/__init__.py` drives through cffi.

pub mod ffi;
pub mod pretok;
pub mod unicode_tables;
