"""Pretraining shards: parquet files `shard_NNNNN.parquet` (your own text's: any `.parquet` name) with
one document per row in `text`.

By convention the last shard of a directory is the validation split, the rest are training.
Files are read through fsspec, one row group at a time, so memory stays bounded by a row group.
"""

import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nanochat import storage
from nanochat.common import InputError

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")


class ShardError(InputError, ValueError):
    """A shard is unreadable or does not have the expected schema; the message names the file."""


def list_shards(directory):
    """URIs of the shards in `directory`, in shard order."""
    names = [n for n in storage.listdir(directory) if SHARD_RE.match(n)]
    if not names:
        raise ShardError(f"no shard_NNNNN.parquet files in {directory}")
    return [storage.join(directory, n) for n in names]


def split_shards(shards, split):
    """The shards of a split: 'train' is all but the last, 'val' is the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if len(shards) < 2:
        raise ShardError(f"need at least 2 shards (train + val), found {len(shards)}")
    return shards[:-1] if split == "train" else shards[-1:]


def open_shard(uri):
    """A ParquetFile for a shard, checked to have a string `text` column."""
    try:
        pf = pq.ParquetFile(storage.open(uri, "rb"))
    except Exception as e:  # pyarrow raises several types for a corrupt or truncated file
        raise ShardError(f"{uri}: not a readable parquet file ({e})") from None
    field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
    if field is None:
        raise ShardError(f"{uri}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    if str(field.type) not in ("string", "large_string"):
        raise ShardError(f"{uri}: column 'text' has type {field.type}, expected string")
    return pf


def check_texts(uri):
    """Checks a file of text whole, where download declares it, and returns its characters: a string
    `text` column of valid UTF-8, no null document, and some text besides white space (an empty file
    would pass until a stage found nothing to train on, or trained a tokenizer of bytes alone). A
    ShardError names the file (and the row group); one row group is in memory at a time."""
    pf = open_shard(uri)
    try:
        longest = chars = 0
        for index in range(pf.num_row_groups):
            texts = pf.read_row_group(index, columns=["text"]).column("text")
            if texts.null_count:
                row = pc.index(pc.is_null(texts), True).as_py()
                raise ShardError(f"{uri}: row group {index}, row {row}: 'text' is null")
            try:
                texts.validate(full=True)
            except pa.ArrowInvalid as e:  # bytes that are not UTF-8, written as a string column
                raise ShardError(f"{uri}: row group {index}: 'text' is not valid UTF-8 ({e})") from None
            longest = max(longest, pc.max(pc.utf8_length(pc.utf8_trim_whitespace(texts))).as_py() or 0)
            chars += pc.sum(pc.utf8_length(texts)).as_py() or 0
        rows = pf.metadata.num_rows
    finally:
        pf.close(force=True)
    if longest == 0:
        raise ShardError(f"{uri}: no text ({rows} rows, all empty or white space)" if rows else f"{uri}: no rows")
    return chars


def read_row_group(pf, uri, index):
    """The documents of one row group, as a list of str; a null document is an error."""
    texts = pf.read_row_group(index, columns=["text"]).column("text").to_pylist()
    for row, text in enumerate(texts):
        if text is None:
            raise ShardError(f"{uri}: row group {index}, row {row}: 'text' is null")
    return texts


def iter_texts(shards, max_chars=None, doc_cap=None):
    """Yields documents from `shards` in order, each cut to `doc_cap` characters, stopping once
    `max_chars` characters have been yielded."""
    total = 0
    for uri in shards:
        pf = open_shard(uri)
        for index in range(pf.num_row_groups):
            for text in read_row_group(pf, uri, index):
                if doc_cap is not None:
                    text = text[:doc_cap]
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return
