"""`nanochat import` of a transformers `nanochat` model directory, against transformers itself in
fp32: a model transformers made and saved (its own NanoChatConfig and save_pretrained, weights
drawn so that attention and MLP matter) becomes a finished stage whose logits and greedy tokens
are transformers', and whose generation config (greedy, in its generation_config.json) is the
default of the CLI and the API and goes back out with `nanochat export`."""

import io
import json
import shutil

import httpx
import pytest
import torch

from nanochat import chat, checkpoint, export, hf, hf_tokenizer
from nanochat.engine import Engine, SamplingParams
from tests.support.hf import randomize, require_transformers
from tests.support.serving import ask, openai_client, serving
from tests.test_upstream_import import import_, imported_into

PROMPTS = [
    [{"role": "user", "content": "Hi there, how are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2+2?"}],
]


@pytest.fixture(scope="module")
def theirs(tiny_tokenizer, tmp_path_factory):
    """A random NanoChatForCausalLM (GQA, rotary base 50000, transformers' default RMSNorm eps)
    saved by transformers, with the tokenizer's files beside it: (model, directory)."""
    transformers = require_transformers()
    config = transformers.NanoChatConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=128, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256,
                                         rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    torch.manual_seed(0)
    model = randomize(transformers.NanoChatForCausalLM(config))
    directory = tmp_path_factory.mktemp("hf") / "nanochat-tiny"
    model.save_pretrained(directory)
    generation = directory / "generation_config.json"  # a greedy model's (transformers refuses to save it)
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "do_sample": False, "temperature": 0.0,
                                      "top_k": 1, "max_new_tokens": 24}))
    (directory / "tokenizer.json").write_text(json.dumps(hf_tokenizer.tokenizer_json(tiny_tokenizer)))
    return model, directory


@pytest.fixture(scope="module")
def imported(theirs, tmp_path_factory):
    """The run that `nanochat import --as sft` of `theirs` makes."""
    return imported_into(tmp_path_factory.mktemp("imported") / "run", theirs[1], "--as", "sft")


def test_a_transformers_model_imports_with_its_logits_and_greedy_tokens(theirs, imported, tmp_path, capsys):
    model, directory = theirs
    run = imported
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json",
                                                           "model.safetensors", "tokenizer.json"]
    hot = tmp_path / "hot"  # a generation config we cannot take
    shutil.copytree(directory, hot)
    (hot / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    code, err = import_(capsys, directory, "--run", tmp_path / "run")
    assert code == 1 and "give --as" in err  # nothing says which model it is
    code, err = import_(capsys, directory, "--run", tmp_path / "run", "--as", "sft", "--step", "3")
    assert code == 1 and "is a transformers model directory: --step and --tokenizer apply to an upstream" in err
    code, err = import_(capsys, hot, "--run", tmp_path / "run", "--as", "sft")
    assert code == 1 and "generation_config.json: generation field temperature must be a finite number" in err
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


def test_its_generation_config_is_the_cli_and_api_default_and_exports_back(imported, tmp_path, capsys, monkeypatch):
    run = imported
    greedy = {"temperature": 0.0, "top_k": 1, "max_tokens": 24, "frequency_penalty": chat.GENERATION["frequency_penalty"]}
    assert checkpoint.generation(checkpoint.find_checkpoint(str(run))[0]) == greedy
    question = PROMPTS[0][0]["content"]
    capsys.readouterr()
    assert chat.main(["--run", str(run), "-p", question]) == 0
    from_cli = capsys.readouterr().out
    with serving((tmp_path, str(run)), env={"OMP_NUM_THREADS": "1"}) as url:  # one thread: a tiny model on busy cores
        client = openai_client(url)
        omitted = ask(client, question)  # no temperature, top_k or max_tokens: the model's
        explicit = ask(client, question, temperature=0, max_tokens=24, extra_body={"top_k": 1})
        assert httpx.get(url + "/health").json()["generation"] == greedy  # what the web UI shows
    assert omitted.choices[0].message.content == explicit.choices[0].message.content
    assert from_cli == omitted.choices[0].message.content + "\n" and omitted.usage.completion_tokens <= 24

    # a chat model keeps the conversation until /clear: after it, the same answer as a first message gets
    def session(lines):
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
        assert chat.main(["--run", str(run)]) == 0
        return [answer.split("\nyou> ")[0] for answer in capsys.readouterr().out.split("nanochat> ")[1:]]

    first, kept = session([question, "And then?"])
    assert first == from_cli.rstrip("\n") and kept != session(["And then?"])[0]  # the history changes the answer
    assert session([question, "/clear", "And then?"]) == [first, session(["And then?"])[0]]

    export.export(str(run), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["do_sample"], config["temperature"], config["top_k"], config["max_new_tokens"]) == (False, 0.0, 1, 24)


def test_a_greedy_generation_config_imports_greedy():
    """do_sample false is greedy decoding in transformers (temperature ignored): the import keeps it
    greedy (temperature 0) instead of taking our sampling default; without do_sample, or with it
    true, the temperature given is kept; top_k 0 is every token."""
    assert hf.import_generation({"do_sample": False, "top_k": 50}) == {"temperature": 0.0, "top_k": 50}
    assert hf.import_generation({"do_sample": True, "temperature": 0.7}) == {"temperature": 0.7}
    assert hf.import_generation({"temperature": 0.7, "top_k": 0}) == {"temperature": 0.7, "top_k": None}
