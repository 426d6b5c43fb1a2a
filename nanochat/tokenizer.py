"""The runtime tokenizer: BPE ranks trained by rustbpe, encoded by tiktoken, plus chat rendering.

Saved as two plain files under a directory URI (never pickled): `ranks.tiktoken` (one
`base64(token bytes) rank` line per token, tiktoken's own format) and `tokenizer.json` (format,
split pattern, special tokens, the ranks file's sha256), written last so that a directory with
a readable tokenizer.json always holds a complete tokenizer.
"""

import base64
import hashlib

import tiktoken

import rustbpe
from nanochat import storage

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; also a stop token for generation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, forced into the stream, never trained on
    "<|output_end|>",
]
# nanochat's split: GPT-4's, but numbers in runs of at most 2 digits (fewer tokens wasted on
# number chunks in a small vocabulary).
SPLIT_PATTERN = rustbpe.NANOCHAT_PATTERN
FORMAT = "nanochat-tokenizer/1"
RANKS_FILE = "ranks.tiktoken"
META_FILE = "tokenizer.json"


class ConversationError(ValueError):
    """A conversation that cannot be rendered: wrong roles or order, or a malformed message."""


class Tokenizer:
    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN):
        """`mergeable_ranks`: dict bytes -> rank, ranks 0..n-1; special tokens get ids n.."""
        n = len(mergeable_ranks)
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_ids
        )

    # construction and persistence

    @classmethod
    def train(cls, texts, vocab_size, pattern=SPLIT_PATTERN):
        """Trains BPE on an iterator of str so that the full vocabulary, special tokens
        included, has `vocab_size` entries."""
        n_merges_vocab = vocab_size - len(SPECIAL_TOKENS)
        if n_merges_vocab < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(texts, n_merges_vocab, pattern=pattern)
        return cls(dict(bpe.get_mergeable_ranks()), pattern)

    def ranks_file(self):
        """The contents of ranks.tiktoken: a base64 token and its rank per line, by rank."""
        lines = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for tok, rank in lines)

    def save(self, directory):
        """Writes ranks.tiktoken, then tokenizer.json (last) under `directory`; returns their URIs."""
        ranks = self.ranks_file()
        ranks_uri, meta_uri = storage.join(directory, RANKS_FILE), storage.join(directory, META_FILE)
        storage.write_bytes(ranks_uri, ranks)
        storage.write_json(meta_uri, {
            "format": FORMAT,
            "pattern": self.pattern,
            "special_tokens": self.special_ids,
            "ranks_file": RANKS_FILE,
            "ranks_sha256": hashlib.sha256(ranks).hexdigest(),
            "vocab_size": self.vocab_size,
        })
        return {"tokenizer": meta_uri, "ranks": ranks_uri}

    @classmethod
    def load(cls, directory):
        """Loads and verifies a saved tokenizer; errors name the file and the problem."""
        meta_uri = storage.join(directory, META_FILE)
        if not storage.exists(meta_uri):
            raise FileNotFoundError(f"no tokenizer at {directory} ({META_FILE} missing)")
        meta = storage.read_json(meta_uri)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_uri}: unsupported format {meta.get('format')!r}, expected {FORMAT!r}")
        ranks_uri = storage.join(directory, meta["ranks_file"])
        data = storage.read_bytes(ranks_uri)
        if hashlib.sha256(data).hexdigest() != meta["ranks_sha256"]:
            raise ValueError(f"{ranks_uri}: sha256 does not match {meta_uri} (corrupt or partial file)")
        ranks = parse_ranks(data, ranks_uri)
        tok = cls(ranks, meta["pattern"])
        if tok.special_ids != meta["special_tokens"]:
            raise ValueError(f"{meta_uri}: special tokens differ from this version's {SPECIAL_TOKENS}")
        return tok

    # vocabulary

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    @property
    def bos_token_id(self):
        return self.special_ids["<|bos|>"]

    def encode_special(self, token):
        return self.special_ids[token]

    def id_to_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def token_byte_lengths(self):
        """Byte length of every token id, 0 for special tokens (they carry no text): the weights
        that turn a per-token loss into bits per byte."""
        lengths = [0] * self.vocab_size
        for tok, rank in self.mergeable_ranks.items():
            lengths[rank] = len(tok)
        return lengths

    # encoding

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encodes a str (-> list of ids) or a list of str (-> list of lists, in threads) as
        ordinary text; `prepend`/`append` are token ids or special-token strings."""
        pre = [self._id(prepend)] if prepend is not None else []
        post = [self._id(append)] if append is not None else []
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        return [pre + ids + post for ids in batch]

    def _id(self, token):
        return self.special_ids[token] if isinstance(token, str) else int(token)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # chat

    def render_conversation(self, conversation, max_tokens=2048):
        """Token ids of a whole conversation and a mask that is 1 exactly where the model is
        trained: assistant text, python tool calls and <|assistant_end|> (never user text, never
        tool output). A leading system message folds into the first user message."""
        ids, mask = self._render(normalize_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def _render(self, messages):
        """Ids and training mask of normalized messages."""
        ids, mask = [self.bos_token_id], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        s = self.special_ids
        for message in messages:
            if message["role"] == "user":
                add([s["<|user_start|>"], *self.enc.encode_ordinary(message["content"]), s["<|user_end|>"]], 0)
                continue
            add([s["<|assistant_start|>"]], 0)
            for part in assistant_parts(message["content"]):
                text = self.enc.encode_ordinary(part["text"])
                if part["type"] == "text":
                    add(text, 1)
                elif part["type"] == "python":
                    add([s["<|python_start|>"], *text, s["<|python_end|>"]], 1)
                else:  # python_output: produced by the tool at inference time
                    add([s["<|output_start|>"], *text, s["<|output_end|>"]], 0)
            add([s["<|assistant_end|>"]], 1)
        return ids, mask

    def render_for_completion(self, conversation, continue_final_message=False):
        """Prompt ids that ask the model for the next assistant turn: the conversation without its
        final assistant message (if any), then <|assistant_start|>. With `continue_final_message`, a
        final assistant message is kept open instead (a prefill the model continues), as
        transformers' apply_chat_template(continue_final_message=True). Takes the shapes API clients
        send (see normalize_messages' `lenient`)."""
        messages = normalize_messages(conversation, allow_open_end=True, lenient=True)
        prefill = []
        if messages[-1]["role"] == "assistant":
            *messages, last = messages
            if continue_final_message:
                if not isinstance(last["content"], str):
                    raise ConversationError("a final assistant message to continue must be a string")
                prefill = self.enc.encode_ordinary(last["content"])
        ids, _ = self._render(messages)
        return ids + [self.special_ids["<|assistant_start|>"]] + prefill


def parse_ranks(data, uri="ranks"):
    """Parses tiktoken's `base64 rank` lines, checking ranks are 0..n-1 and every byte is a token."""
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            tok_b64, rank = line.split()
            ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{uri}: line {lineno}: expected 'base64 rank', got {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{uri}: ranks are not exactly 0..{len(ranks) - 1} (duplicates or gaps)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{uri}: single-byte tokens missing for bytes {missing[:8]}")
    return ranks


def normalize_messages(conversation, allow_open_end=False, lenient=False):
    """The messages of a conversation (a dict with 'messages', or a list), with a leading
    system message folded into the first user message ("system\n\nuser"), checked to alternate
    user/assistant starting with the user (and ending with the assistant unless `allow_open_end`).

    `lenient` takes the shapes API clients send (training data stays strict): a developer message
    is a system message; a system message anywhere folds into the next user message (several in a
    row are joined by a blank line first); turns in a row from one role are joined into one, their
    texts separated by a blank line. The exported chat template (hf_tokenizer) does the same."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ConversationError("a conversation is a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i}: expected a dict with 'role' and 'content'")
    if lenient:
        messages = join_turns(messages)
    elif messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("a system message must be followed by a user message")
        first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first, *messages[2:]]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConversationError(f"message {i}: role {m['role']!r}, expected {expected!r} (roles must alternate, user first)")
        if expected == "user" and not isinstance(m["content"], str):
            raise ConversationError(f"message {i}: user content must be a string")
    if not allow_open_end and messages[-1]["role"] != "assistant":
        raise ConversationError("a training conversation must end with an assistant message")
    return messages


def join_turns(messages):
    """Messages with system (and developer) messages folded into the next user message and turns in
    a row from one role joined (see normalize_messages)."""
    joined, system = [], None
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role in ("system", "developer"):
            if not isinstance(content, str):
                raise ConversationError(f"message {i}: system content must be a string")
            system = content if system is None else system + "\n\n" + content
            continue
        if role == "user" and system is not None:
            if not isinstance(content, str):
                raise ConversationError(f"message {i}: user content must be a string")
            content, system = system + "\n\n" + content, None
        if joined and joined[-1]["role"] == role:
            content = join_contents(joined.pop()["content"], content)
        joined.append({"role": role, "content": content})
    if system is not None:
        raise ConversationError("a system message must be followed by a user message")
    return joined


def join_contents(first, second):
    """Two turns' contents as one: strings joined by a blank line, else their parts with a blank
    line between."""
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second
    parts = [p for c in (first, second) for p in ([{"type": "text", "text": c}] if isinstance(c, str) else c)]
    k = 1 if isinstance(first, str) else len(first)
    return [*parts[:k], {"type": "text", "text": "\n\n"}, *parts[k:]]


def assistant_parts(content):
    """Assistant content as parts: a str is one text part; a list holds dicts with 'type' in
    text/python/python_output and a str 'text'."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ConversationError(f"assistant content must be a str or a list of parts, not {type(content).__name__}")
    for j, part in enumerate(content):
        if (not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output")
                or not isinstance(part.get("text"), str)):
            raise ConversationError(f"assistant part {j}: expected {{'type': text|python|python_output, 'text': str}}, got {part!r:.100}")
    return content
