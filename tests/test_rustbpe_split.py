"""rustbpe.split against its oracle, `regex.findall`, for both split patterns.

    python -m pytest tests/test_rustbpe_split.py

The real-text test reads pretrain shard 23 of the shared data (see the `shared_data` fixture).
"""

import importlib.util
import pathlib

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe

REPO = pathlib.Path(__file__).resolve().parents[1]
PATTERNS = {"gpt4": rustbpe.GPT4_PATTERN, "nanochat": rustbpe.NANOCHAT_PATTERN}
pattern_param = pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())


def assert_same_split(text, pattern):
    chunks = rustbpe.split(text, pattern)
    assert chunks == regex.findall(pattern, text), f"text: {text!r}"
    assert "".join(chunks) == text  # no alternative ever fails, so findall skips nothing


# Hand-checked GPT-4 splits; the test also holds `regex` to them.
TRICKY = [
    ("", []),
    ("Hello, world! It's 12345 o'clock...\n", ["Hello", ",", " world", "!", " It", "'s", " ", "123", "45", " o", "'clock", "...\n"]),
    # contractions: ordered alternation, case-insensitive, and U+017F (long s) folds to s
    ("I'LL we'Ve they'RE 'd'M'T", ["I", "'LL", " we", "'Ve", " they", "'RE", " '", "d", "'M", "'T"]),
    ("'ſx 'ſ 'st 'l 'lx ''s", ["'ſ", "x", " '", "ſ", " '", "st", " '", "l", " '", "lx", " ''", "s"]),
    ("\u212a'K 'K", ["\u212a", "'K", " '", "K"]),  # Kelvin folds to k, which is no contraction
    ("don’t", ["don", "’t"]),  # U+2019 is punctuation, not an apostrophe
    # the optional prefix of a word: any non-letter, non-number except CR/LF
    ("\ta\x0bb\xa0c\u3000d!e\re\nf", ["\ta", "\x0bb", "\xa0c", "\u3000d", "!e", "\r", "e", "\n", "f"]),
    ("5abc a5", ["5", "abc", " a", "5"]),
    # numbers: at most 3 (gpt4) per chunk, never glued to a prefix
    ("1234567 ٣٣٣٣ ½Ⅻ²", ["123", "456", "7", " ", "٣٣٣", "٣", " ", "½Ⅻ²"]),
    # punctuation: one optional space, a run, then any CR/LF
    (" !!a ?\r\n\r\nx ,\t.", [" !!", "a", " ?\r\n\r\n", "x", " ,", "\t", "."]),
    # whitespace: \s*[\r\n] backtracks to the last newline, \s+(?!\S) leaves the last space
    (" \t x", [" \t", " x"]),
    ("a  \n \n  b", ["a", "  \n \n", " ", " b"]),
    ("a   1", ["a", "  ", " ", "1"]),
    ("x \t ", ["x", " \t "]),
    ("\t!", ["\t", "!"]),
    ("\n\n", ["\n\n"]),
    ("\r\n \u2028 z", ["\r\n", " \u2028", " z"]),  # U+2028 is \s but not [\r\n]
    # U+001C..U+001F are str.isspace() but not `regex`'s \s; U+0085 is \s
    ("a\x1cb\x1c\x1fc \x85 d", ["a", "\x1cb", "\x1c\x1f", "c", " \x85", " d"]),
    # combining marks and emoji are "other"
    ("e\u0301 👨\u200d👩\u200d👧 👍🏽!", ["e", "\u0301", " 👨\u200d👩\u200d👧", " 👍🏽!"]),
]


@pytest.mark.parametrize("text, expected", TRICKY, ids=[repr(t[:20]) for t, _ in TRICKY])
def test_tricky_cases(text, expected):
    assert regex.findall(rustbpe.GPT4_PATTERN, text) == expected
    assert rustbpe.split(text) == expected  # the default pattern is GPT-4's


def test_nanochat_numbers():
    assert rustbpe.split("12345 ٣٣٣", rustbpe.NANOCHAT_PATTERN) == ["12", "34", "5", " ", "٣٣", "٣"]


SCRIPTS = [
    (0x20, 0x7E),  # ASCII letters, digits, punctuation
    (0x00, 0x20),  # ASCII controls: \t \n \v \f \r and the \x1c-\x1f separators
    (0x80, 0xFF),  # Latin-1: NEL, NBSP, superscripts, fractions
    (0x300, 0x36F),  # combining marks
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x5FF),  # Hebrew
    (0x600, 0x6FF),  # Arabic, with Arabic-Indic digits
    (0x900, 0x97F),  # Devanagari, with vowel signs and digits
    (0xE00, 0xE7F),  # Thai
    (0x2000, 0x206F),  # general punctuation, spaces, ZWJ, line/paragraph separators
    (0x2070, 0x218F),  # superscripts, letterlike symbols (Kelvin), roman numerals
    (0x3000, 0x303F),  # CJK punctuation, ideographic space
    (0x4E00, 0x4FFF),  # CJK ideographs
    (0xAC00, 0xAD00),  # Hangul
    (0xFF00, 0xFFEF),  # fullwidth forms and digits
    (0x1D400, 0x1D7FF),  # mathematical letters and digits (4-byte UTF-8)
    (0x1F300, 0x1FAFF),  # emoji and skin tones
]
PIECES = [
    "'", "'s", "'S", "'ll", "'LL", "'lL", "'ve", "'Ve", "'re", "'RE", "'d", "'M", "'t", "ſ", "'ſ",
    "\u212a", "\u0130", "’s", " ", "  ", "\t", "\r", "\n", "\r\n", "\x0b", "\x0c", "\xa0", "\x85",
    "\u1680", "\u2028", "\u3000", "\x1c", "\x1f", "\u200b", "\ufeff", "the", "The", " cat", "123456",
    "٣٤", "१२", "０１", "²", "½", "Ⅻ", "👨\u200d👩\u200d👧", "👍🏽", "🇺🇸", "e\u0301", "...", " !?",
]
piece = st.one_of(
    st.sampled_from(PIECES), *(st.characters(min_codepoint=lo, max_codepoint=hi) for lo, hi in SCRIPTS)
)
mixed_text = st.lists(piece, max_size=40).map("".join)


@pattern_param
@settings(max_examples=3000, derandomize=True, deadline=None)
@given(text=mixed_text)
def test_mixed_scripts(pattern, text):
    assert_same_split(text, pattern)


@pattern_param
@settings(max_examples=1000, derandomize=True, deadline=None)
@given(text=st.text())
def test_arbitrary_text(pattern, text):
    assert_same_split(text, pattern)


@pattern_param
def test_real_text(pattern, shared_data):
    import pyarrow.parquet as pq

    docs = pq.read_table(shared_data / "pretrain" / "shard_00023.parquet", columns=["text"]).column("text").to_pylist()
    assert docs
    for doc in docs:
        assert_same_split(doc, pattern)


def load_generator():
    path = REPO / "rustbpe" / "scripts" / "gen_unicode_tables.py"
    spec = importlib.util.spec_from_file_location("gen_unicode_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unicode_tables_up_to_date():
    gen = load_generator()
    assert gen.OUT.read_text().endswith(gen.body()), (
        "rustbpe/src/unicode_tables.rs disagrees with the installed regex; "
        "run `python rustbpe/scripts/gen_unicode_tables.py` and rebuild"
    )


# Each context makes one class distinction visible in the split of every code point c: "a{}" glues
# letters, "1{}" numbers, "{}!" others (but not spaces), "'{}a", "'l{}a" and "'r{}a" case folding.
@pytest.mark.parametrize("context", ["a{}", "1{}", "{}!", "'{}a", "'l{}a", "'r{}a"])
def test_every_code_point(context):
    every = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    text = "".join(context.format(c) for c in every)
    assert_same_split(text, rustbpe.GPT4_PATTERN)


@pytest.mark.parametrize(
    "text, pattern, error, match",
    [
        (b"bytes", None, TypeError, "text must be str, not bytes"),
        (None, None, TypeError, "text must be str, not NoneType"),
        ("a\ud800b", None, ValueError, "lone surrogate at index 1"),
        ("text", "(", ValueError, "Invalid regex pattern"),
        ("text", 3, TypeError, "pattern must be a str or None"),
    ],
)
def test_bad_input(text, pattern, error, match):
    with pytest.raises(error, match=match):
        rustbpe.split(text, pattern)
