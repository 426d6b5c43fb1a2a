"""Checkpoints: exact round trips, atomic visibility, verification, fallback and retention."""

import json

import pytest
import torch

from nanochat import checkpoint, storage


def make_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def train_steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        x = x + 0.1 * torch.randn_like(x)  # noise from the global RNG, which the checkpoint restores
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def save(directory, model, opt, step, **kwargs):
    return checkpoint.save(directory, step, model.state_dict(), opt.state_dict(), {"config": {"d": 8}}, **kwargs)


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    return storage.normalize(str(tmp_path)) if request.param == "file" else request.getfixturevalue("s3_root")


def test_resume_is_exact(root):
    """Train 3 steps, checkpoint, train 3 more; a restore of the checkpoint trains the same 3."""
    model, opt = make_model_and_optimizer()
    train_steps(model, opt, 3)
    target = save(root, model, opt, step=3)
    train_steps(model, opt, 3, seed=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = make_model_and_optimizer(seed=123)
    torch.manual_seed(999)  # the checkpoint restores the RNG state
    model_state, optim_state, meta = checkpoint.load(target)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(optim_state)
    assert meta["step"] == 3 and meta["config"] == {"d": 8}
    train_steps(model2, opt2, 3, seed=2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path):
    root = storage.normalize(str(tmp_path))
    model, opt = make_model_and_optimizer()
    save(root, model, opt, step=10)
    save(root, model, opt, step=20)
    save(root, model, opt, step=30)
    (tmp_path / "step_000030" / "manifest.json").unlink()  # a crash before the manifest
    data = bytearray((tmp_path / "step_000020" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit
    (tmp_path / "step_000020" / "model.safetensors").write_bytes(bytes(data))

    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load(checkpoint.step_dir(root, 30))
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors: does not match"):
        checkpoint.load(checkpoint.step_dir(root, 20))
    _, _, meta = checkpoint.load_latest(root)
    assert meta["step"] == 10
    assert checkpoint.load_latest(storage.join(root, "nothing")) is None


def test_a_rank_the_saving_run_lacked_finds_the_checkpoint_without_optimizer_state(tmp_path):
    """Resumed by more processes than saved it, the newest checkpoint is still found (its meta says
    how many saved it, and training refuses another number), not skipped as broken: skipped, training
    would start over from step 0 and prune the checkpoints it had."""
    root = storage.normalize(str(tmp_path))
    model, opt = make_model_and_optimizer()
    save(root, model, opt, step=10)
    model_state, optim_state, meta = checkpoint.load_latest(root, rank=1)
    assert meta["step"] == 10 and meta["world_size"] == 1 and optim_state is None
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())


def test_retention_keeps_last_n(tmp_path):
    root = storage.normalize(str(tmp_path))
    model, opt = make_model_and_optimizer()
    for step in (1, 2, 3, 4):
        save(root, model, opt, step=step, keep_last=2)
    assert checkpoint.list_steps(root) == [(3, True), (4, True)]



def test_a_prune_cut_short_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    """Pruning deletes a checkpoint's manifest first: when deleting the rest fails (storage gone
    mid-way), the step is incomplete, never a complete-looking checkpoint with files missing."""
    root = storage.normalize(str(tmp_path))
    model, opt = make_model_and_optimizer()
    for step in (1, 2):
        save(root, model, opt, step=step)
    remove = storage.remove

    def fails_on_folders(uri, recursive=False):
        if recursive:
            raise OSError(f"{uri}: storage went away")
        return remove(uri, recursive=recursive)

    monkeypatch.setattr(storage, "remove", fails_on_folders)
    with pytest.raises(OSError, match="storage went away"):
        checkpoint.prune(root, keep_last=1)
    assert checkpoint.list_steps(root) == [(1, False), (2, True)]

def test_manifest_covers_every_file(tmp_path):
    root = storage.normalize(str(tmp_path))
    model, opt = make_model_and_optimizer()
    train_steps(model, opt, 1)
    target = save(root, model, opt, step=1)
    manifest = json.loads((tmp_path / "step_000001" / "manifest.json").read_text())
    on_disk = set(storage.listdir(target)) - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert storage.sha256(storage.join(target, name)) == entry["sha256"]


def test_state_roundtrip_preserves_structure():
    state = {"state": {0: {"step": torch.tensor(3.0), "buf": torch.ones(2)}}, "groups": [{"lr": 0.1, "params": [0, 1], "name": None}]}
    tensors, skeleton = checkpoint.split_state(state)
    back = checkpoint.join_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["groups"] == state["groups"]
    assert torch.equal(back["state"][0]["buf"], state["state"][0]["buf"]) and 0 in back["state"]


def test_a_model_refuses_a_tokenizer_replaced_since_it_trained(tmp_path):
    """A checkpoint names its tokenizer by URI and by sha256 (checkpoint.tokenizer_meta): a tokenizer
    trained again in its place (another vocabulary) is refused with the reason, where it used to
    decode the model's ids into other text; the same tokenizer loads, and so does a checkpoint from
    before the sha256 was recorded."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    texts = ["the quick brown fox jumps over the lazy dog " * 50, "pack my box with five dozen liquor jugs " * 50]
    folder = storage.normalize(str(tmp_path / "tokenizer"))
    uri = Tokenizer.train(iter(texts), 300).save(folder)["tokenizer"]
    config = GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    state = GPT(config).state_dict()
    meta = {"model_config": config.__dict__, **checkpoint.tokenizer_meta(uri)}
    trained = checkpoint.save_weights(storage.normalize(str(tmp_path / "checkpoints")), 1, state, meta)
    before = checkpoint.save_weights(storage.normalize(str(tmp_path / "old")), 1, state, {"model_config": config.__dict__,
                                                                                          "tokenizer": uri})
    assert checkpoint.load_model(trained)[1].vocab_size == 300
    Tokenizer.train(iter(texts), 290).save(folder)  # tok_train again, in place
    with pytest.raises(checkpoint.CheckpointError, match="is not the tokenizer this model was trained with"):
        checkpoint.load_model(trained)
    assert checkpoint.load_model(before)[1].vocab_size == 290  # no sha256 to check
