"""lm-evaluation-harness against a real `nanochat serve` (the suite's tiny base model), offline, on
tasks of tests/lm_eval over the shared data:

- local-completions runs a multiple-choice task (nanochat_arc_easy.yaml, ARC-Easy), tokenizing
  through our /tokenize. Oracle: each answer's loglikelihood is the sum of our model's own
  log-softmax over the answer's tokens, and lm-eval's accuracy is the accuracy those sums give.
- local-chat-completions, with the chat template applied, runs a generative task
  (nanochat_gsm8k_chat.yaml, GSM8K's first questions). Oracle: each response lm-eval recorded is
  what our server answers to the same messages with the same greedy parameters (asked again through
  the openai client); lm-eval's chrF over them is reported.

lm-eval runs in this process, through the Python API the `lm_eval` command calls, with the README's
model arguments: the command indexes all of lm-eval's own tasks first (20 s on 2 busy cores), which a
TaskManager of our tasks alone skips."""

import json
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from nanochat.inference import load_engine
from nanochat.serve.completions import encode
from tests.support.serving import openai_client, serving

pytest_plugins = ["tests.support.serving"]

TASKS = Path(__file__).parent / "lm_eval"
QUESTIONS = 24  # ARC-Easy's
CHAT_QUESTIONS = 4  # GSM8K's first four and 16 tokens fit the tiny model's context (128 tokens); the fifth does not


@pytest.fixture(scope="module")
def server(run, shared_data):
    """`nanochat serve` on the suite's tiny run, for the module's lm-eval runs, which read their data
    offline from the data directory (the tasks' data_files are relative to it): its URL."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(shared_data)
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        with serving(run, env={"OMP_NUM_THREADS": "1"}) as url:  # one thread: the tiny model's matmuls on busy cores
            yield url


def lm_eval(model, model_args, task, limit, **options):
    """lm-eval's `model` on our task alone: its results and the samples it logged."""
    output = simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit, log_samples=True,
                             task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), **options)
    return output["results"][task], output["samples"][task]


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


def test_lm_eval_scores_arc_easy_with_our_logprobs(run, server):
    storage, name = run
    served = load_engine(str(storage / "runs" / name))
    model_args = (f"model=nanochat,base_url={server}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
                  f"max_length={served.max_len},num_concurrent=1,max_retries=1")
    results, docs = lm_eval("local-completions", model_args, "nanochat_arc_easy", QUESTIONS, batch_size=8)
    assert len(docs) == QUESTIONS
    correct = 0
    for doc in docs:
        theirs = [float(resp[0][0]) for resp in doc["resps"]]  # (loglikelihood, is_greedy) per answer
        ours = [answer_loglikelihoods(served.model, served.tokenizer, *arguments) for arguments in doc["arguments"]]
        assert max(abs(a - b) for a, b in zip(theirs, ours)) < 1e-4, (doc["doc_id"], theirs, ours)
        correct += ours.index(max(ours)) == int(doc["target"])
    assert results["acc,none"] == correct / QUESTIONS


def test_lm_eval_chat_generates_gsm8k_answers_as_our_server(server):
    model_args = f"model=nanochat,base_url={server}/v1/chat/completions,num_concurrent=1,max_retries=1"
    results, docs = lm_eval("local-chat-completions", model_args, "nanochat_gsm8k_chat", CHAT_QUESTIONS,
                            apply_chat_template=True)
    assert len(docs) == CHAT_QUESTIONS
    client = openai_client(server)
    for doc in docs:
        [(chat, gen_kwargs)] = doc["arguments"]  # the messages as JSON (a JsonChatStr, logged as a tuple), the task's generation_kwargs
        assert gen_kwargs == {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False, "temperature": 0.0,
                              "frequency_penalty": 0}
        ours = client.chat.completions.create(model="nanochat", messages=json.loads(chat[0]), max_tokens=16,
                                              temperature=0, frequency_penalty=0, stop=["\n\n"]).choices[0].message.content
        assert doc["resps"] == [[ours]], doc["doc_id"]
    assert results["chrf,none"] > 0  # lm-eval scored the text of those answers
