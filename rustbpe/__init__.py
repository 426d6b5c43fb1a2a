"""rustbpe: byte-level BPE tokenizer training in Rust, with the API of the upstream PyPI package.

The Rust core (see rustbpe/src) is reached through cffi; this module owns validation, lifetimes
(buffers are freed by their matching Rust function) and turns error codes into exceptions.
"""

from ._native import ffi, lib

GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
NANOCHAT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
_PATTERN_IDS = {GPT4_PATTERN: 0, NANOCHAT_PATTERN: 1}


def _pattern_id(pattern):
    """Maps a split pattern to the id of its exact Rust implementation; rejects any other."""
    if pattern is None:
        return 0
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str or None, not {type(pattern).__name__}")
    try:
        return _PATTERN_IDS[pattern]
    except KeyError:
        raise ValueError(
            "unsupported split pattern: rustbpe implements exactly the GPT-4 pattern "
            "(rustbpe.GPT4_PATTERN, the default) and nanochat's variant (rustbpe.NANOCHAT_PATTERN); "
            f"got {pattern!r}"
        ) from None


def _check(status):
    if status != 0:
        message = ffi.string(lib.rbpe_last_error()).decode("utf-8", "replace")
        raise (RuntimeError if status == 2 else ValueError)(message)


def _utf8(text, what="text"):
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate at index {e.start})") from None


def split(text, pattern=None):
    """Splits `text` into pre-tokenizer chunks, exactly as `regex.findall(pattern, text)`."""
    pid = _pattern_id(pattern)
    data = _utf8(text)
    ends_p, n_p = ffi.new("uint32_t **"), ffi.new("uintptr_t *")
    _check(lib.rbpe_split(pid, data, len(data), ends_p, n_p))
    ends = ffi.gc(ends_p[0], lambda p, n=n_p[0]: lib.rbpe_free_u32(p, n))
    out, start = [], 0
    for end in ffi.unpack(ends, n_p[0]):
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out
