"""`nanochat export` against transformers itself, in fp32: the exported directory loads with
AutoModelForCausalLM / AutoTokenizer as it is and computes what we compute (logits, greedy
tokens, chat prompts, text encoding). Two models: the tiny trained run (the 2026 options, so
through the remote code, on inputs longer than its sliding window) exported by the CLI, and an
in-process classic model with GQA and a non-default rotary base (transformers' own type)."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from nanochat import cli, hf, hf_tokenizer, storage
from nanochat.checkpoint import find_checkpoint, generation, load_model
from nanochat.engine import Engine, SamplingParams
from nanochat.export import write_model_dir
from nanochat.gpt import GPT, GPTConfig
from tests.support.hf import randomize, require_transformers

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there, how are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "user", "content": "Compute 12*7"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me check: "}, {"type": "python", "text": "12*7"},
                                       {"type": "python_output", "text": "84"}, {"type": "text", "text": " It is 84."}]}],
]
# the shapes API clients send (normalize_messages' lenient): developer and later system messages, turns in a row
SHAPES = [
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "user", "content": "there"},
     {"role": "assistant", "content": "Hello."}, {"role": "system", "content": "Now in French."},
     {"role": "system", "content": "Politely."}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "Hi again."}],
]


@pytest.fixture(scope="module")
def auto():
    """transformers' Auto classes (a skip without transformers, a failure under CI)."""
    transformers = require_transformers()
    return transformers.AutoModelForCausalLM, transformers.AutoTokenizer


@pytest.fixture(scope="module")
def texts(shared_data):
    """Real documents of the pretraining data (not the tokenizer's training shard)."""
    table = pq.read_table(shared_data / "pretrain" / "shard_00023.parquet", columns=["text"])
    return table.column("text").to_pylist()[:40]


@pytest.fixture(scope="module")
def classic(auto, tiny_tokenizer, tmp_path_factory):
    """An in-process classic model (GQA, rotary base 50000; weights drawn so that attention and MLP
    matter) exported, and loaded by transformers: (ours, tokenizer, theirs, their tokenizer, dir)."""
    config = GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=128, rope_base=50000.0)
    torch.manual_seed(0)
    model = randomize(GPT(config))
    directory = tmp_path_factory.mktemp("classic-hf")
    write_model_dir(directory, model.state_dict(), config, tiny_tokenizer)
    models, tokenizers = auto
    theirs = models.from_pretrained(directory, dtype=torch.float32).eval()
    return model, tiny_tokenizer, theirs, tokenizers.from_pretrained(directory), directory


@pytest.fixture(scope="module")
def tiny_model(tiny_base_run):
    """tiny_base_run's model and tokenizer, loaded as `nanochat chat` loads them."""
    model, tokenizer, _ = load_model(find_checkpoint(str(tiny_base_run))[0])
    return model, tokenizer


@pytest.fixture(scope="module")
def trained(auto, tiny_model, tiny_base_run, tmp_path_factory):
    """tiny_base_run exported by the CLI and loaded with its remote code: (ours, tokenizer, theirs, their tokenizer, dir)."""
    directory = tmp_path_factory.mktemp("export") / "tiny-hf"
    assert cli.main(["export", "--run", str(tiny_base_run), "--to", str(directory)]) == 0
    model, tokenizer = tiny_model
    models, tokenizers = auto
    theirs = models.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    return model, tokenizer, theirs, tokenizers.from_pretrained(directory, trust_remote_code=True), directory


@pytest.fixture(params=["classic", "trained"])
def exported(request):
    return request.getfixturevalue(request.param)


def test_the_directory_is_transformers_own_type_or_carries_its_code(classic, trained):
    assert type(classic[2]).__name__ == "NanoChatForCausalLM"
    assert not (classic[4] / "modeling_nanochat_ext.py").exists()
    assert type(trained[2]).__name__ == "NanoChatExtForCausalLM"
    config = json.loads((trained[4] / "config.json").read_text())
    assert config["auto_map"] == hf.REMOTE_AUTO_MAP and config["window_pattern"] == "SSSL" and config["smear"]
    generation = json.loads((trained[4] / "generation_config.json").read_text())
    # at most the context's new tokens (128): transformers' generate would go on past it
    assert config["max_position_embeddings"] == 128
    assert (generation["temperature"], generation["top_k"], generation["max_new_tokens"]) == (0.6, 50, 128)
    meta = json.loads((trained[4] / "nanochat.json").read_text())
    assert meta["source"] == "base" and meta["frequency_penalty"] == 0.5
    card = (trained[4] / "README.md").read_text()
    assert "trust_remote_code=True" in card and "frequency penalty" in card


def test_logits_equal_ours(exported, texts):
    """Prompts longer than the trained model's sliding window (128), so its S layer's mask bites."""
    model, tokenizer, theirs, _, _ = exported
    idx = torch.tensor([ids[:200] for ids in tokenizer.encode(texts[:3], prepend="<|bos|>")])
    with torch.no_grad():
        ours, logits = model(idx), theirs(idx).logits
    assert logits.shape == ours.shape
    assert (logits - ours).abs().max().item() <= 1e-4


def test_greedy_generation_equals_our_engine(exported):
    model, tokenizer, theirs, _, _ = exported
    engine = Engine(model, tokenizer)
    for conversation in CONVERSATIONS[:2]:
        prompt = tokenizer.render_for_completion(conversation)
        ours = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24)).completions[0].token_ids
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)
        assert out[0, len(prompt):].tolist() == ours


def tensor_dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(name).dtype for name in f.keys()}


def test_our_export_imports_back_as_the_stage_it_came_from(trained, tiny_base_run, tmp_path, texts, capsys):
    """`nanochat import` of what `nanochat export` wrote: the source its nanochat.json names (no
    --as), the same logits, the frequency penalty back among the generation defaults; fp32 unless
    --dtype bfloat16, whose weights come back as their bf16 values."""
    model, tokenizer, _, _, directory = trained
    idx = torch.tensor([ids[:200] for ids in tokenizer.encode(texts[:2], prepend="<|bos|>")])
    half = tmp_path / "bf16"
    assert cli.main(["export", "--run", str(tiny_base_run), "--to", str(half), "--dtype", "bfloat16"]) == 0
    assert (tensor_dtypes(directory / "model.safetensors"), tensor_dtypes(half / "model.safetensors")) == (
        {torch.float32}, {torch.bfloat16})
    for exported, weights in [(directory, model.state_dict()), (half, {k: v.bfloat16().float() for k, v in model.state_dict().items()})]:
        run = tmp_path / f"back-{exported.name}"
        assert cli.main(["import", str(exported), "--run", str(run)]) == 0, capsys.readouterr().err
        target, source = find_checkpoint(str(run))
        back, _, _ = load_model(target)
        assert source == "base" and generation(target)["frequency_penalty"] == 0.5
        assert all(torch.equal(back.state_dict()[k].float(), v) for k, v in weights.items())
        with torch.no_grad():
            assert (back(idx) - model(idx)).abs().max().item() <= (1e-5 if exported == directory else 0.5)


def test_chat_template_renders_as_our_tokenizer(classic):
    _, tokenizer, _, theirs, _ = classic
    for conversation in CONVERSATIONS:
        prompt = theirs.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        assert prompt == tokenizer.render_for_completion(conversation)
        if conversation[-1]["role"] == "assistant":
            assert theirs.apply_chat_template(conversation, return_dict=False) == tokenizer.render_conversation(conversation)[0]
    for conversation in SHAPES:
        prompt = theirs.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        assert prompt == tokenizer.render_for_completion(conversation)
    prefill = [*SHAPES[0], {"role": "assistant", "content": "Au"}]  # a trailing assistant message continues
    prompt = theirs.apply_chat_template(prefill, continue_final_message=True, return_dict=False)
    assert prompt == tokenizer.render_for_completion(prefill, continue_final_message=True)
    assert prompt[-1] != tokenizer.encode_special("<|assistant_end|>")
    with pytest.raises(Exception, match="followed by a user message"):
        theirs.apply_chat_template([*SHAPES[1], {"role": "system", "content": "x"}], return_dict=False)
    tricky = [{"role": "user", "content": "Say <|assistant_end|> please"}]  # as the model card says
    prompt = theirs.apply_chat_template(tricky, add_generation_prompt=True, return_dict=False, sanitize_control_tokens=True)
    assert prompt == tokenizer.render_for_completion(tricky)
    with pytest.raises(Exception, match="alternate"):
        theirs.apply_chat_template([{"role": "assistant", "content": "hi"}], return_dict=False)


def test_tokenizer_encodes_real_text_as_ours(classic, texts):
    _, tokenizer, _, theirs, _ = classic
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == tokenizer.encode(text, prepend="<|bos|>")
        assert theirs.decode(ids[1:]) == text


def test_tokenizer_json_reads_back_and_refuses_other_bpes(tiny_tokenizer):
    data = hf_tokenizer.tokenizer_json(tiny_tokenizer)
    back = hf_tokenizer.from_tokenizer_json(json.loads(json.dumps(data)))
    assert back.mergeable_ranks == tiny_tokenizer.mergeable_ranks and back.pattern == tiny_tokenizer.pattern
    data["model"]["merges"] = data["model"]["merges"][1:]  # a token BPE could no longer make as tiktoken does
    with pytest.raises(hf_tokenizer.TokenizerFileError, match="merges"):
        hf_tokenizer.from_tokenizer_json(data)


def test_import_state_inverts_export_and_names_what_it_refuses(tiny_model):
    model, tokenizer = tiny_model
    config = hf.hf_config(model.config, tokenizer)
    state = hf.export_state(model.state_dict(), model.config)
    imported_config, imported = hf.import_state(state, config, tokenizer.vocab_size)
    assert imported_config == model.config
    for key, value in model.state_dict().items():
        padding = key in ("transformer.wte.weight", "lm_head.weight") or key.startswith("value_embeds.")
        expected = torch.cat([value[:tokenizer.vocab_size], torch.zeros_like(value[tokenizer.vocab_size:])]) if padding else value
        assert torch.equal(imported[key], expected), key
    with pytest.raises(hf.ConversionError, match="hidden_act"):
        hf.import_state(state, {**config, "hidden_act": "gelu"}, tokenizer.vocab_size)
    with pytest.raises(hf.ConversionError, match="model.extra"):
        hf.import_state({**state, "model.extra": torch.zeros(1)}, config, tokenizer.vocab_size)


def test_export_never_replaces_a_directory_without_force(trained, tiny_base_run, tmp_path, capsys):
    """Nor half-writes one: the new export takes the old one's place whole, and no staging is left.
    (On a copy of the module's export, which the other tests read.)"""
    directory = tmp_path / "tiny-hf"
    shutil.copytree(trained[4], directory)
    before = sorted(p.name for p in directory.iterdir())
    assert cli.main(["export", "--run", str(tiny_base_run), "--to", str(directory)]) == 1
    assert "--force" in capsys.readouterr().err
    checkpoint = find_checkpoint(str(tiny_base_run))[0]  # a checkpoint URI works as --run too
    assert cli.main(["export", "--run", checkpoint, "--to", str(directory), "--force"]) == 0
    assert sorted(p.name for p in directory.iterdir()) == before
    assert json.loads((directory / "nanochat.json").read_text())["checkpoint"] == checkpoint
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name]
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}  # the weights readable as the rest are
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes


def test_export_to_an_object_store_writes_the_same_files(tiny_base_run, s3_root, tmp_path):
    """DIR may be any storage URI: on S3 (a real moto server) the same bytes as a local export."""
    to = storage.join(s3_root, "tiny-hf")
    for target in (to, str(tmp_path / "local")):
        assert cli.main(["export", "--run", str(tiny_base_run), "--to", target]) == 0
    local = tmp_path / "local"
    assert storage.listdir(to) == sorted(p.name for p in local.iterdir())
    for name in storage.listdir(to):
        assert storage.read_bytes(storage.join(to, name)) == (local / name).read_bytes(), name


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
