"""`nanochat import` of a transformers `nanochat` model directory, against transformers itself in
fp32: a model transformers made and saved (its own NanoChatConfig and save_pretrained, weights
drawn so that attention and MLP matter) becomes a finished stage whose logits and greedy tokens
are transformers'."""

import json

import pytest
import torch

from nanochat import checkpoint, hf_tokenizer, importer
from nanochat.engine import Engine, SamplingParams
from tests.support.hf import transformers
from tests.support.stagerun import missing
from tests.test_upstream_import import session_logging

PROMPTS = [
    [{"role": "user", "content": "Hi there, how are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2+2?"}],
]


@pytest.fixture(scope="module")
def theirs(tiny_tokenizer, tmp_path_factory):
    """A random NanoChatForCausalLM (GQA, rotary base 50000, transformers' default RMSNorm eps)
    saved by transformers, with the tokenizer's files beside it: (model, directory)."""
    if transformers is None:
        missing("transformers is not installed (pip install -e '.[dev]')")
    config = transformers.NanoChatConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=128, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256,
                                         rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    torch.manual_seed(0)
    model = transformers.NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05 if name == "lm_head.weight" else 0.1)
    directory = tmp_path_factory.mktemp("hf") / "nanochat-tiny"
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(json.dumps(hf_tokenizer.tokenizer_json(tiny_tokenizer)))
    return model, directory


def test_a_transformers_model_imports_with_its_logits_and_greedy_tokens(theirs, tmp_path, capsys):
    model, directory = theirs
    run = tmp_path / "run"
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json",
                                                           "model.safetensors", "tokenizer.json"]
    with session_logging():
        assert importer.main([str(directory), "--run", str(run)]) == 1  # nothing says which model it is
        assert "give --as" in capsys.readouterr().err
        assert importer.main([str(directory), "--run", str(run), "--as", "sft"]) == 0
    summary = json.loads((run / "chat_sft" / "stage.json").read_text())
    assert summary["imported"]["format"] == "transformers" and summary["imported"]["model_type"] == "nanochat"
    ours, tokenizer, _ = checkpoint.load_model(checkpoint.find_checkpoint(str(run))[0])
    assert (ours.config.rope_base, ours.config.n_kv_head) == (50000.0, 2)

    prompts = [tokenizer.render_for_completion(conversation) for conversation in PROMPTS]
    with torch.no_grad():
        for prompt in prompts:
            idx = torch.tensor([prompt])
            assert (ours(idx) - model(idx).logits).abs().max().item() <= 1e-4
    engine = Engine(ours, tokenizer)
    stops = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id]
    for prompt in prompts:
        greedy = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24)).completions[0].token_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=stops,
                                 pad_token_id=stops[0])
        assert out[0, len(prompt):].tolist() == greedy and len(set(greedy)) > 3
