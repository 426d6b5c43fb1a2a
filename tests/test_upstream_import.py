"""`nanochat import` of upstream karpathy/nanochat checkpoints. Each test writes an upstream folder
as upstream's checkpoint_manager and tokenizer do (torch.save of the state dict with upstream's
key names, some with torch.compile's `_orig_mod.` prefix, wte and value embeddings in bf16, queries
and keys in upstream's rotary convention by the formula below; meta_<step>.json with upstream's
fields; a pickled tiktoken Encoding; token_bytes.pt) from a small model of ours, imports it and
checks the imported stage gives the source model's logits, is what later stages and the flow
take as done, and that nothing in the folder ever runs."""

import contextlib
import json
import logging
import pickle
import re
import shutil

import pytest
import tiktoken
import torch

import flows.speedrun
from nanochat import checkpoint, importer, stage, storage, upstream
from nanochat.gpt import GPT, GPTConfig, apply_rotary, rotary_tables
from nanochat.presets import MODEL_2026
from nanochat.stages import base_train
from nanochat.tokenizer import Tokenizer
from tests.support.stagerun import stage as run_stage
from tests.test_loading_safety import Payload

STEP = 20


def upstream_rows(weight, n_heads, head_dim):
    """A query or key weight of ours in upstream's rotary convention: upstream turns each pair
    (x[i], x[i + d/2]) of a head by -theta where we turn by +theta, so the second half of each
    head's rows changes sign (checked against both rotations in test_the_rotary_conversion...)."""
    rows = weight.reshape(n_heads, head_dim, -1).clone()
    rows[:, head_dim // 2:] = -rows[:, head_dim // 2:]
    return rows.reshape(weight.shape)


def test_the_rotary_conversion_turns_upstreams_attention_scores_into_ours():
    """The formula above, against upstream's rotation as the issue states it (y1 = x1 cos + x2 sin,
    y2 = x2 cos - x1 sin) and ours: the same scores q.k at every pair of positions."""
    torch.manual_seed(0)
    head_dim, T = 8, 5
    x, wq, wk = torch.randn(T, 16), torch.randn(head_dim, 16), torch.randn(head_dim, 16)
    cos, sin = rotary_tables(T, head_dim, 10000.0)

    def theirs(v):
        v1, v2 = v[:, :head_dim // 2], v[:, head_dim // 2:]
        return torch.cat([v1 * cos + v2 * sin, v2 * cos - v1 * sin], -1)

    q, k = (apply_rotary(x @ w.T, cos, sin) for w in (wq, wk))
    q_up, k_up = (theirs(x @ upstream_rows(w, 1, head_dim).T) for w in (wq, wk))
    assert torch.allclose(q @ k.T, q_up @ k_up.T, atol=1e-5)
    assert not torch.allclose(q @ k.T, theirs(x @ wq.T) @ theirs(x @ wk.T).T, atol=1e-2)  # unconverted: other scores


def source_model(config, seed):
    """A model of ours whose every parameter matters (init zeroes the output projections), with
    wte and value embeddings rounded through bf16 as upstream stores them."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, p in model.named_parameters():
            if name.startswith(("transformer.wte.", "value_embeds.")):
                p.copy_(p.bfloat16().float())
    return model.eval()


def upstream_state(model):
    """The model's state dict as upstream's torch.save writes it."""
    c, state = model.config, {}
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        if name.endswith(("attn.c_q.weight", "attn.c_k.weight")):
            tensor = upstream_rows(tensor, c.n_head if ".c_q." in name else c.n_kv_head, c.head_dim)
        if name.startswith(("transformer.wte.", "value_embeds.")):
            tensor = tensor.bfloat16()
        state[("_orig_mod." if i % 2 else "") + name] = tensor.clone()
    return state


def encoding_pickle(tokenizer):
    """tokenizer.pkl as upstream writes it: pickle.dump of a tiktoken Encoding named rustbpe."""
    return pickle.dumps(tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.pattern,
                                          mergeable_ranks=tokenizer.mergeable_ranks, special_tokens=tokenizer.special_ids))


def write_upstream(folder, model, tokenizer, step=STEP, meta=None, tokenizer_dir=None, state=None):
    """An upstream checkpoint folder of `model` with meta_<step>.json `meta` (model_config added)
    and the tokenizer in `tokenizer_dir` (default: the folder itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(upstream_state(model) if state is None else state, folder / f"model_{step:06d}.pt")
    config = {k: getattr(model.config, k) for k in upstream.CONFIG_FIELDS}
    meta = {"step": step, **(meta or {}), "model_config": {**config, **(meta or {}).get("model_config", {})}}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    torch.save({"state": {}, "param_groups": []}, folder / f"optim_{step:06d}_rank0.pt")
    tokenizer_dir = tokenizer_dir or folder
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "tokenizer.pkl").write_bytes(encoding_pickle(tokenizer))
    torch.save(torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int32), tokenizer_dir / "token_bytes.pt")
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))


@contextlib.contextmanager
def session_logging():
    """The command sets up logging as a process of its own; the session's handlers come back after."""
    handlers = logging.root.handlers[:]
    try:
        yield
    finally:
        logging.root.handlers[:] = handlers


def import_(capsys, *argv):
    """Runs `nanochat import` in this process: (exit code, its stderr)."""
    capsys.readouterr()
    with session_logging():
        code = importer.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def imported_into(run, src, *argv):
    """`nanochat import SRC --run RUN ...` in this process, which must succeed: the run."""
    with session_logging():
        assert importer.main([str(src), "--run", str(run), *argv]) == 0
    return run


def summary(run, name):
    return json.loads((run / name / "stage.json").read_text())


@pytest.fixture(scope="module")
def base_2026(tiny_tokenizer, tmp_path_factory):
    """Upstream's layout, `<base>/base_checkpoints/d2/` beside `<base>/tokenizer/`, of the 2026 model
    at the tiny preset's size (GQA), as base_train writes its meta (a step 10 before the last): (the
    folder, the source model)."""
    config = GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=128, **MODEL_2026)
    model = source_model(config, seed=1)
    base = tmp_path_factory.mktemp("upstream")
    meta = {"val_bpb": 1.5, "model_config": {"window_pattern": "SSSL"}, "user_config": {"depth": 2},
            "device_batch_size": 4, "max_seq_len": 128, "total_batch_size": 1024, "dataloader_state_dict": {"pq_idx": 0},
            "loop_state": {"min_val_bpb": 1.5, "smooth_train_loss": 3.0, "total_training_time": 1.0}}
    folder = base / "base_checkpoints" / "d2"
    write_upstream(folder, source_model(config, seed=2), tiny_tokenizer, step=10, meta=meta, tokenizer_dir=base / "tokenizer")
    write_upstream(folder, model, tiny_tokenizer, meta=meta, tokenizer_dir=base / "tokenizer")
    return folder, model


@pytest.fixture(scope="module")
def imported_run(base_2026, tmp_path_factory):
    """A run into which base_2026 was imported."""
    return imported_into(tmp_path_factory.mktemp("runs") / "imported", base_2026[0], "--preset", "tiny")


def test_an_upstream_base_model_imports_as_a_finished_base_train(base_2026, imported_run, tiny_tokenizer, capsys):
    folder, source = base_2026
    base = summary(imported_run, "base_train")
    assert base["imported"] == {"format": "upstream nanochat", "source": storage.normalize(str(folder)), "step": STEP,
                                "model": "2026"}
    assert base["config"]["preset"] == "tiny"
    assert set(base["inputs"]) == {"model", "meta", "tokenizer", "token_bytes"}
    assert base["inputs"]["model"]["uri"].endswith(f"/d2/model_{STEP:06d}.pt")  # the last step
    assert set(base["outputs"]) == {"checkpoint", "tokenizer"}
    assert stage.imported_stages(storage.normalize(str(imported_run))) == {"base_train"}

    target, source_name = checkpoint.find_checkpoint(str(imported_run))
    assert (source_name, target) == ("base", storage.join(storage.normalize(str(imported_run)), "base_train",
                                                          "checkpoints", f"step_{STEP:06d}"))
    model, tokenizer, meta = checkpoint.load_model(target)
    assert model.config == source.config and meta["step"] == STEP and meta["imported"] == base["imported"]
    assert tokenizer.mergeable_ranks == tiny_tokenizer.mergeable_ranks
    ids = tokenizer.encode("The capital of France is Paris. 1234 + 5678", prepend="<|bos|>")
    assert (logits(model, ids) - logits(source, ids)).abs().max() <= 1e-5
    assert sorted(checkpoint.read_manifest(target)["files"]) == ["meta.json", "model.safetensors"]

    # done: refused again, replaced with --force, and its stage program refuses to train over it
    code, err = import_(capsys, folder, "--run", imported_run)
    assert code == 1 and "has a done base_train: --force replaces it" in err
    assert import_(capsys, folder, "--run", imported_run, "--step", "10", "--force")[0] == 0
    assert summary(imported_run, "base_train")["imported"]["step"] == 10
    assert import_(capsys, folder, "--run", imported_run, "--force")[0] == 0
    assert not (imported_run / "base_train" / "checkpoints" / "step_000010").exists()
    with pytest.raises(SystemExit) as exit_, session_logging():
        stage.run_main(base_train.main, base_train.build_parser(), "base_train",
                       ["--run", str(imported_run), "--preset", "tiny"])
    assert exit_.value.code == 1 and "was imported from" in capsys.readouterr().err


def test_sft_trains_on_an_imported_base_model(imported_run, tiny_env, tmp_path):
    """A later stage takes the import as any stage's model: chat_sft from base_train, with a warm
    start of the optimizer that has no state to start from (a warning, then a fresh optimizer)."""
    run = tmp_path / "run"
    shutil.copytree(imported_run, run)
    done = run_stage("nanochat.stages.chat_sft", run, tiny_env, "--from-stage", "base_train", "--num-steps", "1",
                     "--warm-start-optimizer")
    assert "holds no optimizer state (an imported model): the optimizer starts fresh" in done.stderr
    sft = summary(run, "chat_sft")
    assert sft["inputs"]["checkpoint"] == summary(run, "base_train")["outputs"]["checkpoint"]
    assert sft["metrics"]["steps"] == 1 and "imported" not in sft
    assert checkpoint.find_checkpoint(str(run)) == (checkpoint.find_checkpoint(str(run), "sft")[0], "sft")


def test_the_flow_takes_an_imported_stage_as_done(imported_run, base_2026, prefect_api, tmp_path):
    """A flow run asking for base_train runs nothing (tok_train, download are not pulled in) and
    returns the import; the stage flow, which forces a re-run, returns it untouched too, with the
    preset the import recorded when none is given (no speedrun flow has run it)."""
    before = summary(imported_run, "base_train")
    fresh = imported_into(tmp_path / "fresh", base_2026[0], "--preset", "tiny")  # (imported_run was imported again since)
    assert flows.speedrun.one_stage("base_train", run_name=str(fresh), retries=0) == summary(fresh, "base_train")
    final = flows.speedrun.speedrun(preset="tiny", run_name=str(imported_run), only=["base_train"], retries=0)
    assert final == before["outputs"]["checkpoint"]["uri"]
    assert not (imported_run / "download").exists()
    assert len(list((imported_run / "prefect-results").iterdir())) == 1  # cached under a key without its needs
    assert flows.speedrun.one_stage("base_train", run_name=str(imported_run), preset="tiny", retries=0) == before
    assert summary(imported_run, "base_train") == before


def test_a_classic_chat_model_in_one_folder_imports(tmp_path, capsys):
    """The classic model (no parameter beyond the transformer), from before upstream padded the
    vocabulary (its rows are padded here) and recorded window_pattern, everything in one folder as
    hub uploads have it; the folder does not say which model it is: --as."""
    tokenizer = Tokenizer.train(["hello world, hello tokenizer 123"] * 50, 300)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    source = source_model(config, seed=3)
    state = {k: v[:config.vocab_size] if k in ("transformer.wte.weight", "lm_head.weight") else v
             for k, v in upstream_state(source).items()}
    state["transformer.wte.weight"] = state["transformer.wte.weight"].float()  # classic upstream kept fp32 rows too
    meta = {"step": 7, "val_bpb": 0.9}
    folder = write_upstream(tmp_path / "nanochat-d2", source, tokenizer, step=7, meta=meta, state=state)
    config_file = folder / "meta_000007.json"
    fields = json.loads(config_file.read_text())
    assert "window_pattern" not in fields["model_config"] and config.vocab_size % 64
    run = tmp_path / "run"
    code, err = import_(capsys, folder, "--run", run)
    assert code == 1 and "cannot tell which model it is (base, mid, sft or rl): give --as" in err
    assert import_(capsys, folder, "--run", run, "--as", "sft")[0] == 0
    assert summary(run, "chat_sft")["imported"]["model"] == "classic"
    model, tok, _ = checkpoint.load_model(checkpoint.find_checkpoint(str(run), "sft")[0])
    assert model.config == config
    ids = tok.render_for_completion([{"role": "user", "content": "hello world"}])
    assert (logits(model, ids) - logits(source, ids)).abs().max() <= 1e-5


def test_an_upstream_model_between_the_eras_is_refused_naming_its_keys(base_2026, tiny_tokenizer, tmp_path, capsys):
    folder, source = base_2026
    state = {k: v for k, v in upstream_state(source).items() if "smear" not in k and "backout" not in k}
    write_upstream(tmp_path / "base_checkpoints" / "d2", source, tiny_tokenizer, state=state)
    code, err = import_(capsys, tmp_path / "base_checkpoints" / "d2", "--run", tmp_path / "run")
    assert code == 1 and "between the classic one and a825e63" in err and "resid_lambdas" in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "base_checkpoints" / "d2" / f"meta_{STEP:06d}.json").write_text("{not json")
    code, err = import_(capsys, tmp_path / "base_checkpoints" / "d2", "--run", tmp_path / "run")
    assert code == 1 and f"meta_{STEP:06d}.json: invalid JSON" in err and not (tmp_path / "run").exists()


def test_a_model_with_a_non_finite_weight_is_refused_before_anything_is_written(base_2026, tiny_tokenizer, tmp_path,
                                                                                capsys):
    """The check runs on the model as read, so a refused import leaves no stage behind and the
    corrected one needs no --force. The NaN is in a query weight, which the logits alone would miss
    (torch's causal SDPA on CPU gives a finite output for a NaN query)."""
    folder, source = base_2026
    state = upstream_state(source)
    state[next(k for k in state if k.endswith("attn.c_q.weight"))][0, 0] = float("nan")
    src = write_upstream(tmp_path / "base_checkpoints" / "d2", source, tiny_tokenizer, state=state)
    code, err = import_(capsys, src, "--run", tmp_path / "run")
    assert code == 1 and "the imported weight transformer.h.0.attn.c_q.weight is not finite" in err
    assert not (tmp_path / "run" / "base_train").exists()
    write_upstream(src, source, tiny_tokenizer)
    assert import_(capsys, src, "--run", tmp_path / "run")[0] == 0


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


def test_a_crafted_tokenizer_pickle_runs_nothing(base_2026, tiny_tokenizer, marker, tmp_path, capsys, monkeypatch):
    """A pickle calling anything but tiktoken's Encoding is refused before it runs (the same payload
    does run under pickle.load: test_loading_safety), and so is an encoding pickled as its bare
    name, which tiktoken would fetch from the network; nothing is written to the run."""
    folder = tmp_path / "src"
    shutil.copytree(base_2026[0], folder)
    run = tmp_path / "run"
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(Payload(marker)))
    code, err = import_(capsys, folder, "--run", run)
    assert code == 1 and "open is not allowed (only tiktoken.core.Encoding is)" in err
    assert not marker.exists() and not run.exists()

    encoding = tiktoken.Encoding(name="nanochat-test", pat_str=tiny_tokenizer.pattern,
                                 mergeable_ranks=tiny_tokenizer.mergeable_ranks, special_tokens=tiny_tokenizer.special_ids)
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "nanochat-test", encoding)
    bare = pickle.dumps(encoding)
    assert b"mergeable_ranks" not in bare and pickle.loads(bare).name == "nanochat-test"  # the name alone
    (folder / "tokenizer.pkl").write_bytes(bare)
    code, err = import_(capsys, folder, "--run", run)
    assert code == 1 and "a bare encoding name ('nanochat-test')" in err and not run.exists()

    wrong = {**tiny_tokenizer.special_ids, "<|bos|>": 0}
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(tiktoken.Encoding(
        name="rustbpe", pat_str=tiny_tokenizer.pattern, mergeable_ranks=tiny_tokenizer.mergeable_ranks, special_tokens=wrong)))
    with pytest.raises(upstream.UpstreamError, match=re.escape("tokenizer.pkl: special tokens")):
        upstream.load_tokenizer(storage.normalize(str(folder / "tokenizer.pkl")))


def test_crafted_weights_run_nothing(base_2026, tiny_tokenizer, marker, tmp_path, capsys):
    folder = tmp_path / "src"
    shutil.copytree(base_2026[0], folder)
    (folder / "tokenizer.pkl").write_bytes(encoding_pickle(tiny_tokenizer))
    torch.save({"transformer.wte.weight": torch.ones(2), "payload": Payload(marker)}, folder / f"model_{STEP:06d}.pt")
    code, err = import_(capsys, folder, "--run", tmp_path / "run")
    assert code == 1 and f"model_{STEP:06d}.pt: not a torch.save file of tensors" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_tokenizer_folder_elsewhere_is_named_with_tokenizer(base_2026, tiny_tokenizer, tmp_path, capsys):
    """tokenizer.pkl neither in SRC nor in SRC/../../tokenizer/ (upstream's layout) is refused naming
    where it looked; --tokenizer DIR names its folder."""
    _, source = base_2026
    src = write_upstream(tmp_path / "checkpoints" / "d2", source, tiny_tokenizer, tokenizer_dir=tmp_path / "elsewhere")
    code, err = import_(capsys, src, "--run", tmp_path / "run", "--as", "base")
    assert code == 1 and "tokenizer.pkl" in err and not (tmp_path / "run").exists()
    assert import_(capsys, src, "--run", tmp_path / "run", "--as", "base", "--tokenizer", tmp_path / "elsewhere")[0] == 0
    model, tokenizer, _ = checkpoint.load_model(checkpoint.find_checkpoint(str(tmp_path / "run"))[0])
    assert tokenizer.mergeable_ranks == tiny_tokenizer.mergeable_ranks
