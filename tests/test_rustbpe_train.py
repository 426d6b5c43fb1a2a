"""rustbpe.Tokenizer against its oracles: the upstream PyPI rustbpe 0.1.0 on real text (built-in and
custom split patterns), a slow pure-Python BPE on small generated corpora, and tiktoken for encoding.
Plus what PyPI's own test suite checks, and our errors on bad input."""

import collections
import json
import os
import subprocess
import sys
from itertools import accumulate

import pyarrow.parquet as pq
import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from tests.conftest import REPO
from tests.support.stagerun import missing

UPSTREAM = REPO / ".venv" / "upstream-rustbpe"
# GPT-2's split pattern with capture groups: a chunk is the whole match, never a group.
GPT2_GROUPS = r"""'(s|t|re|ve|m|ll|d)| ?(\p{L}+)| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CUSTOM_PATTERNS = [
    r"[a-zA-Z]+|[0-9]+|\s+",  # PyPI rustbpe's README example: the rest of the text is dropped
    rustbpe.GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}+"),  # possessive quantifiers, lookahead
    GPT2_GROUPS,
]


def train(texts, vocab_size, pattern=None):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return tok


def reference_ranks(texts, vocab_size, pattern):
    """Greedy byte-level BPE written for clarity: recount every pair after every merge; the most
    frequent pair wins, ties going to the smallest pair of ids."""
    chunks = collections.Counter(m.group() for t in texts for m in regex.finditer(pattern, t) if m.group())
    words = [(list(c.encode()), n) for c, n in chunks.items()]
    tokens = [bytes([i]) for i in range(256)]
    while len(tokens) < vocab_size:
        pairs = collections.Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = len(tokens)
        tokens.append(tokens[best[0]] + tokens[best[1]])
        for ids, _ in words:
            i = 0
            while i < len(ids) - 1:
                if (ids[i], ids[i + 1]) == best:
                    ids[i : i + 2] = [new_id]
                i += 1
    return [(t, i) for i, t in enumerate(tokens)]


# Few distinct characters, so pairs repeat, overlap ("aaaa") and tie often.
small_corpus = st.lists(st.text(alphabet="ab c'\n1é", max_size=30), min_size=1, max_size=12)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    texts=small_corpus,
    n_merges=st.integers(0, 40),
    # the built-in two (Rust scanners), and a custom one (a capture group, apostrophes dropped)
    pattern=st.sampled_from([rustbpe.GPT4_PATTERN, rustbpe.NANOCHAT_PATTERN, r"(\w)\w*|\s+"]),
)
def test_matches_reference_bpe(texts, n_merges, pattern):
    tok = train(texts, 256 + n_merges, pattern)
    assert tok.get_mergeable_ranks() == reference_ranks(texts, 256 + n_merges, pattern)
    assert tok.vocab_size == len(tok.get_mergeable_ranks())
    assert tok.get_pattern() == pattern


@pytest.fixture(scope="module")
def real_texts(shared_data):
    """About 6 M characters of real web text."""
    texts, n_chars = [], 0
    for text in pq.read_table(shared_data / "pretrain" / "shard_00000.parquet", columns=["text"]).column("text").to_pylist():
        texts.append(text)
        n_chars += len(text)
        if n_chars >= 6_000_000:
            break
    return texts


UPSTREAM_SCRIPT = """
import json, sys, rustbpe
job = json.load(sys.stdin)
out = []
for n_texts, vocab_size, pattern in job["runs"]:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(job["texts"][:n_texts]), vocab_size, pattern=pattern)
    ranks = [[t.hex(), r] for t, r in tok.get_mergeable_ranks()]
    out.append({"ranks": ranks, "pattern": tok.get_pattern(), "ids": tok.batch_encode(job["samples"])})
json.dump(out, sys.stdout)
"""

DEFAULT_RUNS = [(None, vocab_size, None) for vocab_size in (512, 4096, 32768)]  # all texts, GPT-4's pattern


@pytest.fixture(scope="module")
def upstream(real_texts, samples):
    """What the upstream PyPI rustbpe learns and encodes, per run (n_texts, vocab_size, pattern): the
    default runs on all real texts, then the custom patterns on about 300 kB of them."""
    if not (UPSTREAM / "rustbpe").is_dir():
        missing(f"upstream rustbpe not installed at {UPSTREAM} (run `make dev`)")
    n_small = next(i for i, n in enumerate(accumulate(map(len, real_texts))) if n >= 300_000) + 1
    runs = DEFAULT_RUNS + [(n_small, 512, pattern) for pattern in CUSTOM_PATTERNS]
    job = {"texts": real_texts, "samples": samples, "runs": runs}
    # same import name as ours, so in its own directory and process
    env = {**os.environ, "PYTHONPATH": str(UPSTREAM)}
    done = subprocess.run([sys.executable, "-c", UPSTREAM_SCRIPT], input=json.dumps(job), env=env,
                          capture_output=True, text=True, check=True, cwd="/")
    results = json.loads(done.stdout)
    for result in results:
        result["ranks"] = [(bytes.fromhex(t), r) for t, r in result["ranks"]]
    return dict(zip(runs, results))


@pytest.fixture(scope="module")
def samples(real_texts):
    """Texts to encode: real ones (unseen by the custom-pattern runs) and edge cases."""
    return real_texts[-20:] + ["", "a", "   spaces   ", "héllo wörld 12345 👍🏽\n\n  x", "don't STOP'LL 3.14!!"]


def test_matches_upstream_rustbpe_on_real_text(real_texts, upstream):
    for run in DEFAULT_RUNS:
        ranks = train(real_texts, run[1]).get_mergeable_ranks()
        assert len(ranks) == run[1]
        assert ranks == upstream[run]["ranks"], f"first difference at vocab_size={run[1]}"


def test_custom_patterns_match_upstream_rustbpe(real_texts, upstream, samples):
    for run in upstream:
        n_texts, vocab_size, pattern = run
        if pattern is None:
            continue
        tok = train(real_texts[:n_texts], vocab_size, pattern)
        assert tok.get_mergeable_ranks() == upstream[run]["ranks"], pattern
        assert tok.get_pattern() == upstream[run]["pattern"] == pattern
        assert tok.batch_encode(samples) == upstream[run]["ids"], pattern
        assert tok.encode(samples[0]) == upstream[run]["ids"][0]
    assert rustbpe.split("it's 42!", GPT2_GROUPS) == ["it", "'s", " 42", "!"]


@pytest.fixture(scope="module")
def trained(real_texts):
    return train(real_texts[:200], 2048)


def test_encode_matches_tiktoken(real_texts, trained):
    tok = trained
    enc = tiktoken.Encoding("t", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})
    samples = real_texts[200:260] + ["", "héllo wörld 12345 👍🏽\n\n  x", "don't STOP'LL"]
    assert tok.batch_encode(samples) == enc.encode_ordinary_batch(samples)
    assert tok.encode(samples[0]) == enc.encode_ordinary(samples[0])
    assert tok.decode(tok.encode(samples[-2])) == samples[-2]


def test_stops_when_no_pair_is_left():
    tok = train(["ab", "ab", "b"], 1000)
    assert tok.get_mergeable_ranks()[256:] == [(b"ab", 256)]
    assert tok.vocab_size == 257


def test_untrained_tokenizer():
    tok = rustbpe.Tokenizer()
    assert (tok.vocab_size, tok.get_pattern(), len(tok.get_mergeable_ranks())) == (256, "", 256)
    with pytest.raises(RuntimeError, match="not trained"):  # PyPI returns [] (see rustbpe/README.md)
        tok.encode("x")


def test_pypi_behaviours(real_texts, trained):
    """What PyPI rustbpe's own tests/python/test_tokenizer.py checks, on our real text."""
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="unknown token id 300"):
        tok.decode([300])
    tok.train_from_iterator(["hello hello hello", "world world world"], vocab_size=260)
    assert tok.vocab_size == 260
    texts = ["Hello world", "The quick brown fox", "jumps over the lazy dog", "", "a"]
    assert trained.batch_encode(texts) == [trained.encode(t) for t in texts]
    for text in ["hello world", "12345", "   spaces   ", "MixedCASE123", "", real_texts[0][:1000]]:
        assert trained.decode(trained.encode(text)) == text


def failing_iterator():
    yield "some text"
    raise OSError("disk gone")


@pytest.mark.parametrize(
    "texts, kwargs, error, match",
    [
        (["x"], {"vocab_size": 255}, ValueError, "vocab_size must be at least 256"),
        (["x"], {"vocab_size": 10**12}, ValueError, "at most 16,777,216"),
        (["x"], {"vocab_size": 300.0}, TypeError, "vocab_size must be an int"),
        (["x"], {"vocab_size": 300, "buffer_size": 0}, ValueError, "buffer_size must be at least 1"),
        (["x"], {"vocab_size": 300, "pattern": "("}, ValueError, "Invalid regex pattern: missing \\)"),
        (["x"], {"vocab_size": 300, "pattern": b"\\w+"}, TypeError, "pattern must be a str or None"),
        ([], {"vocab_size": 300}, ValueError, "yielded no text"),
        (["ok", 7], {"vocab_size": 300}, TypeError, "item 1 of the iterator must be str, not int"),
        (["ok", b"bytes"], {"vocab_size": 300}, TypeError, "item 1 of the iterator must be str, not bytes"),
        (["a\udc80b"], {"vocab_size": 300}, ValueError, "item 0 of the iterator is not valid Unicode"),
        (failing_iterator(), {"vocab_size": 300}, OSError, "disk gone"),
    ],
)
def test_bad_input(texts, kwargs, error, match):
    tok = rustbpe.Tokenizer()
    with pytest.raises(error, match=match):
        tok.train_from_iterator(iter(texts), **kwargs)
    assert tok.vocab_size == 256  # a failed training leaves the tokenizer as it was


def test_bad_encode_input():
    tok = train(["abc abc"], 260)
    with pytest.raises(TypeError, match="list of str"):
        tok.batch_encode("abc")
    with pytest.raises(TypeError, match="text 1 must be str"):
        tok.batch_encode(["a", None])
    for bad in (10**6, -1):
        with pytest.raises(ValueError, match=rf"unknown token id {bad} \(token ids are ints in \[0, 259\)\)"):
            tok.decode([97, bad])
    with pytest.raises(TypeError, match="token ids must be ints, not str"):
        tok.decode(["a"])
