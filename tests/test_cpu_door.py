"""nanochat.cpu has one door: the model, the engine and training never import it; loading an engine
on CPU applies it in one call (with NANOCHAT_CPU_FASTPATHS=0 a call that changes nothing: the
loading test runs both ways), and on any other device nothing of it; a bf16 model decodes through
SDPA, served with it or without it."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat import checkpoint, cpu, engine, gpt, inference, storage
from nanochat.cpu import linears, ops
from nanochat.engine import Engine, Request, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.support.cpupaths import panel_weights
from tests.support.imports import imports, within
from tests.test_gpt import random_model

pytest_plugins = ["tests.support.cpupaths"]
PACKAGE = Path(inference.__file__).parent
CONFIG = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def imports_cpu(path):
    """Whether a module's source imports nanochat.cpu or anything in it, anywhere in the file."""
    return any(within(module, "nanochat.cpu") for _, module in imports(path))


def test_only_inference_imports_the_cpu_package():
    """gpt.py, engine.py and training.py (and every other module outside nanochat/cpu/ but
    inference.py) import nothing from nanochat.cpu (tests/support/imports.py reads every way of writing it)."""
    for name in ("gpt.py", "engine.py", "training.py"):
        assert not imports_cpu(PACKAGE / name), name
    importers = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                 if "cpu" not in p.relative_to(PACKAGE).parts and imports_cpu(p)}
    assert importers == {"inference.py"}


@pytest.fixture
def applied(monkeypatch):
    """The models nanochat.cpu.apply is called on."""
    models, apply = [], cpu.apply
    monkeypatch.setattr(cpu, "apply", lambda model: models.append(model) or apply(model))
    return models


def test_loading_an_engine_on_cpu_applies_it_once(tmp_path, applied, fastpaths):
    """load_engine of a CPU checkpoint: one call to nanochat.cpu.apply, and the engine's model has
    the CPU forms (hooks, linear layers as the dtype takes them, sampling ops), or with
    NANOCHAT_CPU_FASTPATHS=0 torch's, as on a CPU without them; either way its logits are those of
    the checkpoint's model in the dtype this CPU loads it in (in fp32 panels, of its weights rounded
    to bf16)."""
    directory = storage.normalize(str(tmp_path))
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    tokenizer_uri = tokenizer.save(storage.join(directory, "tokenizer"))["tokenizer"]
    model = random_model(GPTConfig(**{**asdict(CONFIG), "vocab_size": tokenizer.vocab_size})).eval()
    meta = {"model_config": asdict(model.config), "tokenizer": tokenizer_uri}
    uri = checkpoint.save(storage.join(directory, "checkpoints"), 0, model.state_dict(), {}, meta)

    served = inference.load_engine(uri, device="cpu")
    assert applied == [served.model]
    sampling_ops, cap, norm, rotary_norm = ((ops.SAMPLING, ops.softcap, ops.rms_norm, ops.rotary_norm) if fastpaths
                                            else (engine.SamplingOps(), gpt.softcap, gpt.norm, gpt.rotary_norm))
    assert served.ops == sampling_ops and served.model.cap is cap
    assert all(block.attn.c_qkv is not None for block in served.model.transformer.h)
    assert all(m.norm is norm for m in served.model.modules() if isinstance(m, (GPT, gpt.Block)))
    assert all(block.attn.rotary_norm is rotary_norm for block in served.model.transformer.h)
    assert getattr(vars(served.model).get("head"), "func", GPT.head) is (ops.head if fastpaths else GPT.head)
    forms = {type(m) for m in served.model.modules()
             if isinstance(m, (torch.nn.Linear, linears.AmxLinear, linears.PackedLinear, linears.PanelLinear))}
    assert len(forms) == 1 and (fastpaths or forms == {torch.nn.Linear})  # one form: this config's widths fill whole panels
    dtype = next(served.model.parameters()).dtype
    if forms == {linears.PanelLinear}:  # fp32 activations of weights rounded to bf16
        model = panel_weights(model)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("door")]])
    with torch.inference_mode():
        got, expected = served.model(ids), model.to(dtype)(ids)
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16: logits up to 15, where an ulp is 1/16
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_a_bad_switch_is_refused_by_name(monkeypatch, applied):
    """NANOCHAT_CPU_FASTPATHS other than 0 or 1: an error naming it, when a model is loaded."""
    monkeypatch.setenv(cpu.SWITCH, "off")
    with pytest.raises(ValueError, match="NANOCHAT_CPU_FASTPATHS='off'"):
        inference.prepare(random_model(CONFIG))


def test_other_devices_take_nothing_of_it(applied):
    """The decision (inference.prepare): a model on another device than the CPU (here `meta`, as a
    GPU's stands in nowhere else) gets its qkv fused and torch's sampling ops, and apply is never called."""
    with torch.device("meta"):
        model = GPT(CONFIG)
    sampling_ops = inference.prepare(model)
    assert applied == [] and sampling_ops == engine.SamplingOps()
    assert model.cap is gpt.softcap and model.norm is gpt.norm and model.transformer.h[0].attn.rotary_norm is gpt.rotary_norm
    assert "head" not in vars(model)
    assert all(block.attn.c_qkv is not None for block in model.transformer.h)
    inference.prepare(random_model(CONFIG))
    assert len(applied) == 1


def test_a_bf16_model_decodes_through_sdpa(monkeypatch, fastpaths):
    """A bf16 model driven by an Engine, with nanochat.cpu applied or without it (as a GPU serves it),
    runs every decode step's attention through F.scaled_dot_product_attention, one call per layer
    with one bf16 query per row. On a machine without a GPU this is the nearest we come to checking
    that a GPU keeps its SDPA kernels."""
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    model = random_model(GPTConfig(**{**asdict(CONFIG), "vocab_size": tokenizer.vocab_size})).eval()
    model.to(torch.bfloat16)
    served = Engine(model, tokenizer, max_rows=4, ops=inference.prepare(model))
    for text in ("a", "a longer prompt"):  # rows at different positions: a masked decode
        served.add(Request([tokenizer.bos_token_id, *tokenizer.encode(text)], SamplingParams(temperature=0, max_tokens=8)))
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *args, **kw: calls.append((q.shape, q.dtype)) or sdpa(q, *args, **kw))
    served.step()
    assert calls == [((2, CONFIG.n_head, 1, CONFIG.head_dim), torch.bfloat16)] * CONFIG.n_layer
