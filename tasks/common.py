"""The Task shape shared by every dataset: a sliceable, optionally shuffled sequence of conversations.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...], **metadata}` as rendered by
`nanochat.tokenizer`; tasks add the metadata their evaluator needs (e.g. `letters`). Data files come
from the registry (`data_file`), are read on first access (never at import or construction) and are
validated row by row: a bad row raises `TaskDataError` naming the file and the row (parquet, 0-based)
or line (JSONL, 1-based), or, with `on_error="skip"`, is dropped and counted in `task.skipped`.
"""

import json
import random
import re
from array import array
from decimal import Decimal
from functools import cached_property

import pyarrow.parquet as pq

from nanochat import storage
from nanochat.dataset import fetch
from nanochat.tokenizer import ConversationError, assistant_parts, normalize_messages

LETTERS = "ABCDEFGHIJ"


class TaskDataError(ValueError):
    """A data file or one of its rows does not have the expected shape; the message names both."""


def data_file(relpath):
    """Local path or URI of a registered data file (e.g. "hf/openai/gsm8k/main/test-00000-of-00001.parquet"),
    fetched into the data cache on first use; in a pipeline run, the file the run's download
    declared (see `nanochat.dataset.fetch`)."""
    return fetch(relpath)


class Task:
    """A sequence of conversations: the examples `start:stop:step` of the dataset, taken in dataset
    order, or, with `seed`, in a fixed pseudo-random order (shuffle first, then slice, so
    `stop=N, seed=S` is a random subset of N examples). `stop` past the end is clamped.

    Subclasses set `eval_type` ("categorical": compare the logits of `conversation["letters"]`;
    "generative": sample a completion) and define `num_examples`, `get_example` and `evaluate`."""

    eval_type = None

    def __init__(self, start=0, stop=None, step=1, seed=None):
        assert isinstance(start, int) and start >= 0, f"start must be an int >= 0, got {start!r}"
        assert stop is None or (isinstance(stop, int) and stop >= start), f"stop must be None or an int >= start ({start}), got {stop!r}"
        assert isinstance(step, int) and step >= 1, f"step must be an int >= 1, got {step!r}"
        assert seed is None or isinstance(seed, int), f"seed must be None or an int, got {seed!r}"
        self.start, self.stop, self.step, self.seed = start, stop, step, seed

    def num_examples(self):
        """Examples in the whole dataset, before slicing."""
        raise NotImplementedError

    def get_example(self, index):
        """Conversation number `index` of the whole dataset (a fresh dict the caller may modify)."""
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        """Whether `completion` (the predicted letter, or the generated assistant text) is correct."""
        raise NotImplementedError

    def reward(self, conversation, completion):
        """The RL reward of a completion: 1.0 if `evaluate` judges it correct, else 0.0."""
        return float(self.evaluate(conversation, completion))

    @cached_property
    def _order(self):
        n = self.num_examples()
        if self.seed is None:
            return range(n)
        order = list(range(n))
        random.Random(self.seed).shuffle(order)
        return array("q", order)

    def _positions(self):
        n = self.num_examples()
        return range(self.start, n if self.stop is None else min(self.stop, n), self.step)

    def __len__(self):
        return len(self._positions())

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise TypeError(f"{type(self).__name__} indices are ints, not {type(index).__name__}")
        positions = self._positions()
        if not -len(positions) <= index < len(positions):
            raise IndexError(f"{type(self).__name__} index {index} out of range ({len(positions)} examples)")
        return self.get_example(self._order[positions[index]])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class FileTask(Task):
    """A task whose examples are the validated rows of one data file: `self.rows`, read on first access.

    `path` (a local path or URI) replaces the registry's file; `on_error` is "raise" or "skip"."""

    def __init__(self, relpath, path=None, on_error="raise", **kwargs):
        assert on_error in ("raise", "skip"), f"on_error must be 'raise' or 'skip', got {on_error!r}"
        super().__init__(**kwargs)
        self.relpath, self.path, self.on_error = relpath, path, on_error
        self.skipped = []  # one message per dropped row, filled when the file is read

    @property
    def uri(self):
        return self.path if self.path is not None else data_file(self.relpath)

    def read(self, uri):
        """[(where, raw record)] of the file: where is e.g. "row 12" or "line 3"."""
        raise NotImplementedError

    def parse(self, record):
        """The validated form of one raw record (None: left out on purpose); raises ValueError (or
        ConversationError) if bad."""
        raise NotImplementedError

    @cached_property
    def rows(self):
        uri = self.uri
        rows, self.skipped = [], []
        for where, record in self.read(uri):
            try:
                if isinstance(record, Exception):  # unreadable record (e.g. a line that is not JSON)
                    raise record
                row = self.parse(record)
                if row is not None:
                    rows.append(row)
            except (ValueError, TypeError, KeyError) as e:
                message = f"{uri}: {where}: {e}"
                if self.on_error == "raise":
                    raise TaskDataError(message) from None
                self.skipped.append(message)
        if self.skipped and not rows:  # more likely the wrong file (or a bug) than data to skip
            raise TaskDataError(f"{uri}: every one of {len(self.skipped)} records is bad; the first: {self.skipped[0]}")
        return rows

    def num_examples(self):
        return len(self.rows)


def read_parquet(uri, columns):
    """[("row i", {column: value})] of a parquet file, after checking it has every column."""
    with storage.open(uri, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            table = pf.read(columns=[c for c in columns if c in names])
        except (OSError, ValueError) as e:  # pyarrow's errors do not name the file
            raise TaskDataError(f"{uri}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise TaskDataError(f"{uri}: missing column(s) {missing} (has {names})")
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def read_jsonl(uri):
    """[("line n", parsed JSON)] of a JSONL file (1-based line numbers; blank lines ignored). A line
    that is not JSON gets a ValueError in place of its record, so the on_error policy applies."""
    out = []
    with storage.open(uri, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {lineno}", json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                out.append((f"line {lineno}", ValueError(f"not valid JSON ({e})")))
    return out


def read_text_lines(uri):
    """[("line n", text)] of a UTF-8 text file (1-based line numbers; blank lines ignored)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{uri}: not UTF-8 text (byte {e.start})") from None
    return [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def check_conversation(messages):
    """A copy of a list of {role, content} messages, checked to render: an optional leading system
    message, then user/assistant alternating, assistant last, assistant content a str or parts."""
    if not isinstance(messages, list):
        raise ValueError(f"expected a list of messages, got {type(messages).__name__}")
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    try:
        first = messages[0] if messages else None
        if isinstance(first, dict) and first.get("role") == "system" and not isinstance(first.get("content"), str):
            raise ConversationError("message 0: system content must be a string")
        for m in normalize_messages(messages):
            if m["role"] == "assistant":
                assistant_parts(m["content"])
    except ConversationError as e:
        raise ValueError(f"invalid conversation: {e}") from None
    return messages


def require_str(record, *fields):
    for field in fields:
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise ValueError(f"field {field!r} must be a non-empty string, got {record.get(field)!r:.80}")


def render_mc(question, letters, choices):
    """A multiple-choice question as the user message. The letter comes after its choice, with no
    space before it, so that it is the very token ("A", not " A") the assistant answers with: small
    models bind the letter to the choice better this way (nanochat's finding)."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question, choices, answer, **metadata):
    """A categorical conversation: choice `answer` (an index) is right; `letters` lists the options."""
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": letters,
        **metadata,
    }


def evaluate_mc(conversation, completion):
    assert isinstance(completion, str), f"completion must be a str (a letter), got {type(completion).__name__}"
    return completion.strip() == conversation["messages"][-1]["content"]


FINAL_RE = re.compile(r"####[ \t]*([^\n]*)")
NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def final_answer(text):
    """The text after the first `####` marker (stripped), or None: the answer convention of GSM8K,
    which the generative tasks share."""
    m = FINAL_RE.search(text)
    return m.group(1).strip() if m else None


def parse_number(text):
    """The number at the start of `text` as a Decimal, commas and "$" dropped ("$1,000.50" -> 1000.50),
    or None."""
    if text is None:
        return None
    m = NUMBER_RE.match(text.strip().replace(",", "").replace("$", ""))
    return Decimal(m.group(0)) if m else None


def assistant_text(conversation):
    """The reference assistant message as one string (parts joined, tool calls included)."""
    return "".join(p["text"] for p in assistant_parts(conversation["messages"][-1]["content"]))
