"""On the CPU a stage keeps the memory it frees for its next allocations (common.keep_freed_memory,
which compute_init applies there): a training step's activations, logit gradients and optimizer
temporaries come back without page faults, where glibc's defaults fault tens of thousands of pages
in again every step."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = """
import resource, sys, torch
from nanochat import common
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers
from nanochat.presets import MODEL_2026
if sys.argv[1] == "compute_init":
    common.compute_init("cpu")
model = GPT(GPTConfig(sequence_len=512, vocab_size=2048, n_layer=2, n_head=2, n_kv_head=1, n_embd=128, **MODEL_2026))
optimizer = setup_optimizers(model)
tokens = torch.randint(0, 2048, (8, 512))
def step():
    model(tokens, tokens).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
before = faults()
for _ in range(5):
    step()
print((faults() - before) / 5)
"""


def faults_per_step(setup):
    done = subprocess.run([sys.executable, "-c", STEPS, setup], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


def test_cpu_training_steps_reuse_freed_memory_without_page_faults():
    default, kept = faults_per_step("default"), faults_per_step("compute_init")
    assert default > 10_000  # the logit gradients alone are 8 x 512 x 2,048 x 4 bytes: 8,192 pages
    assert kept < default / 10, (kept, default)
