"""rustbpe: byte-level BPE tokenizer training in Rust, a drop-in for the PyPI package rustbpe 0.1.0.

The Rust core (see rustbpe/src) is reached through cffi; this module owns validation, lifetimes
(buffers are freed by their matching Rust function) and turns error codes into exceptions. Split
patterns other than the two that Rust scans exactly are applied here, with the `regex` package.

Where PyPI rustbpe is lax or broken we are strict, on purpose (rustbpe/README.md gives the reasons):
encode before training raises RuntimeError (PyPI: []); an empty iterator, vocab_size < 256 (PyPI:
a panic) and a negative id to decode (PyPI: OverflowError) raise ValueError; decode turns invalid
UTF-8 into U+FFFD (PyPI: a broken TypeError); a failed training leaves the tokenizer unchanged (PyPI:
new pattern, old merges); custom patterns are `regex`'s, not Rust fancy-regex's.
"""

from array import array
from itertools import accumulate

import regex

from ._native import ffi, lib

GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
NANOCHAT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
_PATTERN_IDS = {GPT4_PATTERN: 0, NANOCHAT_PATTERN: 1}
_WHOLE = 2  # the Rust pattern that keeps each text as one chunk: text already split in Python
# Far beyond any real vocabulary (GPT-4o has 200k tokens), and token ids stay well inside u32.
MAX_VOCAB_SIZE = 1 << 24


def _compile(pattern):
    """(Rust pattern id, compiled regex or None) for a split pattern. The two built-in patterns have
    exact scanners in Rust; any other is split here by the `regex` package, whose chunks Rust then
    takes whole."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str or None, not {type(pattern).__name__}")
    if pattern in _PATTERN_IDS:
        return _PATTERN_IDS[pattern], None
    try:
        return _WHOLE, regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"Invalid regex pattern: {e}") from None


def _chunks(compiled, text):
    """The non-empty whole matches of `compiled` in `text` (findall would give the groups of a
    pattern that has some; an empty chunk holds no token)."""
    if compiled.groups == 0:
        return [c for c in compiled.findall(text) if c]
    return [c for c in (m.group() for m in compiled.finditer(text)) if c]


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
    """Splits `text` into pre-tokenizer chunks (default pattern GPT-4's), exactly as the whole
    non-empty matches of `regex.finditer(pattern, text)`."""
    pid, compiled = _compile(GPT4_PATTERN if pattern is None else pattern)
    data = _utf8(text)
    if compiled is not None:
        return _chunks(compiled, text)
    ends_p, n_p = ffi.new("uint32_t **"), ffi.new("uintptr_t *")
    _check(lib.rbpe_split(pid, data, len(data), ends_p, n_p))
    ends = ffi.gc(ends_p[0], lambda p, n=n_p[0]: lib.rbpe_free_u32(p, n))
    out, start = [], 0
    for end in ffi.unpack(ends, n_p[0]):
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out


def _vec_u32(ptr_p, n_p):
    """The Rust u32 buffer behind an out-pointer pair, as a Python list (the buffer is freed)."""
    try:
        return ffi.unpack(ptr_p[0], n_p[0])
    finally:
        lib.rbpe_free_u32(ptr_p[0], n_p[0])


def _batch(texts):
    """UTF-8 texts end to end and their end offsets, as the Rust side takes them."""
    return b"".join(texts), array("Q", accumulate(map(len, texts)))


class Tokenizer:
    """Byte-level BPE: train on an iterator of str, then read the merges or encode with them."""

    def __init__(self):
        self._pattern = ""
        self._merges = []  # (left id, right id) of merge i, which makes token 256 + i
        self._tokens = [bytes([i]) for i in range(256)]  # the bytes of each token id
        self._encoder = None
        self._compiled = None  # the pattern's regex when Python splits the text (a custom pattern)

    @property
    def vocab_size(self):
        return 256 + len(self._merges)

    def get_pattern(self):
        """The split pattern of the last training ('' before any)."""
        return self._pattern

    def train_from_iterator(self, iterator, vocab_size, buffer_size=8192, pattern=None):
        """Learns `vocab_size - 256` merges from the texts of `iterator` (fewer when the corpus runs
        out of pairs). Texts are split by `pattern` (default GPT-4's) and counted on all cores,
        `buffer_size` texts at a time. A pattern other than the built-in two is any `regex`
        pattern, split in Python (slower)."""
        pattern = GPT4_PATTERN if pattern is None else pattern
        pid, compiled = _compile(pattern)
        _check_int("vocab_size", vocab_size, 256, MAX_VOCAB_SIZE)
        _check_int("buffer_size", buffer_size, 1, None)
        trainer_p = ffi.new("Trainer **")
        _check(lib.rbpe_trainer_new(pid, trainer_p))
        trainer = trainer_p[0]
        try:
            n_texts = _feed(trainer, iterator, buffer_size, compiled)
            if n_texts == 0:
                raise ValueError("the iterator yielded no text to train on")
            pairs_p, n_p = ffi.new("uint32_t **"), ffi.new("uintptr_t *")
            _check(lib.rbpe_trainer_train(trainer, vocab_size - 256, pairs_p, n_p))
        finally:
            lib.rbpe_trainer_free(trainer)
        pairs = _vec_u32(pairs_p, n_p)
        self._set_merges(list(zip(pairs[::2], pairs[1::2])), pattern, pid, compiled)

    def _set_merges(self, merges, pattern, pid, compiled):
        encoder_p = ffi.new("Encoder **")
        flat = array("I", (i for pair in merges for i in pair))
        _check(lib.rbpe_encoder_new(pid, ffi.from_buffer("uint32_t[]", flat), len(merges), encoder_p))
        self._encoder = ffi.gc(encoder_p[0], lib.rbpe_encoder_free)
        self._merges, self._pattern, self._compiled = merges, pattern, compiled
        self._tokens = self._tokens[:256]
        for left, right in merges:
            self._tokens.append(self._tokens[left] + self._tokens[right])

    def get_mergeable_ranks(self):
        """[(token bytes, rank)] for every token: the 256 bytes, then one per merge."""
        return [(token, rank) for rank, token in enumerate(self._tokens)]

    def encode(self, text):
        """The token ids of `text`."""
        return self.batch_encode([text])[0]

    def batch_encode(self, texts):
        """The token ids of each text, encoded on all cores."""
        if self._encoder is None:
            raise RuntimeError("the tokenizer is not trained yet: call train_from_iterator first")
        if isinstance(texts, str):
            raise TypeError("batch_encode takes a list of str, not a str")
        texts = list(texts)
        data = [_utf8(t, f"text {i}") for i, t in enumerate(texts)]
        if self._compiled is None:
            ids, ends = self._encode_whole(data)
        else:
            chunks = [_chunks(self._compiled, t) for t in texts]
            ids, chunk_ends = self._encode_whole([c.encode() for text_chunks in chunks for c in text_chunks])
            ends = [chunk_ends[n - 1] if n else 0 for n in accumulate(map(len, chunks))]
        return [ids[start:end] for start, end in zip([0, *ends], ends)]

    def _encode_whole(self, data):
        """The ids of UTF-8 texts end to end, and where each text's ids end."""
        data, ends = _batch(data)
        ids_p, n_ids_p = ffi.new("uint32_t **"), ffi.new("uintptr_t *")
        ends_p, n_ends_p = ffi.new("uint64_t **"), ffi.new("uintptr_t *")
        _check(lib.rbpe_encode(self._encoder, data, len(data), ffi.from_buffer("uint64_t[]", ends), len(ends),
                               ids_p, n_ids_p, ends_p, n_ends_p))
        try:
            id_ends = ffi.unpack(ends_p[0], n_ends_p[0])
        finally:
            lib.rbpe_free_u64(ends_p[0], n_ends_p[0])
        return _vec_u32(ids_p, n_ids_p), id_ends

    def decode(self, ids):
        """The text of token ids (invalid UTF-8 across token boundaries becomes U+FFFD)."""
        ids = list(ids)
        for i in ids:
            if not isinstance(i, int):
                raise TypeError(f"token ids must be ints, not {type(i).__name__}")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"unknown token id {i} (token ids are ints in [0, {self.vocab_size}))")
        return b"".join(self._tokens[i] for i in ids).decode("utf-8", "replace")

    def __repr__(self):
        return f"rustbpe.Tokenizer(vocab_size={self.vocab_size})"


def _feed(trainer, iterator, buffer_size, compiled):
    """Sends the texts to the counting threads in batches (each as its chunks when `compiled` splits
    them); returns how many texts there were."""
    n_texts, buffer = 0, []
    for text in iterator:
        data = _utf8(text, f"item {n_texts} of the iterator")
        buffer.append(data if compiled is None else text)
        n_texts += 1
        if len(buffer) == buffer_size:
            _send(trainer, buffer, compiled)
            buffer = []
    if buffer:
        _send(trainer, buffer, compiled)
    return n_texts


def _send(trainer, texts, compiled):
    if compiled is not None:
        texts = [c.encode() for text in texts for c in _chunks(compiled, text)]
    data, ends = _batch(texts)
    _check(lib.rbpe_trainer_feed(trainer, data, len(data), ffi.from_buffer("uint64_t[]", ends), len(ends)))


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" + ("" if high is None else f" and at most {high:,}")
        raise ValueError(f"{name} must be {bound}, got {value:,}")
