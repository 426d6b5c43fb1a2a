//! The C ABI: every `unsafe` and `extern "C"` item of the crate lives here.
//!
//! Each function returns a status code (0 = ok); on failure the message is kept per thread and
//! read with `rbpe_last_error`. Panics are caught so that none crosses into Python. Buffers handed
//! to Python are freed with their matching `rbpe_free_*` function.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

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
        if out_ends.is_null() || out_n.is_null() || (text.is_null() && len > 0) {
            return Err("null pointer".into());
        }
        if len > u32::MAX as usize {
            return Err("text longer than 4 GiB".into());
        }
        let bytes = if len == 0 { &[][..] } else { std::slice::from_raw_parts(text, len) };
        let text = std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8: {e}"))?;
        let base = text.as_ptr() as usize;
        let ends: Vec<u32> = pretok::split(text, pattern(pattern_id)?)
            .map(|c| (c.as_ptr() as usize - base + c.len()) as u32)
            .collect();
        leak_vec(ends, out_ends, out_n);
        Ok(())
    })
}

/// # Safety
/// `ptr`/`len` must come from `rbpe_split`.
#[no_mangle]
pub unsafe extern "C" fn rbpe_free_u32(ptr: *mut u32, len: usize) {
    free_vec(ptr, len)
}
