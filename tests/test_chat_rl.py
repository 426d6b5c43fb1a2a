"""chat_rl raises the reward on a task a tiny model can learn: the answer's first character must be
one of a set that starts out with about a third of the model's probability."""

import json
import os
import shutil
import textwrap

import torch

from nanochat import checkpoint
from nanochat.stages.chat_rl import sampled_mask
from tests.stagerun import stage

PROMPT = [{"role": "user", "content": "Say something."}]


def first_char_mass(checkpoint_dir, chars):
    """Probability that the model's answer starts with one of `chars` (top-50 sampling at T=1)."""
    model, tokenizer, _ = checkpoint.load_model(checkpoint_dir)
    ids = torch.tensor([tokenizer.render_for_completion(PROMPT)])
    with torch.no_grad():
        logits = model(ids)[0, -1]
    top = torch.topk(logits, 50)
    probs = torch.softmax(top.values, -1)
    firsts = [tokenizer.decode([t])[:1] for t in top.indices.tolist()]
    return sum(p for p, f in zip(probs.tolist(), firsts) if f in chars), dict(zip(firsts, probs.tolist()))


def test_sampled_mask_leaves_out_tool_output():
    # 5 = <|output_start|>, 6 = <|output_end|>: what lies between was forced, not sampled
    assert sampled_mask([1, 2, 5, 3, 4, 6, 7], 5, 6) == [1, 1, 0, 0, 0, 0, 1]


def test_rl_raises_the_reward_of_a_learnable_task(tiny_base_run, tiny_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    source = json.loads((run / "base_train" / "stage.json").read_text())["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]
    _, by_char = first_char_mass(source, set())
    chars, mass = set(), 0.0
    for char, p in sorted(by_char.items(), key=lambda kv: -kv[1]):
        if mass >= 0.3:
            break
        chars.add(char)
        mass += p
    (tmp_path / "firstchar.py").write_text(textwrap.dedent(f"""
        from tasks.common import Task

        class FirstChar(Task):
            eval_type = "generative"

            def __init__(self, split="train", **kwargs):
                super().__init__(**kwargs)

            def num_examples(self):
                return 64

            def get_example(self, index):
                return {{"messages": [*{PROMPT!r}, {{"role": "assistant", "content": "x"}}]}}

            def evaluate(self, conversation, completion):
                return completion[:1] in {sorted(chars)!r}
    """))
    rl_env = {**tiny_env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{tiny_env.get('PYTHONPATH', '')}"}
    stage("nanochat.stages.chat_rl", run, rl_env, "--checkpoint", source, "--task", "firstchar:FirstChar",
          "--num-steps", "12", "--examples-per-step", "2", "--num-samples", "8", "--max-new-tokens", "2",
          "--matrix-lr", "0.02", "--embedding-lr", "0.2", "--unembedding-lr", "0.01", "--warmdown-ratio", "0",
          "--eval-examples", "2")
    final = json.loads((run / "chat_rl" / "stage.json").read_text())["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]
    before, _ = first_char_mass(source, chars)
    after, _ = first_char_mass(final, chars)
    assert after > before + 0.2, (before, after, sorted(chars))


def test_unknown_task_is_a_clear_error(tiny_base_run, tiny_env, tmp_path):
    done = stage("nanochat.stages.chat_rl", tiny_base_run, tiny_env, "--checkpoint", str(tmp_path), "--task", "nosuch:Task",
                 check=False)
    assert done.returncode == 1 and "--task 'nosuch:Task'" in done.stderr

