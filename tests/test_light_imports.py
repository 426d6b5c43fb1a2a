"""The orchestration side never loads torch: importing the flows, the pipeline table, presets,
storage and the stage contract, and `nanochat <stage> --help` for every stage, each in a fresh
interpreter. A failure names the import lines that brought torch in."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.cli import stage_names
from tests.support.imports import imports, within

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "nanochat", "rustbpe", "tasks")
LIGHT = ("flows.speedrun", "flows.stages", "nanochat.pipeline", "nanochat.presets", "nanochat.storage", "nanochat.stage")

# Records the stack of the first import of torch (the chain of import lines that brought it in).
TRACER = """
import json, sys, traceback
class Tracer:
    chain = None
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Tracer.chain is None:
            Tracer.chain = [(f.filename, f.lineno) for f in traceback.extract_stack()]
sys.meta_path.insert(0, Tracer())
"""


def ours(filename):
    path = Path(filename)
    return path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in PACKAGES


def loaded(code):
    """Runs `code` in a fresh interpreter; (the chain of import lines in our packages that loaded
    torch, or None; the files of our packages it loaded)."""
    probe = (f"{TRACER}\n{code}\n"
             "files = [getattr(m, '__file__', None) for m in list(sys.modules.values())]\n"
             "print(json.dumps([Tracer.chain, sorted(f for f in files if f)]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    chain, files = json.loads(out.stdout.splitlines()[-1])
    chain = None if chain is None else " -> ".join(f"{Path(f).relative_to(REPO)}:{n}" for f, n in chain if ours(f))
    return chain, [Path(f) for f in files if ours(f)]


def torch_imports(path):
    """`file:line` of each import of torch that runs when the module is imported (not in a function)."""
    lines = [line for line, m in imports(path, when_imported=True) if within(m, "torch")]
    return [f"{path.relative_to(REPO)}:{line}" for line in dict.fromkeys(lines)]


def culprits(files):
    """Every import of torch at the top of a module loaded, not only the first one run."""
    return [line for f in files if f.suffix == ".py" for line in torch_imports(f)]


def test_flows_and_the_stage_contract_import_without_torch():
    chain, files = loaded("\n".join(f"import {m}" for m in LIGHT))
    assert chain is None, f"importing {', '.join(LIGHT)} loads torch through {chain}; top-level imports: {culprits(files)}"


@pytest.mark.parametrize("stage", [*stage_names(), "export", "import"])
def test_stage_help_does_not_load_torch(stage):
    """`nanochat <stage> --help` (what `python -m nanochat.cli` runs), and export's and import's, print the options only."""
    chain, files = loaded("import runpy\n"
                          f"sys.argv = ['nanochat', {stage!r}, '--help']\n"
                          "try:\n    runpy.run_module('nanochat.cli', run_name='__main__')\n"
                          "except SystemExit as e:\n    assert not e.code, e.code\n")
    assert chain is None, f"`nanochat {stage} --help` loads torch through {chain}; top-level imports: {culprits(files)}"


def test_flows_never_import_torch():
    """Not even inside a function: the flow process only launches stages."""
    found = [f"{path.relative_to(REPO)}:{line}" for path in sorted((REPO / "flows").rglob("*.py"))
             for line, m in imports(path) if within(m, "torch")]
    assert found == []


def test_a_training_step_does_not_load_the_compiler():
    """Building a model with every option (on the meta device, then its weights drawn, as the stages
    do) and a training step, forward and backward through the fused loss, leave torch._dynamo
    unimported: importing it costs every stage process, `nanochat chat` and `serve` about a second."""
    out = subprocess.run([sys.executable, "-c", """
import sys, torch
from nanochat.gpt import GPT, GPTConfig
from nanochat.presets import MODEL_2026
with torch.device("meta"):
    model = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, **MODEL_2026))
model.to_empty(device="cpu")
model.init_weights()
idx = torch.randint(0, 300, (2, 64))
model(idx, idx).backward()
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[]"
