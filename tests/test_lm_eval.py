"""lm-evaluation-harness against a real `nanochat serve` (the suite's tiny base model): its
local-completions model runs a multiple-choice task (tests/lm_eval/nanochat_arc_easy.yaml, ARC-Easy
from the shared data), offline, tokenizing through our /tokenize. Oracle: each answer's
loglikelihood is the sum of our model's own log-softmax over the answer's tokens, and lm-eval's
accuracy is the accuracy those sums give.

lm-eval runs in this process, through the Python API the `lm_eval` command calls, with the README's
model arguments: the command indexes all of lm-eval's own tasks first (20 s on 2 busy cores), which a
TaskManager of our task alone skips."""

from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from nanochat.inference import load_engine
from nanochat.serve.completions import encode
from tests.support.serving import serving

pytest_plugins = ["tests.support.serving"]

TASKS = Path(__file__).parent / "lm_eval"
QUESTIONS = 24


def lm_eval(url, context):
    """local-completions over our remote tokenizer, on our task alone: its results, samples logged."""
    model_args = (f"model=nanochat,base_url={url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
                  f"max_length={context},num_concurrent=1,max_retries=1")
    return simple_evaluate(model="local-completions", model_args=model_args, tasks=["nanochat_arc_easy"], batch_size=8,
                           limit=QUESTIONS, log_samples=True,
                           task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))


def answer_loglikelihoods(model, tokenizer, context, continuation):
    """The sum of our log-softmax over the continuation's tokens, split from the context as lm-eval
    splits them (its _encode_pair: the context's trailing spaces move to the continuation, the whole
    is encoded and the context's tokens cut off)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, start = encode(tokenizer, context + continuation, bos=False), len(encode(tokenizer, context, bos=False))
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(start, len(whole)))


def test_lm_eval_scores_arc_easy_with_our_logprobs(run, shared_data, monkeypatch):
    storage, name = run
    served = load_engine(str(storage / "runs" / name))
    monkeypatch.chdir(shared_data)  # the task's data_files are relative to the data directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with serving(run, env={"OMP_NUM_THREADS": "1"}) as url:  # one thread: the tiny model's matmuls on busy cores
        output = lm_eval(url, served.max_len)
    accuracy, docs = output["results"]["nanochat_arc_easy"]["acc,none"], output["samples"]["nanochat_arc_easy"]
    assert len(docs) == QUESTIONS
    correct = 0
    for doc in docs:
        theirs = [float(resp[0][0]) for resp in doc["resps"]]  # (loglikelihood, is_greedy) per answer
        ours = [answer_loglikelihoods(served.model, served.tokenizer, *arguments) for arguments in doc["arguments"]]
        assert max(abs(a - b) for a, b in zip(theirs, ours)) < 1e-4, (doc["doc_id"], theirs, ours)
        correct += ours.index(max(ours)) == int(doc["target"])
    assert accuracy == correct / QUESTIONS
