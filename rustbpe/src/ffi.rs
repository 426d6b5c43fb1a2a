//! The C ABI: every `unsafe` and `extern "C"` item of the crate lives here.
//!
//! Each function returns a status code (0 = ok); on failure the message is kept per thread and
//! read with `rbpe_last_error`. Panics are caught so that none crosses into Python. Buffers handed
//! to Python are freed with their matching `rbpe_free_*` function.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::bpe::{self, Encoder};
use crate::count::{Batch, Counter};
use crate::n_threads;
use crate::pretok::{self, Pattern};

pub const RBPE_OK: i32 = 0;
pub const RBPE_ERROR: i32 = 1;
pub const RBPE_PANIC: i32 = 2;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs `f`, turning an `Err` or a panic into a status code and a stored message.
fn guard<F: FnOnce() -> Result<(), String>>(f: F) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => RBPE_OK,
        Ok(Err(msg)) => {
            set_last_error(msg);
            RBPE_ERROR
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(format!("internal error (panic): {what}"));
            RBPE_PANIC
        }
    }
}

fn pattern(id: u32) -> Result<Pattern, String> {
    Pattern::from_id(id).ok_or_else(|| format!("unknown pattern id {id}"))
}

/// Hands a Vec to the caller as (pointer, length); freed by the matching `rbpe_free_*`.
fn leak_vec<T>(v: Vec<T>, out_ptr: *mut *mut T, out_len: *mut usize) {
    let boxed = v.into_boxed_slice();
    let len = boxed.len();
    let ptr = Box::into_raw(boxed) as *mut T;
    // SAFETY: the caller passes valid out-pointers (checked non-null by the callers below).
    unsafe {
        *out_ptr = ptr;
        *out_len = len;
    }
}

/// # Safety
/// `ptr`/`len` must come from a function of this module that returned a u32 buffer.
unsafe fn free_vec<T>(ptr: *mut T, len: usize) {
    if !ptr.is_null() {
        drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)));
    }
}

/// The message of the last failed call on this thread (valid until the next call).
#[no_mangle]
pub extern "C" fn rbpe_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Splits UTF-8 `text` with pattern `pattern_id`; returns the chunks' end byte offsets.
///
/// # Safety
/// `text` points to `len` bytes of valid UTF-8; the out-pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn rbpe_split(
    pattern_id: u32,
    text: *const u8,
    len: usize,
    out_ends: *mut *mut u32,
    out_n: *mut usize,
) -> i32 {
    guard(|| {
        if out_ends.is_null() || out_n.is_null() {
            return Err("null pointer".into());
        }
        if len > u32::MAX as usize {
            return Err("text longer than 4 GiB".into());
        }
        let text = std::str::from_utf8(slice(text, len)?).map_err(|e| format!("invalid UTF-8: {e}"))?;
        let base = text.as_ptr() as usize;
        let ends: Vec<u32> = pretok::split(text, pattern(pattern_id)?)
            .map(|c| (c.as_ptr() as usize - base + c.len()) as u32)
            .collect();
        leak_vec(ends, out_ends, out_n);
        Ok(())
    })
}

/// # Safety
/// `ptr`/`len` must come from a function of this module that returned a u32 buffer.
#[no_mangle]
pub unsafe extern "C" fn rbpe_free_u32(ptr: *mut u32, len: usize) {
    free_vec(ptr, len)
}

/// # Safety
/// `ptr`/`len` must come from a function of this module that returned a u64 buffer.
#[no_mangle]
pub unsafe extern "C" fn rbpe_free_u64(ptr: *mut u64, len: usize) {
    free_vec(ptr, len)
}

/// # Safety
/// `ptr` is null or valid for `len` items.
unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> Result<&'a [T], String> {
    match (ptr.is_null(), len) {
        (_, 0) => Ok(&[]),
        (true, _) => Err("null pointer".into()),
        (false, _) => Ok(std::slice::from_raw_parts(ptr, len)),
    }
}

/// # Safety
/// `ptr` is null or a live handle made by this module.
unsafe fn handle<'a, T>(ptr: *mut T) -> Result<&'a mut T, String> {
    ptr.as_mut().ok_or_else(|| "null handle".to_string())
}

/// Stores a new handle in `out`.
///
/// # Safety
/// `out` is null or valid for writes.
unsafe fn give<T>(value: T, out: *mut *mut T) -> Result<(), String> {
    if out.is_null() {
        return Err("null pointer".into());
    }
    *out = Box::into_raw(Box::new(value));
    Ok(())
}

/// # Safety
/// `ptr` is null or a handle made by this module, not used afterwards.
unsafe fn free_handle<T>(ptr: *mut T) {
    if !ptr.is_null() {
        drop(Box::from_raw(ptr));
    }
}

/// A training run: the split pattern and the chunk counter its batches go to.
pub struct Trainer {
    counter: Counter,
}

/// Starts a training run whose counting threads split text with `pattern_id`.
///
/// # Safety
/// `out` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_new(pattern_id: u32, out: *mut *mut Trainer) -> i32 {
    guard(|| give(Trainer { counter: Counter::new(pattern(pattern_id)?, n_threads()) }, out))
}

/// Queues `n_docs` documents for counting: UTF-8 `text` end to end, `ends` their end offsets.
///
/// # Safety
/// `trainer` is live; `text` holds `len` bytes and `ends` holds `n_docs` offsets.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_feed(trainer: *mut Trainer, text: *const u8, len: usize, ends: *const u64, n_docs: usize) -> i32 {
    guard(|| {
        let batch = Batch { text: slice(text, len)?.to_vec(), ends: slice(ends, n_docs)?.to_vec() };
        handle(trainer)?.counter.feed(batch)
    })
}

/// Waits for the counts and learns up to `n_merges` merges, returned as 2 ids per merge.
///
/// # Safety
/// `trainer` is live; the out-pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_train(trainer: *mut Trainer, n_merges: usize, out_pairs: *mut *mut u32, out_n: *mut usize) -> i32 {
    guard(|| {
        if out_pairs.is_null() || out_n.is_null() {
            return Err("null pointer".into());
        }
        let chunks = handle(trainer)?.counter.finish()?;
        let pairs = bpe::train(chunks, n_merges, n_threads()).into_iter().flat_map(|(a, b)| [a, b]).collect();
        leak_vec(pairs, out_pairs, out_n);
        Ok(())
    })
}

/// # Safety
/// `trainer` is null or live, and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_free(trainer: *mut Trainer) {
    free_handle(trainer)
}

/// An encoder from `n_merges` merges (2 ids each, merge i making token 256 + i).
///
/// # Safety
/// `pairs` holds `2 * n_merges` ids; `out` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn rbpe_encoder_new(pattern_id: u32, pairs: *const u32, n_merges: usize, out: *mut *mut Encoder) -> i32 {
    guard(|| {
        let ids = slice(pairs, n_merges.checked_mul(2).ok_or("too many merges")?)?;
        let merges: Vec<(u32, u32)> = ids.chunks_exact(2).map(|ab| (ab[0], ab[1])).collect();
        give(Encoder::new(pattern(pattern_id)?, &merges)?, out)
    })
}

/// Encodes `n_texts` UTF-8 texts (end to end, `ends` their end offsets) on all cores: the ids of
/// all texts end to end, and the end offset of each text's ids.
///
/// # Safety
/// `encoder` is live; `text` holds `len` bytes, `ends` holds `n_texts` offsets; the out-pointers
/// are valid.
#[no_mangle]
pub unsafe extern "C" fn rbpe_encode(
    encoder: *mut Encoder,
    text: *const u8,
    len: usize,
    ends: *const u64,
    n_texts: usize,
    out_ids: *mut *mut u32,
    out_n_ids: *mut usize,
    out_ends: *mut *mut u64,
    out_n_ends: *mut usize,
) -> i32 {
    guard(|| {
        if out_ids.is_null() || out_n_ids.is_null() || out_ends.is_null() || out_n_ends.is_null() {
            return Err("null pointer".into());
        }
        let encoder = handle(encoder)?;
        let bytes = slice(text, len)?;
        let mut texts = Vec::with_capacity(n_texts);
        let mut start = 0;
        for &end in slice(ends, n_texts)? {
            let part = bytes.get(start..end as usize).ok_or("text offsets out of order or out of range")?;
            texts.push(std::str::from_utf8(part).map_err(|e| format!("invalid UTF-8: {e}"))?);
            start = end as usize;
        }
        let encoded = encoder.encode_batch(&texts, n_threads());
        let id_ends: Vec<u64> = encoded.iter().scan(0u64, |n, ids| { *n += ids.len() as u64; Some(*n) }).collect();
        leak_vec(encoded.concat(), out_ids, out_n_ids);
        leak_vec(id_ends, out_ends, out_n_ends);
        Ok(())
    })
}

/// # Safety
/// `encoder` is null or live, and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn rbpe_encoder_free(encoder: *mut Encoder) {
    free_handle(encoder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last_error() -> String {
        // SAFETY: rbpe_last_error returns a valid C string owned by this thread.
        unsafe { CStr::from_ptr(rbpe_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn errors_and_panics_become_status_codes() {
        assert_eq!(guard(|| Ok(())), RBPE_OK);
        assert_eq!(guard(|| Err("bad input".into())), RBPE_ERROR);
        assert_eq!(last_error(), "bad input");
        assert_eq!(guard(|| panic!("boom")), RBPE_PANIC);
        assert_eq!(last_error(), "internal error (panic): boom");
    }
}
