"""rustbpe.Tokenizer against its oracles: the upstream PyPI rustbpe on real text, a slow pure-Python
BPE on small generated corpora, and tiktoken for encoding. Plus its errors on bad input."""

import collections
import json
import os
import subprocess
import sys

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


def train(texts, vocab_size, pattern=None):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return tok


def reference_ranks(texts, vocab_size, pattern):
    """Greedy byte-level BPE written for clarity: recount every pair after every merge; the most
    frequent pair wins, ties going to the smallest pair of ids."""
    chunks = collections.Counter(c for t in texts for c in regex.findall(pattern, t))
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
@given(texts=small_corpus, n_merges=st.integers(0, 40), nanochat=st.booleans())
def test_matches_reference_bpe(texts, n_merges, nanochat):
    pattern = rustbpe.NANOCHAT_PATTERN if nanochat else rustbpe.GPT4_PATTERN
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
texts = json.load(sys.stdin)
out = {}
for vocab_size in (512, 4096, 32768):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size)
    out[vocab_size] = [[t.hex(), r] for t, r in tok.get_mergeable_ranks()]
json.dump(out, sys.stdout)
"""


def upstream_ranks(texts):
    """The upstream PyPI rustbpe (same import name as ours, so in its own directory and process)."""
    if not (UPSTREAM / "rustbpe").is_dir():
        missing(f"upstream rustbpe not installed at {UPSTREAM} (run `make dev`)")
    env = {**os.environ, "PYTHONPATH": str(UPSTREAM)}
    done = subprocess.run([sys.executable, "-c", UPSTREAM_SCRIPT], input=json.dumps(texts), env=env,
                          capture_output=True, text=True, check=True, cwd="/")
    return {int(v): [(bytes.fromhex(t), r) for t, r in ranks] for v, ranks in json.loads(done.stdout).items()}


def test_matches_upstream_rustbpe_on_real_text(real_texts):
    expected = upstream_ranks(real_texts)
    for vocab_size in (512, 4096, 32768):
        ranks = train(real_texts, vocab_size).get_mergeable_ranks()
        assert len(ranks) == vocab_size
        assert ranks == expected[vocab_size], f"first difference at vocab_size={vocab_size}"


def test_encode_matches_tiktoken(real_texts):
    tok = train(real_texts[:200], 2048)
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
    with pytest.raises(RuntimeError, match="not trained"):
        tok.encode("x")


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
        (["x"], {"vocab_size": 300, "pattern": r"\w+"}, ValueError, "unsupported split pattern"),
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
    for bad in ([10**6], [-1], ["a"]):
        with pytest.raises(ValueError, match="token ids"):
            tok.decode(bad)
