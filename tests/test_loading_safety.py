"""Loading safety: tensors come only from safetensors and nothing is ever unpickled, so a checkpoint
or tokenizer from an untrusted URI cannot run code. The attack is real: a pickle whose loading
creates a marker file (checked to work with pickle itself), served over HTTP. The one reader of
pickles, `nanochat import` of upstream's files, uses torch's weights-only unpickler and an
allowlisting one that builds plain data (tests/test_upstream_import.py runs this payload at it);
the scan below finds any other."""

import ast
import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint, storage
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.support.httpserver import serve

REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling it creates `marker`: what a malicious checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


@pytest.fixture
def evil(marker):
    """A torch.save file (a zip holding a pickle) with the payload beside a real tensor."""
    buf = io.BytesIO()
    torch.save({"weight": torch.ones(2), "payload": Payload(marker)}, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # the payload is live ...
    assert marker.exists()
    marker.unlink()  # ... and the tests check that loading never fires it
    return buf.getvalue()


def replace_file(directory, name, data):
    """Puts `data` at `name` in a checkpoint and fixes its manifest entry, as an attacker controlling
    the whole directory would."""
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def ckpt(tmp_path):
    """A real checkpoint of a tiny GPT (with its tokenizer) under tmp_path/run."""
    tok_dir = storage.normalize(str(tmp_path / "run" / "tokenizer"))
    Tokenizer.train(["hello world, hello tokenizer"] * 50, 300).save(tok_dir)
    config = GPTConfig(sequence_len=16, vocab_size=320, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = GPT(config)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    optimizer.step()
    meta = {"model_config": config.__dict__, "tokenizer": storage.join(tok_dir, "tokenizer.json")}
    target = checkpoint.save(storage.normalize(str(tmp_path / "run" / "ckpt")), 1, model.state_dict(),
                             optimizer.state_dict(), meta)
    return Path(storage.local_path(target))


@pytest.mark.parametrize("name", ["model.safetensors", "optim_rank_000.safetensors"])
def test_a_pickle_in_place_of_safetensors_is_refused(ckpt, evil, marker, name):
    replace_file(ckpt, name, evil)
    with serve(str(ckpt.parent)) as http:  # an untrusted URI
        with pytest.raises(checkpoint.CheckpointError, match=f"{name}: not a safetensors file"):
            checkpoint.load(f"{http.url}/{ckpt.name}")
    assert checkpoint.load_latest(storage.normalize(str(ckpt.parent))) is None  # skipped, with a warning
    assert not marker.exists()


def test_stray_pickles_are_never_read(ckpt, evil, marker):
    for name in ("model.pt", "optimizer.pt", "rng_state.pth"):
        (ckpt / name).write_bytes(evil)
    model, tokenizer, meta = checkpoint.load_model(storage.normalize(str(ckpt)))
    _, optim_state, _ = checkpoint.load(storage.normalize(str(ckpt)))
    assert meta["step"] == 1 and optim_state["state"] and tokenizer.vocab_size > 256
    assert not marker.exists()


def test_a_pickled_tokenizer_is_refused(ckpt, marker):
    tok_dir = ckpt.parent.parent / "tokenizer"
    data = pickle.dumps(Payload(marker))
    (tok_dir / "ranks.tiktoken").write_bytes(data)
    meta = json.loads((tok_dir / "tokenizer.json").read_text())
    (tok_dir / "tokenizer.json").write_text(json.dumps({**meta, "ranks_sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(ValueError, match="ranks.tiktoken"):
        Tokenizer.load(storage.normalize(str(tok_dir)))
    assert not marker.exists()


def unsafe_loads(path):
    """Calls in a source file that could unpickle: pickle.load(s), torch.load without
    weights_only=True, np.load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = getattr(node.func.value, "id", "")
        kwargs = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        if (owner in ("pickle", "cloudpickle", "dill") and node.func.attr in ("load", "loads")
                or owner == "torch" and node.func.attr == "load" and kwargs.get("weights_only") is not True
                or owner in ("np", "numpy") and node.func.attr == "load" and kwargs.get("allow_pickle")):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_code_path_unpickles():
    sources = [p for d in ("nanochat", "tasks", "flows", "bench") for p in (REPO / d).rglob("*.py")]
    assert [hit for p in sources for hit in unsafe_loads(p)] == []
