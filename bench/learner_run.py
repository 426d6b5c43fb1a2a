"""The learner's run: the cpu preset from empty storage to a model you can chat with, timed and checked.

    .venv/bin/python bench/learner_run.py [--storage DIR] [--nproc-per-node 2]
    .venv/bin/python bench/learner_run.py --check-run speedrun-cpu     after `make speedrun PRESET=cpu`

Runs the speedrun flow on the cpu preset (what `make speedrun PRESET=cpu` runs) into an empty
storage, the data coming from ../shared/data, then prints the wall time of each stage (from its
stage.json) and in total, the report's metrics table, and a behaviour check of the final model:

  (a) chat format: over 20 varied prompts, every reply ends with <|assistant_end|> within the
      token limit and holds no <|user_start|>;
  (b) identity: asked "Who are you?" and 4 paraphrases, the answer names nanochat in at least 4
      of 5;
  (c) English: the base model's validation bits per byte beats a unigram model of the same
      tokenizer (base_eval measures both) by a wide margin, at least 25%.

Replies are greedy, with `nanochat chat`'s token limit (512) and frequency penalty (0.5).

With --check-run, checks a finished run instead (a name in NANOCHAT_STORAGE, or a URI); its total
is then the sum of the stages' wall times. Ends with one JSON line. Exit code 1 when a check fails
or the run took over 60 minutes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
BUDGET_S = 60 * 60

FORMAT_PROMPTS = [
    "Hi!", "What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
    "Give me three tips for learning a new language.", "What is 12 times 7?", "Tell me a joke.",
    "Explain photosynthesis in one sentence.", "What should I name my cat?", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Summarize the story of Cinderella.", "What is a prime number?",
    "Can you recommend a good book?", "How many legs does a spider have?", "What's the weather like on Mars?",
    "Write a short poem about autumn.", "What is the difference between a virus and a bacterium?",
    "Thank you for your help!", "How do I make a cup of tea?",
]
# 20 more, not part of the check: how often replies end beyond the check's own prompts
MORE_PROMPTS = [
    "Hello, how are you?", "What is the biggest animal?", "Write a sentence about dogs.", "How do I learn to swim?",
    "List three fruits.", "What is 5 plus 3?", "Tell me a fun fact.", "Describe the moon.", "What color is grass?",
    "Give me a tip for sleeping better.", "Who wrote Romeo and Juliet?", "What is water made of?",
    "Suggest a name for a dog.", "How do plants grow?", "What is the tallest mountain?",
    "Write a short story about a robot.", "Why do birds fly south?", "What is your favorite color?",
    "How can I save money?", "Explain gravity simply.",
]
IDENTITY_PROMPTS = ["Who are you?", "What is your name?", "Tell me who you are.", "Introduce yourself, please.",
                    "What should I call you?"]


def run_flow(storage, run, nproc):
    cmd = [sys.executable, "-m", "flows.speedrun", "--preset", "cpu", "--run", run, "--storage", storage,
           "--data-mirror", str(DATA), "--nproc-per-node", str(nproc)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def replies(engine, prompts):
    """(completion token ids, finish reason, text) of the reply to each one-turn prompt: greedy, with
    `nanochat chat`'s reply length limit and frequency penalty."""
    from nanochat.chat import FREQUENCY_PENALTY, MAX_TOKENS
    from nanochat.engine import Request, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, frequency_penalty=FREQUENCY_PENALTY)
    requests = [Request(engine.tokenizer.render_for_completion([{"role": "user", "content": p}]), params)
                for p in prompts]
    pending = list(requests)
    while pending or any(not r.done for r in requests):
        while pending and engine.free_rows:
            engine.add(pending.pop(0))
        engine.step()
    return [(r.completions[0].token_ids, r.completions[0].finish_reason, r.completions[0].text) for r in requests]


def behaviour(run, base_eval):
    from nanochat.inference import load_engine

    engine = load_engine(run)
    end, user_start = (engine.tokenizer.encode_special(t) for t in ("<|assistant_end|>", "<|user_start|>"))
    def well_formed(answers):
        return sum(ids[-1:] == [end] and reason == "stop" and user_start not in ids for ids, reason, _ in answers)

    answers = replies(engine, FORMAT_PROMPTS)
    ended = well_formed(answers)
    named = [text for _, _, text in replies(engine, IDENTITY_PROMPTS)]
    names = sum("nanochat" in t.lower() for t in named)
    bpb, unigram = base_eval["val_bpb"], base_eval["unigram_val_bpb"]
    checks = {
        "format": {"passed": ended == len(FORMAT_PROMPTS), "well_formed": ended, "of": len(FORMAT_PROMPTS),
                   "more_prompts_well_formed": well_formed(replies(engine, MORE_PROMPTS)),
                   "more_prompts": len(MORE_PROMPTS),
                   "examples": dict(zip(FORMAT_PROMPTS[:3], [text for _, _, text in answers]))},
        "identity": {"passed": names >= 4, "named": names, "of": len(named),
                     "answers": dict(zip(IDENTITY_PROMPTS, named))},
        "english": {"passed": bpb <= 0.75 * unigram, "val_bpb": bpb, "unigram_val_bpb": unigram,
                    "ratio": bpb / unigram},
    }
    return checks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default=None, help="an empty storage root (default: a new temporary directory)")
    p.add_argument("--run", default="learner")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--check-run", help="check this finished run instead of running one")
    args = p.parse_args()
    storage = flow_s = None
    if not args.check_run:
        storage = args.storage or tempfile.mkdtemp(prefix="nanochat-learner-")
        os.environ["NANOCHAT_STORAGE"] = storage
        flow_s = run_flow(storage, args.run, args.nproc_per_node)

    from nanochat import report
    from nanochat import storage as store

    run = store.run_uri(args.check_run or args.run, store.storage_root(storage))
    summaries = report.load(run)
    total = flow_s if flow_s is not None else sum(s["wall_time_s"] for s in summaries.values())
    print(f"\n{'stage':<16} {'wall s':>8}")
    for name, s in summaries.items():
        print(f"{name:<16} {s['wall_time_s']:>8.1f}")
    print(f"{'total (stages)' if args.check_run else 'total (flow)':<16} {total:>8.1f}   budget {BUDGET_S} s\n")
    print(report.metrics_table(summaries) or "(no metrics)")
    checks = behaviour(run, summaries["base_eval"]["metrics"])
    for name, check in checks.items():
        print(f"\n{name}: {'PASS' if check['passed'] else 'FAIL'}")
        print(json.dumps({k: v for k, v in check.items() if k != "passed"}, indent=1))
    ok = total <= BUDGET_S and all(c["passed"] for c in checks.values())
    print(json.dumps({"bench": "learner_run", "total_s": round(total, 1), "within_budget": total <= BUDGET_S,
                      "stages_s": {n: s["wall_time_s"] for n, s in summaries.items()},
                      "checks": {n: c["passed"] for n, c in checks.items()}, "run": store.redact(run)}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
