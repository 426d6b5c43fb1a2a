"""Data loaders: exact resume, rank striding, best-fit packing, conversation masks, bad input."""

import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat import shards, storage
from nanochat.dataloader import BestFitBuffer, ConversationLoader, PretrainLoader
from nanochat.stage import StageError
from nanochat.tokenizer import Tokenizer

MARK = re.compile(r"^<(\d{4})>")


@pytest.fixture(scope="module")
def tok():
    # Byte-level: the tests do not depend on the BPE trainer, and bytes decode one to one.
    return Tokenizer({bytes([i]): i for i in range(256)})


def make_docs(n, lo, hi, seed, start=0):
    """Documents `<dddd>` + lowercase filler, `dddd` a unique id, lengths in [lo, hi]."""
    rng = random.Random(seed)
    return [f"<{start + i:04d}>" + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(lo, hi) - 6))
            for i in range(n)]


def write_shard(path, docs, row_group_size):
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=row_group_size)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Three tiny shards (two train, one val) of 4, 3 and 2 row groups of 6 documents."""
    d = tmp_path_factory.mktemp("shards")
    start = 0
    for i, n_groups in enumerate([4, 3, 2]):
        docs = make_docs(6 * n_groups, 8, 120, seed=i, start=start)
        write_shard(d / f"shard_{i:05d}.parquet", docs, 6)
        start += len(docs)
    return storage.normalize(str(d))


def doc_layout(directory, split):
    """{doc id: (global row group index, text)} over a split's shards, and the row-group count."""
    out, g = {}, 0
    for uri in shards.split_shards(shards.list_shards(directory), split):
        pf = shards.open_shard(uri)
        for rg in range(pf.num_row_groups):
            for text in shards.read_row_group(pf, uri, rg):
                out[int(MARK.match(text).group(1))] = (g, text)
            g += 1
    return out, g


def segments(row, bos):
    """A token row split at BOS: each segment starts with BOS."""
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    assert starts[0] == 0, "a row must start with BOS"
    return [row[a:b] for a, b in zip(starts, starts[1:])]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# pretraining

def test_shapes_dtypes_and_shift(tok, shard_dir):
    loader = PretrainLoader(tok, 3, 32, shard_dir, threads=2)
    for x, y in take(loader, 4):
        assert x.shape == y.shape == (3, 32) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x[:, 0] == tok.bos_token_id).all()


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_resume_across_epochs(tok, shard_dir, world_size):
    """k batches, state through JSON, a new loader: the next m batches equal the uninterrupted
    loader's, for every rank, including resumes just before and after an epoch boundary."""
    B, T, total = 2, 40, 40
    for rank in range(world_size):
        def make(state=None, rank=rank):
            return PretrainLoader(tok, B, T, shard_dir, rank=rank, world_size=world_size, buffer_docs=5, threads=2,
                                  state=state)
        reference, epochs = make(), []
        full = []
        for _ in range(total):
            full.append(next(reference))
            epochs.append(reference.epoch)
        assert epochs[-1] >= 2, "the run must cross epoch boundaries"
        first_new_epoch = epochs.index(1)
        for k in sorted({1, 7, first_new_epoch - 1, first_new_epoch, first_new_epoch + 1}):
            loader = make()
            assert_same(take(loader, k), full[:k])
            state = json.loads(json.dumps(loader.state_dict()))
            resumed = make(state)
            assert_same(take(resumed, total - k), full[k:])
            assert resumed.stats == reference.stats


def test_resume_checks_compatibility(tok, shard_dir):
    loader = PretrainLoader(tok, 2, 40, shard_dir, rank=0, world_size=2)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(StageError, match="world_size=2, and the options now give 1"):  # the stage's one-line error
        PretrainLoader(tok, 2, 40, shard_dir, rank=0, world_size=1, state=state)
    with pytest.raises(StageError, match="T=40"):
        PretrainLoader(tok, 2, 48, shard_dir, rank=0, world_size=2, state=state)
    # B may change: rows are a function of T only
    resumed = PretrainLoader(tok, 4, 40, shard_dir, rank=0, world_size=2, state=state)
    x, _ = next(resumed)
    assert x.shape == (4, 40)


def test_state_is_small_and_memory_bounded(tok, shard_dir):
    loader = PretrainLoader(tok, 2, 40, shard_dir, buffer_docs=5)
    for _ in range(20):
        next(loader)
        state = loader.state_dict()
        buffered = sum(len(rows) for *_, rows in state["buffer"])
        assert buffered <= 5 + 6  # buffer_docs + one row group
    assert len(json.dumps(state)) < 2000


def test_ranks_disjoint_and_cover_all_row_groups(tok, shard_dir):
    """One pass with W=2: each rank sees only documents of its row groups (r, r+2, ...), no
    document twice, and together they see every row group."""
    layout, n_groups = doc_layout(shard_dir, "train")
    seen = {}
    for rank in range(2):
        loader = PretrainLoader(tok, 1, 40, shard_dir, rank=rank, world_size=2, epochs=1, buffer_docs=3)
        ids = []
        for x, y in loader:
            row = torch.cat([x[0], y[0, -1:]]).tolist()
            for seg in segments(row, tok.bos_token_id):
                text = tok.decode(seg[1:])
                if m := MARK.match(text):
                    doc = int(m.group(1))
                    assert layout[doc][1].startswith(text), "a segment is a prefix of its document"
                    ids.append(doc)
        assert len(ids) == len(set(ids)), "a document appeared twice in one pass"
        seen[rank] = set(ids)
        assert {layout[d][0] % 2 for d in ids} == {rank}
    assert not seen[0] & seen[1]
    assert {layout[d][0] for d in seen[0] | seen[1]} == set(range(n_groups))


def naive_crop_fraction(docs, row_len):
    """BOS-aligned sequential packing over all of `docs`: in order, the doc that does not fit is
    cropped to fill the row and its rest is dropped."""
    cropped, used, space = 0, 0, row_len
    for doc in docs:
        n = min(len(doc), space)
        used, cropped, space = used + n, cropped + len(doc) - n, space - n
        space = space or row_len
    return cropped / (cropped + used)


def test_best_fit_packing(tok, tmp_path):
    docs = make_docs(600, 8, 200, seed=7)
    for i in range(2):
        write_shard(tmp_path / f"shard_{i:05d}.parquet", docs if i == 0 else docs[:10], 100)
    B, T = 4, 255
    loader = PretrainLoader(tok, B, T, storage.normalize(str(tmp_path)), epochs=1, buffer_docs=64, threads=2)
    by_text = {d: True for d in docs}
    n_rows, placed = 0, 0
    for x, y in loader:
        for r in range(B):
            row = torch.cat([x[r], y[r, -1:]]).tolist()
            assert len(row) == T + 1  # full rows: no padding
            segs = segments(row, tok.bos_token_id)  # every document starts with BOS
            for j, seg in enumerate(segs):
                text = tok.decode(seg[1:])
                if j < len(segs) - 1:
                    assert text in by_text, "only a row's last document may be cropped"
                else:
                    assert any(d.startswith(text) for d in docs)
            placed += len(segs)
            n_rows += 1
    best = loader.crop_fraction()
    encoded = tok.encode(docs, prepend=tok.bos_token_id)
    naive = naive_crop_fraction(encoded, T + 1)
    assert n_rows > 100 and placed > 300
    # measured: 5.7% vs 21%; greedy largest-first leaves long documents for the row ends
    assert best < 0.06, f"best-fit cropped {best:.1%}"
    assert best < naive / 3, f"best-fit {best:.1%} vs sequential {naive:.1%}"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 50))
def test_best_fit_buffer_rule(lengths, space):
    """pop_fitting takes the largest item that fits, the oldest among equals; None if none fits."""
    buf = BestFitBuffer()
    for i, n in enumerate(lengths):
        buf.add((i,), n, i)
    fitting = [(n, i) for i, n in enumerate(lengths) if n <= space]
    got = buf.pop_fitting(space)
    if not fitting:
        assert got is None
        assert buf.pop_shortest()[1] == min((n, i) for i, n in enumerate(lengths))[1]
    else:
        n = max(fitting)[0]
        assert got == ((min(i for m, i in fitting if m == n),), min(i for m, i in fitting if m == n))
    assert len(buf) == len(lengths) - 1


def test_wait_for_shard_lets_training_start_before_downloads_finish(tok, tmp_path):
    """The shard list may name files that do not exist yet; the loader asks `wait_for_shard`
    right before it opens each one, so later shards can still be downloading."""
    docs = make_docs(36, 8, 80, seed=3)
    uris = [storage.normalize(str(tmp_path / f"shard_{i:05d}.parquet")) for i in range(3)]
    asked = []

    def wait_for_shard(uri):  # a "download" that completes when asked
        asked.append(uri)
        i = uris.index(uri)
        write_shard(storage.local_path(uri), docs[12 * i:12 * (i + 1)], 4)

    loader = PretrainLoader(tok, 1, 40, uris, buffer_docs=2, wait_for_shard=wait_for_shard)
    next(loader)
    assert asked == uris[:1]
    for _ in range(30):
        next(loader)
    assert asked[:3] == uris


def test_bad_shards_name_the_file(tok, tmp_path):
    good = make_docs(20, 8, 60, seed=1)
    write_shard(tmp_path / "shard_00000.parquet", good, 5)
    (tmp_path / "shard_00001.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"content": good}), str(tmp_path / "shard_00002.parquet"))
    for i, message in [(1, "not a readable parquet file"), (2, "no 'text' column")]:
        uris = [storage.normalize(str(tmp_path / "shard_00000.parquet")), storage.normalize(str(tmp_path / f"shard_{i:05d}.parquet"))]
        loader = PretrainLoader(tok, 1, 40, uris, buffer_docs=2)
        with pytest.raises(shards.ShardError, match=rf"shard_0000{i}\.parquet.*{message}"):
            for _ in range(100):
                next(loader)


def test_a_process_without_a_row_group_names_the_file(tok, tmp_path):
    """Each process reads its own row groups: a one-row-group file (pyarrow's default for a small
    table) cannot feed two; the second says so, naming it (it was a ValueError traceback)."""
    path = tmp_path / "val.parquet"
    write_shard(path, make_docs(20, 8, 60, seed=1), 20)
    next(PretrainLoader(tok, 1, 40, [str(path)], rank=0, world_size=2, buffer_docs=2))
    with pytest.raises(StageError, match=rf"^file://{path}: 1 row group\(s\) for 2 processes, and each reads its own"):
        next(PretrainLoader(tok, 1, 40, [str(path)], rank=1, world_size=2, buffer_docs=2))


def test_corrupt_row_group_names_file_and_row_group(tok, tmp_path):
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"text": make_docs(40, 200, 400, seed=2)}), str(path), row_group_size=10,
                   compression="zstd")
    pf = pq.ParquetFile(str(path))
    rg = pf.metadata.row_group(2).column(0)
    start = rg.dictionary_page_offset or rg.data_page_offset
    data = bytearray(path.read_bytes())
    for j in range(start + 40, start + rg.total_compressed_size - 8):
        data[j] ^= 0x5A
    path.write_bytes(bytes(data))
    loader = PretrainLoader(tok, 1, 40, [storage.normalize(str(path))], buffer_docs=2)
    with pytest.raises(shards.ShardError, match=r"shard_00000\.parquet: row group 2"):
        for _ in range(1000):
            next(loader)


def test_real_shards(tok, shared_data):
    """The real pretraining shards: train excludes the last shard, W=2 resume is exact."""
    data = storage.normalize(str(shared_data / "pretrain"))
    names = [u.rsplit("/", 1)[-1] for u in shards.list_shards(data)]
    loader = PretrainLoader(tok, 2, 64, data, rank=1, world_size=2, threads=2, buffer_docs=200)
    assert [u.rsplit("/", 1)[-1] for u in loader.shards] == names[:-1]
    full = take(loader, 12)
    loader = PretrainLoader(tok, 2, 64, data, rank=1, world_size=2, threads=2, buffer_docs=200)
    take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    offsets = np.cumsum([0] + [shards.open_shard(u).num_row_groups for u in loader.shards])
    assert state["buffer"] and all((offsets[s] + g) % 2 == 1 for _, s, g, _ in state["buffer"])
    resumed = PretrainLoader(tok, 2, 64, data, rank=1, world_size=2, threads=2, buffer_docs=200, state=state)
    assert_same(take(resumed, 7), full[5:])
    val = PretrainLoader(tok, 2, 64, data, split="val", threads=2)
    assert val.epochs == 1 and [u.rsplit("/", 1)[-1] for u in val.shards] == names[-1:]
    x, y = next(val)
    assert (x[:, 0] == tok.bos_token_id).all()


# conversations

def tool_conversation(i):
    return {"messages": [
        {"role": "user", "content": f"What is {i} + 3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": f"{i}+3"},
            {"type": "python_output", "text": str(i + 3)},
            {"type": "text", "text": f"It is {i + 3}." + " Indeed." * (i % 5)},
        ]},
    ]}


def plain_conversation(i):
    return {"messages": [{"role": "user", "content": "hi " * (1 + i % 7)},
                         {"role": "assistant", "content": "hello there " * (1 + i % 4)}]}


@pytest.fixture(scope="module")
def task():
    return [tool_conversation(i) if i % 2 else plain_conversation(i) for i in range(23)]


def expected_targets(tok, conversation, T):
    ids, mask = tok.render_conversation(conversation, max_tokens=T + 1)
    ids, mask = np.array(ids), np.array(mask)
    return ids, np.where(mask[1:] == 1, ids[1:], -1)


def test_sft_pad_masks(tok, task):
    """One conversation per row: inputs are its ids, targets -1 exactly where the mask is 0 and on
    padding; the tool output and user text are never trained on, the python call is."""
    T = 400
    loader = ConversationLoader(tok, task, 4, T, mode="pad", epochs=1)
    rows = []
    for x, y in loader:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        rows += list(zip(x.numpy(), y.numpy()))
    assert len(rows) == len(task)
    for conv, (x, y) in zip(task, rows):
        ids, targets = expected_targets(tok, conv, T)
        n = len(ids) - 1
        assert (x[:n] == ids[:-1]).all() and (y[:n] == targets).all()
        assert (y[n:] == -1).all()
    # the tool example: which positions are trained
    ids, targets = expected_targets(tok, task[1], T)
    s = tok.special_ids
    trained = {int(ids[j + 1]) for j in np.nonzero(targets != -1)[0]}
    untrained = {int(ids[j + 1]) for j in np.nonzero(targets == -1)[0]}
    assert {s["<|python_start|>"], s["<|python_end|>"], s["<|assistant_end|>"]} <= trained
    assert {s["<|output_start|>"], s["<|output_end|>"], s["<|user_start|>"], s["<|assistant_start|>"]} <= untrained
    out = tok.encode(str(1 + 3))
    start = list(ids).index(s["<|output_start|>"])
    assert list(ids[start + 1:start + 1 + len(out)]) == out and (targets[start - 1:start + len(out) + 1] == -1).all()


@pytest.mark.parametrize("buffer_size", [5, 100])
def test_pack_places_every_conversation_whole_once(tok, task, buffer_size):
    """Packed rows (what mid_train and chat_sft train on), against an oracle built from the rows'
    inputs: every conversation's tokens exactly once in a pass, whole, in order and in one row, its
    targets its mask's; one longer than a row is its first T+1 tokens, a row of its own; padding
    (BOS in, -1 out) only at the end of a row, and shorter than every conversation then buffered
    (the loader buffers in task order, buffer_size ahead of what it placed): nothing fitted."""
    T = 70
    loader = ConversationLoader(tok, task, 3, T, mode="pack", epochs=1, buffer_size=buffer_size)
    rendered = [expected_targets(tok, c, T) for c in task]  # cropped to T+1 tokens
    lengths = [len(tok.render_conversation(c, max_tokens=1 << 30)[0]) for c in task]
    bos = tok.bos_token_id
    placed, rows = [], 0
    for x, y in loader:
        assert x.shape == y.shape and x.shape[1] == T
        for xr, yr in zip(x.numpy(), y.numpy()):
            want_x, want_y, p = np.full(T + 1, bos), np.full(T, -1), 0
            while True:  # the conversation starting at p: the one not yet placed whose tokens are there
                here = [i for i, (ids, _) in enumerate(rendered) if i not in placed and len(ids) <= T + 1 - p
                        and (xr[p:p + len(ids)] == ids[:T - p]).all()]
                if not here:
                    break
                assert len(here) == 1
                i = here[0]
                ids, targets = rendered[i]
                if lengths[i] > T + 1:
                    assert p == 0 and len(ids) == T + 1, "a cropped conversation fills a row of its own"
                want_x[p:p + len(ids)] = ids
                want_y[p:p + len(ids) - 1] = targets
                placed.append(i)
                p += len(ids)
            rows += 1
            assert p > 0 and (xr == want_x[:T]).all() and (yr == want_y).all()
            buffered = [i for i in range(min(len(task), len(placed) + buffer_size)) if i not in placed]
            assert all(min(lengths[i], T + 1) > T + 1 - p for i in buffered), "padding where a conversation fitted"
    assert sorted(placed) == list(range(len(task))), "each conversation exactly once per pass"
    assert loader.stats["cropped"] == sum(n > T + 1 for n in lengths) > 0
    assert loader.stats["conversations"] == len(task) and loader.stats["rows"] == rows
    assert loader.stats["pad_tokens"] == rows * (T + 1) - sum(len(ids) for ids, _ in rendered)


@pytest.mark.parametrize("mode", ["pack", "pad"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_conversation_exact_resume(tok, task, mode, world_size):
    B, T, total = 3, 64, 25
    for rank in range(world_size):
        def make(state=None, rank=rank):
            return ConversationLoader(tok, task, B, T, mode=mode, rank=rank, world_size=world_size, buffer_size=6,
                                      state=state)
        reference = make()
        full = take(reference, total)
        assert reference.epoch >= 2, "the run must cross epoch boundaries"
        for k in (1, 5, 11, 17):
            loader = make()
            take(loader, k)
            resumed = make(json.loads(json.dumps(loader.state_dict())))
            assert_same(take(resumed, total - k), full[k:])
    # ranks take disjoint items r, r+W, ...
    if world_size == 2:
        firsts = [next(ConversationLoader(tok, task, 1, 400, mode="pad", rank=r, world_size=2))[0][0] for r in range(2)]
        for r, x in enumerate(firsts):
            ids, _ = expected_targets(tok, task[r], 400)
            assert (x[:len(ids) - 1].numpy() == ids[:-1]).all()


def test_bad_conversation_names_the_item(tok, task):
    bad = list(task[:3]) + [{"messages": [{"role": "assistant", "content": "no user"}]}]
    loader = ConversationLoader(tok, bad, 4, 64, mode="pad", epochs=1)
    with pytest.raises(ValueError, match="task item 3"):
        next(loader)
