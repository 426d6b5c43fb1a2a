"""Generation: a preallocated KV cache whose rows sit at their own positions, batched decoding of
many requests at once (continuous batching: a request joins the running batch after its prefill;
finished rows leave), sampling, stops, the python tool, and UTF-8-safe streaming text.

    engine = Engine(model, tokenizer)
    request = engine.generate(tokenizer.render_for_completion(messages), SamplingParams(temperature=0))
    request.completions[0].text

A request's prompt is prefilled once and fanned out to its n samples (its KV rows are copied);
prompts of similar lengths added together are prefilled in one forward.
Each `step()` feeds every active row's last token through the model in one forward. A row that
writes <|python_start|> expr <|python_end|> gets the expression evaluated in the sandbox (in a
thread, so other rows keep decoding) and the result forced in as <|output_start|> result
<|output_end|>. The server drives `add`/`step` from one thread per device (nanochat/serve/).

Log-probabilities are defined once: log_softmax of the model's soft-capped logits, before
temperature, penalties, top-k and top-p, whichever way the token was chosen (greedy, sampled, or a
tool's output forced in). With SamplingParams.logprobs = k, each completion carries a TokenLogprob per
token of its token_ids (`Completion.logprobs`), and each event carries those of the tokens since the
last one; with prompt_logprobs = k, the request carries one per prompt token
(`Request.prompt_logprobs`: None first, as the first token has no context), computed from the
prefill's own forward, in the engine's thread.

The engine runs whatever model it is given, on any device; sampling's passes over the logits are
torch's unless the caller hands it others (`SamplingOps`; nanochat.inference gives nanochat.cpu's
on CPU).
"""

import codecs
import concurrent.futures
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.execution import calculator

TOOL_WORKERS = 4  # tool calls evaluated at once (each in its own sandbox process)
MAX_ROWS = 16  # default batch capacity: sequences decoded together
DRAW_BLOCK = 256  # sampling's inverse CDF goes block by block over longer vectors


# What each SamplingParams field must be: (test, what it says when it fails).
SAMPLING_RULES = {
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number of at least 0"),
    "top_k": (lambda v: v is None or v >= 1, "at least 1, or None (every token)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "max_tokens": (lambda v: v >= 0, "at least 0"),
    "frequency_penalty": (math.isfinite, "a finite number"),
    "presence_penalty": (math.isfinite, "a finite number"),
    "logprobs": (lambda v: v is None or v >= 0, "at least 0, or None (off)"),
    "prompt_logprobs": (lambda v: v is None or v >= 0, "at least 0, or None (off)"),
}


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens (None: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 256
    stop: tuple = ()  # strings that end a completion (not included in its text)
    seed: int | None = None  # sample i of a request draws from a generator seeded with seed + i
    # OpenAI's penalties: a token's logit drops by frequency_penalty x (its count in the completion so
    # far) + presence_penalty if it occurs there at all; they apply to greedy rows too
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # k: each generated token's TokenLogprob with the k most likely tokens (None: off)
    prompt_logprobs: int | None = None  # k: the same for each prompt token after the first (None: off)

    def __post_init__(self):
        """A value the sampling passes cannot take is a ValueError naming its field: torch would fail
        deep inside a step, and a NaN temperature would decode greedily without a word."""
        for name, (holds, wanted) in SAMPLING_RULES.items():
            if not holds(getattr(self, name)):
                raise ValueError(f"{name} must be {wanted}, not {getattr(self, name)!r}")

    @property
    def penalizes(self):
        return bool(self.frequency_penalty or self.presence_penalty)

    @property
    def truncates(self):
        """Top-k or top-p leave some tokens out."""
        return self.top_k is not None or self.top_p < 1.0


@dataclass
class TokenLogprob:
    """A token and its log-probability where it was chosen or given, with the k most likely tokens
    there: `top` is [(token id, logprob)], most likely first (it may or may not hold `token`)."""
    token: int
    logprob: float
    top: list


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end token or stop string) or "length"
    logprobs: list | None = None  # with params.logprobs: a TokenLogprob per token of token_ids


class Request:
    """A prompt, its sampling parameters and n completions. `on_event(index, text, finish_reason,
    logprobs)` is called from the engine's thread for every released piece of text and once more
    (with text possibly empty) when completion `index` finishes; `logprobs` holds the TokenLogprobs
    of the tokens accepted since the previous event (with params.logprobs; else it is empty). Set
    `cancelled` to stop it."""

    def __init__(self, prompt_ids, params=None, n=1, on_event=None):
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.prompt_ids = list(prompt_ids)
        self.params = params or SamplingParams()
        self.n = n
        self.on_event = on_event
        self.completions = [Completion(i, logprobs=None if self.params.logprobs is None else []) for i in range(n)]
        self.sent = [0] * n  # per completion, the logprobs already carried by an event
        self.prompt_logprobs = None  # with params.prompt_logprobs, after prefill: None, then a TokenLogprob per token
        self.cancelled = False

    @property
    def done(self):
        return all(c.finish_reason is not None for c in self.completions)

    def fail(self):
        """Ends every unfinished completion with finish_reason "error"."""
        for completion in self.completions:
            if completion.finish_reason is None:
                self.emit(completion.index, "", "error")

    def emit(self, index, text, finish_reason=None):
        completion = self.completions[index]
        completion.text += text
        if finish_reason is not None:
            completion.finish_reason = finish_reason
        if self.on_event is not None and (text or finish_reason is not None):
            logprobs = completion.logprobs[self.sent[index]:] if completion.logprobs is not None else []
            self.sent[index] += len(logprobs)
            self.on_event(index, text, finish_reason, logprobs)


class TextStream:
    """The text of a growing sequence of tokens, released in pieces that never end inside a UTF-8
    character (a multi-byte character can span tokens) nor show any part of a stop string."""

    def __init__(self, stops=()):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = [s for s in stops if s]
        self.text = ""
        self.released = 0
        self.stopped = False  # a stop string was found; the text is cut before it

    def add(self, data):
        """Appends a token's bytes; returns the text that is now safe to release."""
        start = len(self.text)
        self.text += self.decoder.decode(data)
        for stop in self.stops:
            i = self.text.find(stop, max(0, start - len(stop) + 1))
            if i >= 0:
                self.text, self.stopped = self.text[:i], True
        held = 0 if self.stopped else self.held_back()
        return self.release(len(self.text) - held)

    def held_back(self):
        """Length of the longest end of the text that could begin a stop string."""
        for n in range(min(len(self.text), max(map(len, self.stops), default=1) - 1), 0, -1):
            if any(stop.startswith(self.text[-n:]) for stop in self.stops):
                return n
        return 0

    def finish(self):
        """The rest of the text (an unfinished UTF-8 character becomes U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self.release(len(self.text))

    def release(self, end):
        piece = self.text[self.released:end]
        self.released = max(self.released, end)
        return piece


class RowCache:
    """Keys and values for up to `rows` sequences of `max_len` positions, each row at its own
    length (and, for a model with the smear option, each position's token embedding). Active rows
    are kept in slots 0..B-1, so a decode step reads a view, never a gather. `prefill(...)` and
    `decode(...)` give the object a model forward uses (nanochat.gpt's KV-cache protocol)."""

    def __init__(self, config, rows, max_len, dtype, device):
        shape = (config.n_layer, rows, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # the smear option's previous-token embeddings, kept per position as the keys are: a padded
        # prefill, a row decoding the same token again after a tool call and a copied row all stay right
        self.embeddings = torch.zeros(rows, max_len, config.n_embd, dtype=dtype, device=device) if config.smear else None
        self.lengths = [0] * rows
        self.max_len = max_len

    def prefill(self, start, count):
        """A view for `count` fresh prompts in the slots from `start`, padded to one length."""
        self.lengths[start:start + count] = [0] * count
        return CacheView(self, slice(start, start + count), 0)

    def decode(self, num_rows):
        """A view for one new token in each of the slots 0..num_rows-1; rows all of one length (one
        request's samples, or a lone request) need no mask."""
        lengths = self.lengths[:num_rows]
        return CacheView(self, slice(0, num_rows), lengths[0] if len(set(lengths)) == 1 else lengths)

    def copy(self, src, dst):
        """Slot dst takes slot src's keys, values, embeddings and length."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        if self.embeddings is not None:
            self.embeddings[dst, :n] = self.embeddings[src, :n]
        self.lengths[dst] = n


class CacheView:
    """One forward's window on a RowCache: `rows` (a slice of slots), all at the int `pos`
    (prefill, or decoding rows of one length), or each at its own length (a list; decode, one
    token per row)."""

    def __init__(self, cache, rows, pos):
        self.cache, self.rows = cache, rows
        device = cache.k.device
        if isinstance(pos, int):
            self.pos, self.attn_mask = pos, None
            return
        self.pos = torch.tensor(pos, device=device)
        self.end = max(pos) + 1
        self.row_index = torch.arange(rows.start, rows.stop, device=device)
        # Row b sees its own keys 0..pos[b]; the keys after them belong to longer rows. (The model adds
        # its sliding windows to this mask.)
        self.attn_mask = (torch.arange(self.end, device=device) <= self.pos[:, None])[:, None, None, :]

    def get_pos(self):
        return self.pos

    def insert_embedding(self, x):
        stored = self.cache.embeddings
        if self.attn_mask is None:
            stored[self.rows, self.pos:self.pos + x.size(1)] = x
            return None if self.pos == 0 else stored[self.rows, self.pos - 1:self.pos]
        stored[self.row_index, self.pos] = x[:, 0].to(stored.dtype)
        return stored[self.row_index, self.pos - 1].unsqueeze(1)

    def insert_kv(self, layer, k, v):
        keys, values = self.cache.k[layer], self.cache.v[layer]
        if self.attn_mask is None:
            end = self.pos + k.size(2)
            keys[self.rows, :, self.pos:end] = k
            values[self.rows, :, self.pos:end] = v
        else:  # index_put does not cast as the slice assignment above does (bf16 k, v under autocast)
            end = self.end
            keys[self.row_index, :, self.pos] = k[:, :, 0].to(keys.dtype)
            values[self.row_index, :, self.pos] = v[:, :, 0].to(values.dtype)
        return keys[self.rows, :, :end], values[self.rows, :, :end]

    def advance(self, num_tokens):
        lengths = self.cache.lengths
        for slot in range(self.rows.start, self.rows.stop):
            lengths[slot] += num_tokens


class Row:
    """One sample being generated: its request, its place there, its sampling state."""

    def __init__(self, request, index, device):
        self.request, self.index = request, index
        params = request.params
        self.generator = None
        if params.temperature > 0:
            seed = params.seed + index if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device).manual_seed(seed)
        self.text = TextStream(params.stop)
        self.token = None  # the next token to feed (generated, not yet in the cache)
        self.forced = deque()  # tool output tokens to feed instead of sampling
        self.tool_call = None  # token ids of a python call being written
        self.tool_result = None  # the future of a running call
        self.finished = False

    @property
    def completion(self):
        return self.request.completions[self.index]


class ContextTooLong(ValueError):
    """A prompt longer than the engine's context (the server's `context_length_exceeded`)."""


class TooManySamples(ValueError):
    """A request's n beyond the rows the engine decodes at once (the server's 400 naming n)."""


class Engine:
    def __init__(self, model, tokenizer, max_rows=MAX_ROWS, max_len=None, ops=None):
        self.model, self.tokenizer = model, tokenizer
        self.ops = ops or SamplingOps()
        param = next(model.parameters())
        self.device = param.device
        self.max_len = max_len or model.config.sequence_len
        self.cache = RowCache(model.config, max_rows, self.max_len, param.dtype, self.device)
        self.max_rows = max_rows
        self.rows = []  # the active rows; rows[i] lives in cache slot i
        special = tokenizer.special_ids
        self.end_ids = {special["<|assistant_end|>"], special["<|bos|>"]}
        self.python_start, self.python_end = special["<|python_start|>"], special["<|python_end|>"]
        self.output_start, self.output_end = special["<|output_start|>"], special["<|output_end|>"]
        self.tools = concurrent.futures.ThreadPoolExecutor(TOOL_WORKERS, thread_name_prefix="tool")

    def reset(self):
        """Forgets every active row (after a failure)."""
        self.rows = []

    @property
    def free_rows(self):
        return self.max_rows - len(self.rows)

    def check(self, request):
        """Raises ContextTooLong (its prompt) or TooManySamples (its n) if the request can never run here."""
        if len(request.prompt_ids) > self.max_len:  # a prompt that fills the context still gets its one next token
            raise ContextTooLong(f"the prompt has {len(request.prompt_ids)} tokens; the context holds {self.max_len}")
        if request.n > self.max_rows:
            raise TooManySamples(f"n={request.n} is more than the {self.max_rows} rows this engine decodes at once")

    @torch.inference_mode()
    def add(self, *requests):
        """Prefills the requests' prompts (those of similar lengths in one forward, see
        prefill_groups), fans each out to its n rows and samples their first tokens. Needs as
        many free rows as their n's add up to."""
        for request in requests:
            self.check(request)
        needed = sum(request.n for request in requests)
        if needed > self.free_rows:
            raise RuntimeError(f"{needed} rows needed, {self.free_rows} free")
        for group in prefill_groups(requests):
            self.prefill(group)

    def prefill(self, requests):
        """One forward over the prompts, right-padded to the longest (a causal model's tokens never
        see the padding after them, and decoding overwrites it). Request j's prompt goes to slot
        slot + j, where its first row stays; its other rows take copies. The forward keeps every
        position's logits only for a request that asks for its prompt's logprobs (prefilled alone,
        see prefill_groups). A request with max_tokens 0 ends there, with no token."""
        slot, lengths = len(self.rows), [len(request.prompt_ids) for request in requests]
        ids = torch.tensor([request.prompt_ids + [0] * (max(lengths) - n) for request, n in zip(requests, lengths)],
                           device=self.device)
        cache, first = self.cache.prefill(slot, len(requests)), requests[0]
        if first.params.prompt_logprobs is not None:  # alone in its group
            every = self.model(ids, kv_cache=cache)[0]  # (T, vocab)
            first.prompt_logprobs = [None, *token_logprobs(every[:-1], first.prompt_ids[1:], first.params.prompt_logprobs)]
            logits = every[-1:]
        else:
            logits = self.model(ids, kv_cache=cache, positions=torch.tensor(lengths, device=self.device) - 1)
        for j, n in enumerate(lengths):
            self.cache.lengths[slot + j] = n
        rows, prompt_of = [Row(request, 0, self.device) for request in requests], list(range(len(requests)))
        for j, request in enumerate(requests):
            for i in range(1, request.n):
                self.cache.copy(slot + j, slot + len(rows))
                rows.append(Row(request, i, self.device))
                prompt_of.append(j)
        self.rows.extend(rows)
        for row in rows:
            if row.request.params.max_tokens <= 0:
                self.finish(row, "length")
        live = [i for i, row in enumerate(rows) if not row.finished]
        self.decide(select_rows(logits, [prompt_of[i] for i in live]), [rows[i] for i in live])
        self.remove_finished()

    @torch.inference_mode()
    def step(self):
        """Decodes one token for every active row."""
        for row in self.rows:
            if row.request.cancelled:
                row.finished = True
        self.remove_finished()
        if not self.rows:
            return
        self.wait_if_all_in_tools()
        ids = torch.tensor([[row.token] for row in self.rows], device=self.device)
        logits = self.model(ids, kv_cache=self.cache.decode(len(self.rows)))[:, -1]
        ready = []
        for slot, row in enumerate(self.rows):
            if row.tool_result is not None:
                if not row.tool_result.done():
                    self.cache.lengths[slot] -= 1  # not fed after all: the same token goes in again
                    continue
                self.force_tool_output(row)
            ready.append(slot)
        self.decide(select_rows(logits, ready), [self.rows[slot] for slot in ready])
        self.remove_finished()

    def generate(self, prompt_ids, params=None, n=1, on_event=None):
        """Runs one request to completion on this (otherwise idle) engine."""
        request = Request(prompt_ids, params, n, on_event)
        self.add(request)
        while not request.done:
            self.step()
        return request

    def stream(self, prompt_ids, params=None):
        """Yields the text of one completion piece by piece (driving this otherwise idle engine)."""
        pieces = []
        request = Request(prompt_ids, params, 1, lambda index, text, finish, logprobs: pieces.append(text))
        try:
            self.add(request)
            while True:
                yield from pieces
                pieces.clear()
                if request.done:
                    return
                self.step()
        finally:
            request.cancelled = True
            self.step()

    # sampling and the per-row state machine

    def decide(self, logits, rows):
        """Each row's next token from its row of logits (B, vocab): a tool's output forced in, or
        sampled; then accepted, with its TokenLogprob if the row's request asks for them (computed
        before sampling's penalties change the logits in place). Only rows that take a sampled
        token draw from their generators: how long a tool runs never changes what a seeded row samples."""
        scored = [i for i, row in enumerate(rows) if row.request.params.logprobs is not None]
        logprobs = torch.log_softmax(select_rows(logits, scored), dim=-1) if scored else None
        sampled = [i for i, row in enumerate(rows) if not row.forced]
        tokens = dict(zip(sampled, self.sample(select_rows(logits, sampled), [rows[i] for i in sampled])))
        chosen = [row.forced.popleft() if row.forced else tokens[i] for i, row in enumerate(rows)]
        entries = {}
        if scored:
            k = max(rows[i].request.params.logprobs for i in scored)
            for i, entry in zip(scored, token_logprobs(logprobs, [chosen[i] for i in scored], k, normalized=True)):
                entry.top = entry.top[:rows[i].request.params.logprobs]
                entries[i] = entry
        for i, row in enumerate(rows):
            self.accept(row, chosen[i], entries.get(i))

    def sample(self, logits, rows):
        """One token per row of logits (B, vocab), each with its row's parameters: greedy rows (those
        without a generator) take the argmax, rows with a temperature alone are drawn together, and
        rows with top-k or top-p one by one."""
        for i, row in enumerate(rows):
            apply_penalties(logits[i], row.request.params, row.completion.token_ids)
        greedy = [i for i, row in enumerate(rows) if row.generator is None]
        plain = [i for i, row in enumerate(rows) if row.generator is not None and not row.request.params.truncates]
        tokens = dict(zip(greedy, self.ops.argmax(select_rows(logits, greedy)).tolist())) if greedy else {}
        if plain:
            temperatures = torch.tensor([[rows[i].request.params.temperature] for i in plain], device=logits.device)
            tokens.update(zip(plain, sample_rows(select_rows(logits, plain), temperatures, [rows[i].generator for i in plain],
                                                 self.ops.softmax_weights)))
        return [tokens[i] if i in tokens else sample_one(logits[i], row.request.params, row.generator, self.ops.softmax_weights)
                for i, row in enumerate(rows)]

    def accept(self, row, token, logprob=None):
        """Appends a generated (or forced) token (and its TokenLogprob, if asked for) to its row:
        stops, tool calls, text, limits."""
        completion, params = row.completion, row.request.params
        completion.token_ids.append(token)
        if logprob is not None:
            completion.logprobs.append(logprob)
        if token in self.end_ids:
            return self.finish(row, "stop")
        if token == self.python_start:
            row.tool_call = []
        elif token == self.python_end and row.tool_call is not None:
            expression = self.tokenizer.decode(row.tool_call)
            row.tool_call, row.tool_result = None, self.tools.submit(calculator, expression)
        elif row.tool_call is not None:
            row.tool_call.append(token)
        text = row.text.add(self.tokenizer.id_to_bytes(token))
        if text:
            row.request.emit(row.index, text)
        row.token = token
        if row.text.stopped:
            self.finish(row, "stop")
        elif len(completion.token_ids) >= params.max_tokens or len(row.request.prompt_ids) + len(completion.token_ids) >= self.max_len:
            self.finish(row, "length")

    def force_tool_output(self, row):
        result, row.tool_result = row.tool_result.result(), None
        if result is not None:
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])

    def wait_if_all_in_tools(self):
        """Blocks (briefly) rather than recompute rows that are all waiting for their tools."""
        futures = [row.tool_result for row in self.rows]
        if all(f is not None and not f.done() for f in futures):
            concurrent.futures.wait(futures, timeout=0.1, return_when=concurrent.futures.FIRST_COMPLETED)

    def finish(self, row, reason):
        row.finished = True
        row.request.emit(row.index, row.text.finish(), reason)

    def remove_finished(self):
        """Drops finished rows, moving the last active rows into their slots."""
        slot = 0
        while slot < len(self.rows):
            if not self.rows[slot].finished:
                slot += 1
                continue
            last = len(self.rows) - 1
            if slot != last:
                self.cache.copy(last, slot)
                self.rows[slot] = self.rows[last]
            self.rows.pop()


def prefill_groups(requests):
    """The requests in groups to prefill together, shortest prompts first: a group takes the next
    prompt while padding every prompt to it costs at most twice the group's own tokens. A request
    that asks for its prompt's logprobs is a group of its own: its forward keeps the logits of
    every position, (prompt length, vocab), and one such tensor at a time is enough."""
    groups, alone = [], [[r] for r in requests if r.params.prompt_logprobs is not None]
    for request in sorted(requests, key=lambda r: len(r.prompt_ids)):
        if request.params.prompt_logprobs is not None:
            continue
        group, longest = (groups[-1] if groups else []), len(request.prompt_ids)
        if group and (len(group) + 1) * longest <= 2 * (sum(len(r.prompt_ids) for r in group) + longest):
            group.append(request)
        else:
            groups.append([request])
    return groups + alone


def select_rows(x, index):
    """x[index] for a list of row indices, without copying x when the index takes every row in order."""
    return x if index == list(range(x.size(0))) else x[index]


def token_logprobs(logits, tokens, k, normalized=False):
    """A TokenLogprob for each row of logits (B, vocab): the log_softmax of the row at tokens[i],
    and the row's k most likely tokens (`normalized`: the rows are log-probabilities already)."""
    if not tokens:
        return []
    logprobs = logits if normalized else torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(tokens, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    values, ids = logprobs.topk(min(k, logprobs.size(1)), dim=-1)
    return [TokenLogprob(token, logprob, list(zip(top_ids, top_values)))
            for token, logprob, top_ids, top_values in zip(tokens, chosen, ids.tolist(), values.tolist())]


def apply_penalties(logits, params, tokens):
    """Takes the frequency and presence penalties of the tokens generated so far off one row's
    logits (vocab,), in place (a fresh row, with no tokens yet, is left untouched)."""
    if tokens and params.penalizes:
        ids, counts = torch.tensor(tokens, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty


def softmax_weights(logits, temperature):
    """softmax(logits / temperature) over the last dimension, unnormalized (the draw needs no sum of
    1); temperature a number, or (B, 1) for logits (B, vocab)."""
    return (logits - logits.amax(dim=-1, keepdim=True)).mul_(1 / temperature).exp_()  # mul: faster than div


def row_argmax(x):
    """The index of each row's (first) maximum."""
    return x.argmax(dim=-1)


@dataclass(frozen=True)
class SamplingOps:
    """Sampling's passes over the logits, each replaceable by a faster one with the same signature and
    results (nanochat.cpu's kernels on CPU): softmax weights, and the argmax of greedy rows."""

    softmax_weights: Callable = softmax_weights
    argmax: Callable = row_argmax


def sample_rows(logits, temperatures, generators, weigh=softmax_weights):
    """A token per row of fp32 logits (B, vocab) from softmax(logits / T), T (B, 1) a row's
    temperature, drawn with the row's generator; `weigh` computes the weights (as softmax_weights)."""
    weights = weigh(logits, temperatures)
    return draw(weights, uniforms(generators, weights.device)).tolist()


def sample_one(logits, params, generator, weigh=softmax_weights):
    """A token from fp32 logits (vocab,) with temperature, top-k and top-p (`weigh` as in sample_rows)."""
    candidates = None
    if params.top_k is not None and params.top_k < logits.size(0):
        logits, candidates = torch.topk(logits, params.top_k)
    weights = weigh(logits, params.temperature)
    if params.top_p < 1.0:
        weights, order = torch.sort(weights, descending=True)
        candidates = order if candidates is None else candidates[order]
        cumulative = weights.cumsum(0)
        # keep each token whose preceding mass is below top_p (the first one always)
        keep = int((cumulative - weights < params.top_p * cumulative[-1]).sum())
        weights, candidates = weights[:keep], candidates[:keep]
    choice = int(draw(weights[None], uniforms([generator], weights.device))[0])
    return choice if candidates is None else int(candidates[choice])


def uniforms(generators, device):
    """(B, 2): the two uniforms in [0, 1) each row's draw takes from its own generator."""
    return torch.stack([torch.rand(2, generator=g, device=device) for g in generators])


def draw(weights, u):
    """Per row i, index j with probability weights[i, j] / weights[i].sum(), by inverse CDF with the
    uniforms u[i] (torch.multinomial is slow over a long vocabulary). A long row goes by blocks of
    DRAW_BLOCK: a block drawn from the blocks' sums with u[i, 0], then an index within it with
    u[i, 1], which spares the cumulative sum of the whole row. An index of weight 0 is never drawn.
    Each row's result depends on that row alone, whatever the batch."""
    B, V = weights.shape
    if V <= DRAW_BLOCK:
        return inverse_cdf(weights.cumsum(1), u[:, :1])
    if V % DRAW_BLOCK:
        weights = F.pad(weights, (0, -V % DRAW_BLOCK))
    blocks = weights.view(B, -1, DRAW_BLOCK)
    block = inverse_cdf(blocks.sum(2).cumsum(1), u[:, :1])
    within = blocks[torch.arange(B, device=weights.device), block]  # (B, DRAW_BLOCK): each row's block
    return block * DRAW_BLOCK + inverse_cdf(within.cumsum(1), u[:, 1:])


def inverse_cdf(cdf, u):
    """Per row, the first index whose cumulative weight exceeds u * total (u in [0, 1)), or, should
    rounding put that at the total, the first index that reaches it: (B,) from cdf (B, N), u (B, 1)."""
    total = cdf[:, -1:].contiguous()  # searchsorted copies a strided column anyway
    return torch.minimum(torch.searchsorted(cdf, u * total, right=True), torch.searchsorted(cdf, total))[:, 0]
