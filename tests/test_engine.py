"""The engine: cached batched greedy decoding equals uncached decoding token for token (the oracle),
continuous batching, sampling parameters, stops, the python tool, UTF-8-safe streaming. The tests
that take FORMS run the model as load_engine serves it both with nanochat.cpu's fast paths and with
NANOCHAT_CPU_FASTPATHS=0; the rest drive the engine on torch's ops, which the switch does not touch."""

import copy
import time

import pytest
import torch

from nanochat import engine as engine_module
from nanochat import inference
from nanochat.cpu import kernels, ops
from nanochat.cpu.linears import PackedLinear, PanelLinear, replace_linears
from nanochat.engine import DRAW_BLOCK, Engine, Request, SamplingOps, SamplingParams, TextStream, prefill_groups, sample_one, sample_rows
from nanochat.execution import calculator
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.support.cpupaths import kernels_here, panel_weights

pytest_plugins = ["tests.support.cpupaths"]


@pytest.fixture(scope="module")
def tokenizer():
    """A real tokenizer with no merges: every byte is a token (so multi-byte characters span tokens)."""
    return Tokenizer({bytes([i]): i for i in range(256)})


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random GPT with weights large enough that greedy choices are never near ties (fp32), with
    grouped-query attention."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=96, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def greedy_uncached(model, prompt, num_tokens, frequency_penalty=0.0, presence_penalty=0.0):
    """Greedy decoding without a cache, OpenAI's penalties taken off by hand."""
    ids, counts = list(prompt), {}
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            for token, count in counts.items():
                logits[token] -= frequency_penalty * count + presence_penalty
            ids.append(int(logits.argmax()))
            counts[ids[-1]] = counts.get(ids[-1], 0) + 1
    return ids[len(prompt):]


def as_multiplied(model, engine):
    """The model whose uncached decoding the engine's must equal: `model`, or where the engine's
    model multiplies by PanelLinear (fp32 activations, weights rounded to bf16: every linear layer,
    checked) a copy with those weights rounded."""
    served = list(engine.model.modules())
    if not any(isinstance(m, PanelLinear) for m in served):
        return model
    assert not any(isinstance(m, torch.nn.Linear) for m in served)
    return panel_weights(model)


def assert_matches_oracle(model, engine, request, max_tokens):
    expected = greedy_uncached(as_multiplied(model, engine), request.prompt_ids, max_tokens)
    for completion in request.completions:
        got = completion.token_ids
        assert got == expected[:len(got)]
        assert len(got) == max_tokens or got[-1] in engine.end_ids


# The model as trained ("plain"); fused, with its linear layers in one of the CPU's forms ("packed" for
# oneDNN, "panel" for nanochat's kernel, whose bf16 weights as_multiplied gives the oracle); and as
# load_engine serves it on CPU (inference.prepare),
# with nanochat.cpu's fast paths (the form this machine's dtype takes, the CPU hooks and sampling ops)
# and with NANOCHAT_CPU_FASTPATHS=0 (fused on torch's ops: as a CPU without them, or a GPU, serves it).
# Only "served" reads the switch, so only it runs both ways.
FORMS = pytest.mark.parametrize("form,fastpaths", [("plain", True), ("packed", True), ("panel", True), ("served", True),
                                                   ("served", False)],
                                ids=["plain", "packed", "panel", "served", "served-torch-ops"], indirect=["fastpaths"])
LINEARS = {"packed": PackedLinear, "panel": PanelLinear}


def served_engine(model, tokenizer, form, fastpaths, max_rows):
    """An engine of a copy of the model in one of the FORMS."""
    if form == "plain":
        return Engine(model, tokenizer, max_rows)
    served, sampling_ops = copy.deepcopy(model), None
    if form == "served":
        sampling_ops = inference.prepare(served)
        assert sampling_ops == (ops.SAMPLING if fastpaths else SamplingOps())
    else:
        served.fuse_qkv()
        if form == "panel":
            kernels_here()  # PanelLinear runs the kernels (nanochat.cpu.apply would have built them)
        replace_linears(served, LINEARS[form])
        assert not any(isinstance(m, torch.nn.Linear) for m in served.modules())
    assert all(block.attn.c_qkv is not None and not hasattr(block.attn, "c_q") for block in served.transformer.h)
    return Engine(served, tokenizer, max_rows, ops=sampling_ops)


@FORMS
def test_cached_batched_greedy_equals_uncached(model, tokenizer, form, fastpaths):
    """Requests of different lengths join a running batch at different steps; each row is at its
    own position, and every completion is what uncached greedy decoding (of the plain model) gives."""
    engine = served_engine(model, tokenizer, form, fastpaths, max_rows=8)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode(text)] for text in ("hi", "hello there, model", "x" * 40)]
    requests = [Request(p, greedy, n=n) for p, n in zip(prompts, (1, 3, 2))]
    engine.add(requests[0])
    for _ in range(5):
        engine.step()
    engine.add(requests[1])
    engine.step()
    engine.add(requests[2])
    while engine.rows:
        engine.step()
    for request in requests:
        assert request.done
        assert_matches_oracle(model, engine, request, 24)


@pytest.mark.parametrize("fastpaths", [True], ids=["fastpaths"], indirect=True)
def test_bf16_served_greedy_equals_the_bf16_model_uncached(model, tokenizer, fastpaths, kernel_calls):
    """In bf16 (as load_engine loads a model on a CPU that multiplies bf16 fast) with nanochat.cpu's
    fast paths, whose kernels run (counted: the RMSNorms, and AMX's matmul, which caps the logits too,
    where the CPU has AMX, else the cap): rows joining a running batch decode what uncached greedy
    decoding of the plain bf16 model, on torch's ops, gives."""
    plain = copy.deepcopy(model).to(torch.bfloat16)
    served = copy.deepcopy(plain)
    engine = Engine(served, tokenizer, 8, ops=inference.prepare(served))
    greedy = SamplingParams(temperature=0, max_tokens=16)
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode(text)] for text in ("hi", "hello there, model", "x" * 40)]
    requests = [Request(p, greedy, n=n) for p, n in zip(prompts, (1, 3, 2))]
    engine.add(requests[0])
    engine.step()
    engine.add(*requests[1:])
    while engine.rows:
        engine.step()
    for request in requests:
        assert_matches_oracle(plain, engine, request, 16)
    assert all(kernel_calls[norm[torch.bfloat16]] > 0 for norm in kernels.NORM_KERNELS.values())
    assert kernel_calls["amx_matmul" if kernels.has_amx() else "softcap_bf16"] > 0


@FORMS
def test_prompts_added_together_equal_uncached(model, tokenizer, form, fastpaths):
    """Prompts added at once are prefilled together, padded to the longest (one forward for the
    short ones, another for the long one), into a batch already decoding; every completion is still
    what uncached greedy decoding gives."""
    engine = served_engine(model, tokenizer, form, fastpaths, max_rows=10)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    running = Request([tokenizer.bos_token_id, *tokenizer.encode("already running")], greedy)
    engine.add(running)
    engine.step()
    texts = ("a longer prompt than the others", "short", "mid-sized one", "z" * 70)
    requests = [Request([tokenizer.bos_token_id, *tokenizer.encode(t)], greedy, n=n) for t, n in zip(texts, (2, 1, 3, 2))]
    forwards = []
    hook = engine.model.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape))
    engine.add(*requests)
    hook.remove()
    assert sorted(forwards) == [(1, 71), (3, 32)]
    while engine.rows:
        engine.step()
    for request in [running, *requests]:
        assert_matches_oracle(model, engine, request, 16)


def test_prefill_groups_bound_the_padding():
    """Shortest first; a prompt joins a group while the padded forward is at most twice its tokens;
    over random lengths, every request lands in exactly one group and every group keeps the bound."""
    def lengths(groups):
        return [[len(r.prompt_ids) for r in g] for g in groups]

    assert lengths(prefill_groups([Request([0] * n) for n in (30, 5, 12, 9, 400, 250)])) == [[5, 9, 12], [30, 250, 400]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        requests = [Request([0] * n) for n in torch.randint(1, 500, (int(torch.randint(1, 17, ())),), generator=generator).tolist()]
        groups = prefill_groups(requests)
        assert sorted(map(id, requests)) == sorted(id(r) for g in groups for r in g)
        assert all(len(g) * max(g) <= 2 * sum(g) for g in lengths(groups))


def test_penalties_equal_the_uncached_oracle_row_by_row(model, tokenizer):
    """Frequency and presence penalties: each row of a batch decodes what uncached greedy decoding
    with those penalties taken off gives, and a penalty changes what is decoded."""
    engine = Engine(model, tokenizer, max_rows=8)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("repeat after me")]
    settings = [(0.0, 0.0), (0.7, 0.0), (0.0, 1.5), (0.4, 0.4), (-0.5, 0.0)]
    requests = [Request(prompt, SamplingParams(temperature=0, max_tokens=32, frequency_penalty=f, presence_penalty=p))
                for f, p in settings]
    for request in requests:
        engine.add(request)
    while engine.rows:
        engine.step()
    outputs = [r.completions[0].token_ids for r in requests]
    for (f, p), got in zip(settings, outputs):
        expected = greedy_uncached(model, prompt, 32, f, p)
        assert got == expected[:len(got)]
    assert len({tuple(o) for o in outputs}) == len(outputs)


def test_row_reuse_after_finishing(model, tokenizer):
    """Short requests finish and leave; later ones reuse their slots (moved rows keep their cache)."""
    engine = Engine(model, tokenizer, max_rows=3)
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode(f"prompt {i} " * (i + 1))] for i in range(6)]
    requests = [Request(p, SamplingParams(temperature=0, max_tokens=4 + 3 * i)) for i, p in enumerate(prompts)]
    pending = list(requests)
    while pending or engine.rows:
        while pending and engine.free_rows:
            engine.add(pending.pop(0))
        engine.step()
    for i, request in enumerate(requests):
        assert_matches_oracle(model, engine, request, 4 + 3 * i)


def test_limits_and_finish_reasons(model, tokenizer):
    engine = Engine(model, tokenizer, max_rows=4)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("abc")]
    request = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=5))
    completion = request.completions[0]
    assert len(completion.token_ids) <= 5 and completion.finish_reason in ("length", "stop")
    # the context (96 positions) ends the completion
    long_prompt = [tokenizer.bos_token_id, *tokenizer.encode("y" * 90)]
    request = engine.generate(long_prompt, SamplingParams(temperature=0, max_tokens=50))
    assert len(long_prompt) + len(request.completions[0].token_ids) <= 96
    full = engine.generate([1] * 96, SamplingParams(temperature=0, max_tokens=5)).completions[0]
    assert len(full.token_ids) == 1 and full.finish_reason == "length"  # the next token needs no room in the cache
    with pytest.raises(ValueError, match="context"):
        engine.generate([1] * 97)
    with pytest.raises(ValueError, match="n=5"):
        engine.generate(prompt, n=5)


@pytest.mark.parametrize("sampling_ops", [SamplingOps(), ops.SAMPLING], ids=["torch", "cpu"])
def test_sampling_parameters(model, tokenizer, sampling_ops, request):
    """The parameters do what they say with torch's sampling passes and with nanochat.cpu's (whose
    kernels are seen to run)."""
    kernel_calls = request.getfixturevalue("kernel_calls") if sampling_ops is ops.SAMPLING else None
    engine = Engine(model, tokenizer, max_rows=8, ops=sampling_ops)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("sample me")]

    def tokens(n=1, **kw):
        request = engine.generate(prompt, SamplingParams(max_tokens=12, **kw), n=n)
        return [c.token_ids for c in request.completions]

    greedy = tokens(temperature=0)[0]
    assert tokens(temperature=1.0, top_k=1, seed=1)[0] == greedy
    assert tokens(temperature=1.0, top_p=1e-9, seed=2)[0] == greedy
    a, b = tokens(temperature=1.5, seed=7, n=2), tokens(temperature=1.5, seed=7, n=2)
    assert a == b  # a seed makes sampling reproducible
    assert a[0] != a[1]  # samples i of a request use seed + i
    assert tokens(temperature=1.5, seed=7)[0] == a[0]
    assert len({tuple(t) for t in tokens(temperature=2.0, n=6)}) > 1
    assert kernel_calls is None or kernel_calls["argmax"] > 0 and kernel_calls["softmax_weights"] > 0


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("temperature", float("nan")), ("top_k", 0),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("max_tokens", -1),
                                         ("frequency_penalty", float("inf")), ("presence_penalty", float("nan")),
                                         ("logprobs", -1), ("prompt_logprobs", -2)])
def test_sampling_values_the_passes_cannot_take_are_refused_by_name(field, value):
    """Every caller (the API, nanochat chat, the stages) meets one check, at construction: before it,
    top_k 0 failed inside torch.topk mid-step and a NaN temperature decoded greedily."""
    with pytest.raises(ValueError, match=f"^{field} must be .*, not {value!r}$"):
        SamplingParams(**{field: value})
    SamplingParams(temperature=0, top_k=1, top_p=1.0, max_tokens=0, frequency_penalty=-2, logprobs=0)  # the edges pass


@pytest.mark.parametrize("top_k,top_p", [(None, 1.0), (4, 1.0), (None, 0.7)])
def test_sampled_tokens_follow_the_distribution(top_k, top_p):
    """Oracle: the frequencies of 40,000 draws match softmax(logits / T) cut to the top-k / top-p
    tokens and renormalised (total variation under 0.015; sampling noise is about 0.006)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -30.0, 1.5])
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits / params.temperature, dim=-1).double()
    order = probs.argsort(descending=True)
    kept = order[:top_k] if top_k else order[:int((probs[order].cumsum(0) - probs[order] < top_p).sum())]
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_one(logits, params, generator) for _ in range(40_000)])
    frequencies = torch.bincount(draws, minlength=len(logits)).double() / len(draws)
    assert frequencies[expected == 0].sum() == 0
    assert 0.5 * (frequencies - expected).abs().sum() < 0.015


def test_long_vocabularies_draw_block_by_block():
    """Over more tokens than DRAW_BLOCK (blocks, the last one padded), the frequencies of 40,000
    draws match softmax(logits / T), and a token of probability 0 is never drawn."""
    logits = torch.full((1000,), float("-inf"))
    support = torch.tensor([0, 255, 256, 600, 999])  # the edges of the blocks and the padded last one
    logits[support] = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    params = SamplingParams(temperature=0.8)
    expected = torch.softmax(logits / params.temperature, dim=-1).double()
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_one(logits, params, generator) for _ in range(40_000)])
    assert len(logits) > DRAW_BLOCK and set(draws.unique().tolist()) == set(support.tolist())
    frequencies = torch.bincount(draws, minlength=len(logits)).double() / len(draws)
    assert 0.5 * (frequencies - expected).abs().sum() < 0.015


def test_rows_drawn_together_draw_as_they_would_alone():
    """sample_rows (rows with a temperature alone, drawn together) gives each row the token
    sample_one gives it alone from the same generator, whatever the other rows."""
    logits = torch.randn(3, 3 * DRAW_BLOCK) * 3
    temperatures = [0.5, 1.0, 1.7]
    together = [torch.Generator().manual_seed(i) for i in range(3)]
    alone = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(200):
        tokens = sample_rows(logits, torch.tensor(temperatures)[:, None], together)
        assert tokens == [sample_one(logits[i], SamplingParams(temperature=t), alone[i]) for i, t in enumerate(temperatures)]
    assert sample_rows(logits[1:], torch.tensor(temperatures[1:])[:, None], together[1:]) == \
        [sample_one(logits[i], SamplingParams(temperature=temperatures[i]), alone[i]) for i in (1, 2)]


def test_greedy_and_sampled_requests_decode_together(model, tokenizer):
    """A greedy request batched with a sampled one still gets its greedy tokens (and no error)."""
    engine = Engine(model, tokenizer, max_rows=8)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("mixed batch")]
    alone = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=12)).completions[0].token_ids
    greedy = Request(prompt, SamplingParams(temperature=0, max_tokens=12))
    sampled = Request(prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=12), n=2)
    engine.add(sampled)
    engine.add(greedy)
    while not (greedy.done and sampled.done):
        engine.step()
    assert greedy.completions[0].token_ids == alone
    assert all(c.finish_reason in ("stop", "length") for c in [*greedy.completions, *sampled.completions])


def test_top_k_and_top_p_restrict_the_choices(model, tokenizer):
    """Every sampled token is among the allowed ones (the prefill's first token, many draws)."""
    engine = Engine(model, tokenizer, max_rows=8)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("restrict")]
    with torch.inference_mode():
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
    order = probs.argsort(descending=True).tolist()
    top3 = set(order[:3])
    top_p_set = set(order[:int((probs[order].cumsum(0) < 0.5).sum()) + 1])
    for params, allowed in ((SamplingParams(top_k=3, max_tokens=1), top3), (SamplingParams(top_p=0.5, max_tokens=1), top_p_set)):
        request = engine.generate(prompt, params, n=8)
        assert {c.token_ids[0] for c in request.completions} <= allowed


def test_cancelled_request_leaves_the_batch(model, tokenizer):
    engine = Engine(model, tokenizer, max_rows=4)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("cancel")]
    keep = Request(prompt, SamplingParams(temperature=0, max_tokens=20))
    drop = Request(prompt, SamplingParams(temperature=0, max_tokens=20), n=2)
    engine.add(keep)
    engine.add(drop)
    engine.step()
    drop.cancelled = True
    engine.step()
    assert len(engine.rows) == 1
    while engine.rows:
        engine.step()
    assert_matches_oracle(model, engine, keep, 20)


def assert_logprobs_match(expected, entries, tokens, k):
    """entries: the TokenLogprobs of `tokens`, each against its oracle row of log-probabilities."""
    assert len(entries) == len(tokens) == len(expected)
    for row, entry, token in zip(expected, entries, tokens):
        assert entry.token == token and abs(entry.logprob - row[token].item()) < 1e-4
        values, ids = row.topk(k)
        assert len(entry.top) == k and all(abs(v - row[t].item()) < 1e-4 for t, v in entry.top)
        assert torch.allclose(torch.tensor([v for _, v in entry.top]), values, atol=1e-4)


# the logprobs' forms: the model as trained, and as served with the CPU's soft-cap kernel and without
@pytest.mark.parametrize("form,fastpaths", [("plain", True), ("served", True), ("served", False)],
                         ids=["plain", "served", "served-torch-ops"], indirect=["fastpaths"])
def test_logprobs_are_the_log_softmax_of_the_capped_logits(model, tokenizer, form, fastpaths):
    """Oracle: log_softmax of the model's own (soft-capped) logits, uncached, whatever chose the token:
    greedy, or sampled with a temperature, top-k and penalties (which change the choice, not the
    logprobs). Prompt logprobs come from the prefill (None for the first token), also for a request
    with max_tokens 0, which ends there; events carry the entries of their completion in order."""
    engine = served_engine(model, tokenizer, form, fastpaths, max_rows=8)
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("log probs, please")]
    events = {}
    greedy = Request(prompt, SamplingParams(temperature=0, max_tokens=10, logprobs=3, prompt_logprobs=2),
                     on_event=lambda i, text, finish, logprobs: events.setdefault(i, []).extend(logprobs))
    sampled = Request(prompt, SamplingParams(temperature=1.5, top_k=20, frequency_penalty=1.0, seed=4, max_tokens=10,
                                             logprobs=0), n=2)
    scored_only = Request(prompt[:5], SamplingParams(max_tokens=0, prompt_logprobs=1))
    plain = Request(prompt, SamplingParams(temperature=0, max_tokens=10))
    engine.add(greedy, sampled, scored_only, plain)
    while engine.rows:
        engine.step()
    multiplied = as_multiplied(model, engine)
    with torch.inference_mode():
        def oracle(ids):
            return torch.log_softmax(multiplied(torch.tensor([ids]))[0].float(), dim=-1)

        prompt_rows = oracle(prompt)[:-1]
        for request, k in ((greedy, 3), (sampled, 0)):
            for completion in request.completions:
                tokens = completion.token_ids
                assert_logprobs_match(oracle(prompt + tokens)[len(prompt) - 1:-1], completion.logprobs, tokens, k)
    greedy_tokens = greedy.completions[0].token_ids
    assert greedy_tokens == plain.completions[0].token_ids and events[0] == greedy.completions[0].logprobs
    assert all(entry.top[0][0] == entry.token for entry in greedy.completions[0].logprobs)  # the argmax of capped logits
    assert greedy.prompt_logprobs[0] is None and scored_only.prompt_logprobs[0] is None
    assert_logprobs_match(prompt_rows, greedy.prompt_logprobs[1:], prompt[1:], 2)
    assert_logprobs_match(prompt_rows[:4], scored_only.prompt_logprobs[1:], prompt[1:5], 1)
    assert scored_only.completions[0].token_ids == [] and scored_only.completions[0].finish_reason == "length"
    assert plain.completions[0].logprobs is None and plain.prompt_logprobs is None


def test_text_stream_never_splits_a_character_or_shows_a_stop():
    text = "héllo 世界 END tail"
    stream = TextStream(stops=["END"])
    pieces = []
    for byte in text.encode():
        pieces.append(stream.add(bytes([byte])))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == "héllo 世界 " and stream.stopped
    assert all("\ufffd" not in p and "E" not in p for p in pieces)
    stream = TextStream()
    assert stream.add("é".encode()[:1]) == "" and stream.finish() == "\ufffd"  # a cut character, at the end only


class Bigram(torch.nn.Module):
    """A stand-in model for the engine's state machine: the next token is a fixed function of the
    current one (`table`, else <|assistant_end|>). It keeps the KV-cache protocol like the GPT."""

    def __init__(self, table, tokenizer):
        super().__init__()
        vocab = tokenizer.vocab_size
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.next = torch.full((vocab,), tokenizer.special_ids["<|assistant_end|>"])
        for a, b in table.items():
            self.next[a] = b
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, idx, kv_cache, positions=None):
        B, T = idx.shape
        z = torch.zeros(B, 1, T, 2)
        kv_cache.insert_kv(0, z, z)
        kv_cache.advance(T)
        logits = torch.nn.functional.one_hot(self.next[idx], self.config.vocab_size).float() * self.scale
        return logits if positions is None else logits[torch.arange(B), positions]


def chain(tokenizer, *parts):
    """A table that makes the model write `parts` (special-token names or text) in order."""
    ids = []
    for part in parts:
        ids += [tokenizer.special_ids[part]] if part.startswith("<|") else tokenizer.encode(part)
    return dict(zip(ids, ids[1:]))


def test_python_tool_output_is_forced_in(tokenizer):
    table = chain(tokenizer, "<|assistant_start|>", "<|python_start|>", "6*7", "<|python_end|>", "?")
    table[tokenizer.special_ids["<|output_end|>"]] = tokenizer.encode("!")[0]
    engine = Engine(Bigram(table, tokenizer), tokenizer)
    pieces = []
    request = engine.generate([tokenizer.special_ids["<|assistant_start|>"]], SamplingParams(temperature=0),
                              on_event=lambda i, text, finish, logprobs: pieces.append(text))
    completion = request.completions[0]
    assert completion.text == "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>!"
    assert "".join(pieces) == completion.text and completion.finish_reason == "stop"


def test_failing_tool_call_forces_nothing_and_others_keep_decoding(tokenizer):
    """A tool call that fails adds no output; another request in the batch decodes meanwhile."""
    table = chain(tokenizer, "<|assistant_start|>", "<|python_start|>", "1/0", "<|python_end|>", "?")
    table.update(chain(tokenizer, "<|user_start|>", "abcdefghij"))
    engine = Engine(Bigram(table, tokenizer), tokenizer)
    tool = Request([tokenizer.special_ids["<|assistant_start|>"]], SamplingParams(temperature=0))
    other = Request([tokenizer.special_ids["<|user_start|>"]], SamplingParams(temperature=0))
    engine.add(tool)
    engine.add(other)
    while engine.rows:
        engine.step()
    assert tool.completions[0].text == "<|python_start|>1/0<|python_end|>?"
    assert other.completions[0].text == "abcdefghij" and other.completions[0].finish_reason == "stop"


class ChainThenNoise(Bigram):
    """Bigram's chain, made certain, while the current token is in `table`; uniform logits past it,
    so that what comes after depends on every draw from the row's generator."""

    def __init__(self, table, tokenizer):
        super().__init__(table, tokenizer)
        self.chained = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        self.chained[list(table)] = True

    def forward(self, idx, kv_cache, positions=None):
        current = idx if positions is None else idx[torch.arange(idx.size(0)), positions]
        return super().forward(idx, kv_cache, positions) * 100 * self.chained[current].unsqueeze(-1)


def test_tool_latency_never_changes_a_seeded_sample(tokenizer, monkeypatch):
    """A row waiting for its tool draws nothing, so a seeded sample is the same however long the
    tool runs (RL's exact resume relies on it)."""
    table = chain(tokenizer, "<|assistant_start|>", "<|python_start|>", "6*7", "<|python_end|>")
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=40)

    def samples():
        engine = Engine(ChainThenNoise(table, tokenizer), tokenizer)
        request = engine.generate([tokenizer.special_ids["<|assistant_start|>"]], params, n=2)
        return [c.token_ids for c in request.completions]

    fast = samples()
    monkeypatch.setattr(engine_module, "calculator", lambda expression: time.sleep(0.35) or calculator(expression))
    slow = samples()  # the row waits through several steps (0.1 s each) for its result
    special = tokenizer.special_ids
    call = [special["<|python_start|>"], *tokenizer.encode("6*7"), special["<|python_end|>"]]
    call += [special["<|output_start|>"], *tokenizer.encode("42"), special["<|output_end|>"]]
    assert all(ids[:len(call)] == call for ids in fast)
    assert fast[0][len(call):] != fast[1][len(call):]  # past the call, the tokens are really sampled
    assert slow == fast


def test_stop_strings_end_the_completion(tokenizer):
    table = chain(tokenizer, "<|assistant_start|>", "quick brown")  # no letter twice: a bigram chain
    engine = Engine(Bigram(table, tokenizer), tokenizer)
    start = [tokenizer.special_ids["<|assistant_start|>"]]
    request = engine.generate(start, SamplingParams(temperature=0, stop=("xx", "ro")))
    assert request.completions[0].text == "quick b" and request.completions[0].finish_reason == "stop"
    request = engine.generate(start, SamplingParams(temperature=0, max_tokens=5))
    assert request.completions[0].text == "quick" and request.completions[0].finish_reason == "length"
    assert "".join(engine.stream(start, SamplingParams(temperature=0))) == "quick brown"
