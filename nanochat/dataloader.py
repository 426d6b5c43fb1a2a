"""Token batches for training: pretraining text and chat conversations -> (inputs, targets).

`PretrainLoader` streams parquet shards a row group at a time (rank r of W reads the row groups
r, r+W, ... of the split's shards taken end to end), tokenizes each row group in threads with a
BOS before every document, and packs documents into rows of T+1 tokens by best fit: each row is
filled with the largest buffered document that still fits, and only when none fits is the shortest
one cropped to fill the row exactly. No padding; every row starts with BOS. See
`BestFitBuffer` for the rule.

`ConversationLoader` renders a task's conversations (rank r takes items r, r+W, ...) and either
packs whole conversations best-fit into rows (mid_train and chat_sft, as upstream's SFT) or puts
one per row padded to the batch's longest. Targets are -1 wherever the model is not trained (user
text, tool output, padding).

Both are iterators of `(inputs, targets)`, int64 tensors of shape (B, T) with targets shifted by
one, and resume exactly: `state_dict()` is small JSON data (a cursor plus references to the
buffered documents, which are re-read and re-tokenized on resume), and a loader built with
`state=` yields the very batches the uninterrupted loader would have.
"""

import bisect
import hashlib
import os
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist

from nanochat import dataset, storage
from nanochat import shards as shardlib
from nanochat.stage import StageError
from nanochat.tokenizer import ConversationError

STATE_VERSION = 1
PREFIX_CHARS_PER_TOKEN = 8  # see PretrainLoader._add_docs
PREFIX_MARGIN = 64
SPLIT_DEFAULT = "split default"  # epochs: forever for train, one pass for val


def dist_rank_world(rank=None, world_size=None):
    """(rank, world_size): the arguments, else torch.distributed's when initialised, else (0, 1)."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


class BestFitBuffer:
    """Token sequences waiting to be packed into rows.

    Each item has a `ref`: a tuple of ints that grows with arrival order and identifies the item
    in its source (so a state can name items instead of storing their tokens). Items are kept
    sorted by (length, ref), so the largest item that fits a space is one bisection away, and ties
    go to the oldest item, which keeps the order a pure function of the input.
    """

    def __init__(self):
        self._keys = []  # sorted (length, ref)
        self._items = {}  # ref -> payload

    def __len__(self):
        return len(self._keys)

    def add(self, ref, length, payload):
        bisect.insort(self._keys, (length, ref))
        self._items[ref] = payload

    def pop_fitting(self, space):
        """(ref, payload) of the largest item of length <= space (oldest among equals), or None."""
        i = bisect.bisect_left(self._keys, (space + 1,)) - 1
        if i < 0:
            return None
        return self._pop(bisect.bisect_left(self._keys, (self._keys[i][0],)))

    def pop_shortest(self):
        return self._pop(0)

    def _pop(self, i):
        _, ref = self._keys.pop(i)
        return ref, self._items.pop(ref)

    def refs(self):
        """The refs of the buffered items, oldest first."""
        return sorted(self._items)


def _batch_tensors(rows, targets, device):
    """(inputs, targets) on `device` from (B, T+1) token rows and (B, T) targets. On CUDA the
    host arrays live in pinned memory (fresh each batch, so an in-flight copy is never
    overwritten) and move with non_blocking."""
    inputs = rows[:, :-1]
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(inputs)).to(device), torch.from_numpy(targets).to(device)
    pinned = torch.empty((2, *targets.shape), dtype=torch.int64, pin_memory=True)
    pinned[0].numpy()[:] = inputs
    pinned[1].numpy()[:] = targets
    out = pinned.to(device, non_blocking=True)
    return out[0], out[1]


def _check_state(state, kind, expected):
    """A StageError (one line, the stage's own) unless a checkpoint's loader `state` is one this loader
    continues exactly: a stage resumed with other data options would train on another token stream."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("kind") != kind:
        raise StageError(f"not a {kind} loader state (version {STATE_VERSION}): {str(state)[:200]}")
    for key, value in expected.items():
        if state.get(key) != value:
            raise StageError(f"the checkpoint's data loader has {key}={state.get(key)!r}, and the options now give "
                             f"{value!r}: resuming would not reproduce the same token stream; resume with the options the "
                             "stage started with, or remove its folder to train it again")


class PretrainLoader:
    """Packed pretraining batches from parquet shards; an infinite iterator for training.

    tokenizer   a `nanochat.tokenizer.Tokenizer` (anything with `encode(texts, prepend=,
                num_threads=)`, `bos_token_id`, `vocab_size`)
    B, T        rows per batch and tokens per row (each row packs T+1 tokens)
    source      a directory URI holding shard_NNNNN.parquet files (split by `split`: the last
                shard is val), or an explicit list of shard URIs used as the split, in order. A
                list may name shards that are still downloading if `wait_for_shard` is given.
    split       'train' or 'val'
    rank, world_size   default from torch.distributed when initialised, else 0 and 1
    epochs      passes over the split; None = forever. Default: None for train, 1 for val. At
                the end of the last pass the batch being built is dropped (no padding).
    buffer_docs documents kept for best fit; more fit better but cost memory: the buffer holds at
                most buffer_docs + one row group of documents of at most T+1 tokens each
    threads     tokenizer threads (default: min(8, cpu count))
    device      where batches go (pinned + non_blocking on CUDA)
    wait_for_shard  optional callable(uri) that returns once the shard can be read (downloads)
    state       a `state_dict()` to resume from
    """

    def __init__(self, tokenizer, B, T, source, split="train", rank=None, world_size=None, epochs=SPLIT_DEFAULT,
                 buffer_docs=1000, threads=None, device="cpu", wait_for_shard=None, state=None):
        if B < 1 or T < 1 or buffer_docs < 1:
            raise ValueError(f"B, T and buffer_docs must be positive, got {B}, {T}, {buffer_docs}")
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        if isinstance(source, (str, os.PathLike)):
            self.shards = shardlib.split_shards(shardlib.list_shards(storage.normalize(source)), split)
        else:
            self.shards = [storage.normalize(s) for s in source]
            if not self.shards:
                raise ValueError("no shards given")
        self.epochs = (None if split == "train" else 1) if epochs == SPLIT_DEFAULT else epochs
        self.buffer_docs = buffer_docs
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.device = torch.device(device)
        self.wait_for_shard = wait_for_shard
        self._open_index, self._open_pf = None, None
        self._buffer = BestFitBuffer()
        # the next row group to consider (owned by this rank or not), as a position in the pass
        self.cursor = {"epoch": 0, "shard": 0, "row_group": 0, "global_row_group": 0}
        self.stats = {"rows": 0, "docs": 0, "doc_tokens": 0, "cropped_tokens": 0, "row_groups": 0}
        self._exhausted = False
        if state is not None:
            self._load_state(state)

    # iteration

    def __iter__(self):
        return self

    def __next__(self):
        if self._exhausted:
            raise StopIteration
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for row in rows:
            if not self._fill_row(row):
                self._exhausted = True
                raise StopIteration
        return _batch_tensors(rows, np.ascontiguousarray(rows[:, 1:]), self.device)

    def _fill_row(self, row):
        """Fills `row` best-fit from the buffer; False if the data ran out first."""
        pos, n = 0, len(row)
        while pos < n:
            while len(self._buffer) < self.buffer_docs and self._read_next_row_group():
                pass
            if not len(self._buffer):
                return False
            space = n - pos
            item = self._buffer.pop_fitting(space)
            if item is None:
                _, tokens = self._buffer.pop_shortest()
                self.stats["cropped_tokens"] += len(tokens) - space
                tokens = tokens[:space]
            else:
                tokens = item[1]
            row[pos:pos + len(tokens)] = tokens
            pos += len(tokens)
        self.stats["rows"] += 1
        return True

    # reading

    def _shard(self, index):
        """The ParquetFile of shard `index` (one open at a time)."""
        if self._open_index != index:
            self.close()
            uri = self.shards[index]
            if self.wait_for_shard is not None:
                self.wait_for_shard(uri)
            self._open_pf, self._open_index = shardlib.open_shard(uri), index
        return self._open_pf

    def close(self):
        if self._open_pf is not None:
            self._open_pf.close(force=True)
        self._open_index, self._open_pf = None, None

    def _texts(self, shard, row_group):
        uri = self.shards[shard]
        try:
            return shardlib.read_row_group(self._shard(shard), uri, row_group)
        except shardlib.ShardError:
            raise
        except Exception as e:  # a corrupt page: pyarrow's message does not name the file
            raise shardlib.ShardError(f"{uri}: row group {row_group}: unreadable ({type(e).__name__}: {e})") from e

    def _next_owned(self):
        """Advances the cursor past this rank's next row group and returns (epoch, shard,
        row_group), or None at the end of the last epoch."""
        c = self.cursor
        while True:
            if c["shard"] == len(self.shards):
                if c["global_row_group"] <= self.rank:
                    raise StageError(f"{', '.join(map(storage.redact, self.shards))}: {c['global_row_group']} row group(s) "
                                     f"for {self.world_size} processes, and each reads its own: write the file with more "
                                     f"row groups (pyarrow's row_group_size) or run fewer processes")
                if self.epochs is not None and c["epoch"] + 1 >= self.epochs:
                    return None
                c.update(epoch=c["epoch"] + 1, shard=0, row_group=0, global_row_group=0)
            if c["row_group"] >= self._shard(c["shard"]).num_row_groups:
                c.update(shard=c["shard"] + 1, row_group=0)
                continue
            here = (c["epoch"], c["shard"], c["row_group"])
            owned = c["global_row_group"] % self.world_size == self.rank
            c.update(row_group=c["row_group"] + 1, global_row_group=c["global_row_group"] + 1)
            if owned:
                return here

    def _read_next_row_group(self):
        where = self._next_owned()
        if where is None:
            return False
        epoch, shard, row_group = where
        texts = self._texts(shard, row_group)
        self._add_docs(epoch, shard, row_group, range(len(texts)), texts)
        self.stats["row_groups"] += 1
        self.stats["docs"] += len(texts)
        return True

    def _add_docs(self, epoch, shard, row_group, rows, texts):
        """Tokenizes documents and buffers them, each cut to T+1 tokens: a longer document could
        only ever be placed cropped, and the cut keeps the buffer's memory bounded."""
        limit = self.T + 1
        # Only the first T+1 tokens of a document are ever used, so a long one is tokenized from a
        # prefix of PREFIX_CHARS_PER_TOKEN * (T+1) characters (several times the chars/token of
        # real BPE vocabularies); its last pre-token chunk may tokenize differently than in the
        # whole text, so the prefix must give PREFIX_MARGIN tokens to spare, else the whole text
        # is tokenized. On small T this skips most of the tokenizer's work.
        cap = PREFIX_CHARS_PER_TOKEN * limit
        bos = self.tokenizer.bos_token_id
        batch = self.tokenizer.encode([t[:cap] for t in texts], prepend=bos, num_threads=self.threads)
        for row, text, ids in zip(rows, texts, batch):
            if len(text) > cap and len(ids) < limit + PREFIX_MARGIN:
                ids = self.tokenizer.encode(text, prepend=bos)
            self.stats["doc_tokens"] += len(ids)
            if len(ids) > limit:
                self.stats["cropped_tokens"] += len(ids) - limit
                ids = ids[:limit]
            self._buffer.add((epoch, shard, row_group, row), len(ids), np.array(ids, dtype=np.int32))

    # exact resume

    def _fingerprint(self):
        names = "\n".join(s.rsplit("/", 1)[-1] for s in self.shards)
        return {"rank": self.rank, "world_size": self.world_size, "T": self.T, "vocab_size": self.tokenizer.vocab_size,
                "shards": f"{len(self.shards)}:{hashlib.sha256(names.encode()).hexdigest()[:16]}"}

    def state_dict(self):
        """JSON-serialisable state after the last batch: the cursor, the buffered documents as
        [epoch, shard, row_group, [rows]] groups (re-read and re-tokenized on resume), stats."""
        groups = defaultdict(list)
        for epoch, shard, row_group, row in self._buffer.refs():
            groups[(epoch, shard, row_group)].append(row)
        return {"version": STATE_VERSION, "kind": "pretrain", **self._fingerprint(),
                "epochs": self.epochs, "cursor": dict(self.cursor), "exhausted": self._exhausted,
                "buffer": [[*key, rows] for key, rows in sorted(groups.items())], "stats": dict(self.stats)}

    def _load_state(self, state):
        _check_state(state, "pretrain", self._fingerprint())
        self.cursor = {k: int(state["cursor"][k]) for k in self.cursor}
        self.stats.update(state["stats"])
        self._exhausted = bool(state["exhausted"])
        saved = dict(self.stats)
        for epoch, shard, row_group, rows in state["buffer"]:
            texts = self._texts(shard, row_group)
            self._add_docs(epoch, shard, row_group, rows, [texts[r] for r in rows])
        self.stats = saved  # re-buffering is not new data

    # progress

    @property
    def epoch(self):
        return self.cursor["epoch"]

    def crop_fraction(self):
        """Share of the documents' tokens cropped away (never trained on). A document tokenized
        from a prefix counts only the prefix's tokens, so on long documents this is a lower bound."""
        return self.stats["cropped_tokens"] / max(1, self.stats["doc_tokens"])


def pretrain_loader(tokenizer, B, T, split, data=None, num_shards=-1, storage_uri=None, device="cpu", state=None,
                    source=None):
    """The loader of a training stage: the `split` of the shard directory `data`, or else of corpus
    `source` in the data cache (the run's), for `num_shards` training shards (waiting for shards
    still downloading)."""
    if data:
        return PretrainLoader(tokenizer, B, T, data, split=split, device=device, state=state)
    train, val = dataset.pretrain_shards(num_shards, storage_uri, source=source)
    return PretrainLoader(tokenizer, B, T, train if split == "train" else [val], split=split, device=device,
                          state=state, wait_for_shard=dataset.shard_waiter(storage_uri, source=source))


class ConversationLoader:
    """Batches of rendered conversations, packed (mode='pack') or padded (mode='pad').

    task        any sequence of conversations (`len(task)`, `task[i]`), deterministic per index
    mode        'pack': rows of T+1 tokens filled best-fit (`BestFitBuffer`), each time with the
                largest buffered conversation that fits the rest of the row; only when none fits
                is the rest padded. A conversation is never split across rows, and each starts
                with BOS. (Upstream's SFT packs the same way.)
                'pad': one conversation per row, the batch padded to its longest row.
                Inputs are padded with BOS, targets with -1.
    B, T        rows per batch, and the row length is at most T+1 tokens: a longer conversation
                keeps its first T+1 tokens, a row of its own (upstream renders at most 2048
                tokens of one, for rows of 2049); the rest is never trained on. Counted in
                `stats['cropped']`.
    rank, world_size   rank r takes items r, r+W, ... (default from torch.distributed)
    epochs      passes over the task; None = forever. The last batch may have fewer rows.
    buffer_size conversations kept for best fit (pack mode)
    state       a `state_dict()` to resume from
    """

    def __init__(self, tokenizer, task, B, T, mode="pack", rank=None, world_size=None, epochs=None,
                 buffer_size=100, device="cpu", state=None):
        if mode not in ("pack", "pad"):
            raise ValueError(f"mode must be 'pack' or 'pad', not {mode!r}")
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        self.tokenizer, self.task, self.B, self.T, self.mode = tokenizer, task, B, T, mode
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.per_epoch = len(range(self.rank, len(task), self.world_size))
        if self.per_epoch == 0:
            raise ValueError(f"rank {self.rank} of {self.world_size} gets no conversations: the task has {len(task)}")
        self.epochs, self.buffer_size = epochs, buffer_size if mode == "pack" else 1
        self.device = torch.device(device)
        self.pad_id = tokenizer.bos_token_id
        self._buffer = BestFitBuffer()
        self.cursor = {"epoch": 0, "index": 0}  # the next item is task[rank + index * world_size]
        self.stats = {"conversations": 0, "cropped": 0, "rows": 0, "tokens": 0, "pad_tokens": 0}
        self._exhausted = False
        if state is not None:
            self._load_state(state)

    def __iter__(self):
        return self

    def __next__(self):
        if self._exhausted:
            raise StopIteration
        rows = []
        while len(rows) < self.B:
            row = self._next_row()
            if row is None:
                self._exhausted = True
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        width = self.T + 1 if self.mode == "pack" else max(len(ids) for ids, _ in rows)
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        trained = np.zeros((len(rows), width), dtype=bool)
        for i, (ids, mask) in enumerate(rows):
            tokens[i, :len(ids)], trained[i, :len(ids)] = ids, mask
            self.stats["tokens"] += len(ids)
            self.stats["pad_tokens"] += width - len(ids)
        targets = np.where(trained[:, 1:], tokens[:, 1:], -1)
        self.stats["rows"] += len(rows)
        return _batch_tensors(tokens, targets, self.device)

    def _next_row(self):
        """(ids, mask) of the next row, or None when the data ran out."""
        self._refill()
        if not len(self._buffer):
            return None
        if self.mode == "pad":
            return self._buffer.pop_shortest()[1]
        parts, space = [], self.T + 1
        while (item := self._buffer.pop_fitting(space)) is not None:
            parts.append(item[1])
            space -= len(item[1][0])
            self._refill()
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _refill(self):
        c = self.cursor
        while len(self._buffer) < self.buffer_size:
            if c["index"] == self.per_epoch:
                if self.epochs is not None and c["epoch"] + 1 >= self.epochs:
                    return
                c.update(epoch=c["epoch"] + 1, index=0)
            self._add(c["epoch"], c["index"])
            self.stats["conversations"] += 1
            c["index"] += 1

    def _add(self, epoch, index):
        i = self.rank + index * self.world_size
        try:
            ids, mask = self.tokenizer.render_conversation(self.task[i], max_tokens=1 << 62)
        except ConversationError as e:
            raise ConversationError(f"task item {i}: {e}") from e
        if len(ids) > self.T + 1:
            self.stats["cropped"] += 1
            ids, mask = ids[:self.T + 1], mask[:self.T + 1]
        self._buffer.add((epoch, index), len(ids), (np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)))

    def _fingerprint(self):
        return {"rank": self.rank, "world_size": self.world_size, "T": self.T, "mode": self.mode,
                "task_len": len(self.task), "vocab_size": self.tokenizer.vocab_size}

    def state_dict(self):
        """JSON-serialisable state: the cursor, the buffered items as [epoch, index] (re-rendered
        on resume), stats."""
        return {"version": STATE_VERSION, "kind": "conversations", **self._fingerprint(), "epochs": self.epochs,
                "cursor": dict(self.cursor), "exhausted": self._exhausted,
                "buffer": [list(ref) for ref in self._buffer.refs()], "stats": dict(self.stats)}

    def _load_state(self, state):
        _check_state(state, "conversations", self._fingerprint())
        self.cursor = {k: int(state["cursor"][k]) for k in self.cursor}
        self.stats.update(state["stats"])
        self._exhausted = bool(state["exhausted"])
        saved = dict(self.stats)
        for epoch, index in state["buffer"]:
            self._add(epoch, index)
        self.stats = saved

    @property
    def epoch(self):
        return self.cursor["epoch"]

    def progress(self):
        """Fraction of the current epoch's items taken from the task (for schedules)."""
        return self.cursor["index"] / self.per_epoch
