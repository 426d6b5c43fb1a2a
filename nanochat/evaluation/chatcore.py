"""Chat evaluations and ChatCORE.

Categorical tasks (ARC, MMLU) are scored without sampling: the prompt ends where the assistant's
answer begins, and the model's prediction is the answer letter with the highest logit there (only
the task's letters compete). Generative tasks (GSM8K with the calculator tool, HumanEval run in the
sandbox, SpellingBee) sample a completion with the engine, many problems decoding together, and
the task judges it. Both run under the autocast of the stage (the precision training used).
ChatCORE is the mean over tasks of (accuracy - baseline) / (1 - baseline), the baseline being the
task's accuracy by chance. Tasks come in as objects (`tasks.catalog` names them).
"""

import collections
import logging
import time

import torch

from nanochat.common import pad_right, sum_over_ranks
from nanochat.engine import Request
from nanochat.stage import StageError

log = logging.getLogger("nanochat")


@torch.no_grad()
def categorical_correct(model, tokenizer, task, indices, device, autocast, batch_size):
    """How many of the task's conversations `indices` the model answers right, by letter logits.
    Prompts are batched in order of length, so a batch pads little."""
    conversations = [task[i] for i in indices]
    choices = [answer_letters(task, i, c, tokenizer) for i, c in zip(indices, conversations)]
    max_len = model.config.sequence_len
    prompts = [tokenizer.render_for_completion(c)[-max_len:] for c in conversations]
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        answer_positions = torch.tensor([len(prompts[k]) - 1 for k in batch], device=device)
        with autocast():
            logits = model(pad_right([prompts[k] for k in batch], tokenizer.bos_token_id).to(device),
                           positions=answer_positions)
        for row, k in enumerate(batch):
            letters, letter_ids = choices[k]
            correct += task.evaluate(conversations[k], letters[int(logits[row, letter_ids].argmax())])
    return correct


def answer_letters(task, index, conversation, tokenizer):
    """(the options of a categorical task's conversation, the token id each begins with: what the
    logits compare); a StageError naming the task and example where they are missing, or where two
    begin with the same token (the first would always win): a task of one's own, built by hand."""
    letters, where = conversation.get("letters"), f"task {type(task).__name__} ({type(task).__module__}) example {index}"
    if not (isinstance(letters, (list, tuple, str)) and letters and all(isinstance(x, str) and x for x in letters)):
        raise StageError(f"{where}: a categorical task's conversation needs 'letters', a list of its answer options "
                         f"(tasks.common.mc_conversation sets it), not {letters!r}")
    ids = [tokenizer.encode(letter)[0] for letter in letters]
    if len(set(ids)) < len(ids):
        raise StageError(f"{where}: its letters {list(letters)} do not each begin with a token of their own, so their "
                         f"logits cannot tell them apart")
    return list(letters), ids


def generative_correct(engine, tokenizer, task, indices, params, autocast):
    """How many of the task's conversations `indices` the model answers right, sampling one
    completion each with `params`; all problems decode together as rows free up."""
    pending = collections.deque(indices)
    running = []
    correct = 0
    with autocast():
        while pending or running:
            while pending and engine.free_rows:
                i = pending.popleft()
                request = Request(tokenizer.render_for_completion(task[i]), params)
                try:
                    engine.add(request)
                except ValueError:  # the prompt does not fit the context: counted wrong
                    continue
                running.append((i, request))
            engine.step()
            for i, request in [r for r in running if r[1].done]:
                correct += bool(task.evaluate(task[i], request.completions[0].text))
            running = [r for r in running if not r[1].done]
    return correct


def evaluate(task, model, tokenizer, engine, device, autocast, max_problems=-1, batch_size=8, params=None,
             rank=0, world_size=1):
    """(accuracy, problems) on `task` (its first max_problems; -1: all), problems spread over ranks. A
    task with no examples is a StageError naming it (a task of one's own, `chat_eval -a`)."""
    n = len(task) if max_problems < 0 else min(max_problems, len(task))
    if n == 0:
        raise StageError(f"task {type(task).__name__} has no examples to evaluate ({type(task).__module__})")
    indices = list(range(rank, n, world_size))
    if task.eval_type == "categorical":
        correct = categorical_correct(model, tokenizer, task, indices, device, autocast, batch_size)
    else:
        correct = generative_correct(engine, tokenizer, task, indices, params, autocast)
    counts = torch.tensor([correct, len(indices)], dtype=torch.long, device=device)
    sum_over_ranks(counts)
    return counts[0].item() / counts[1].item(), counts[1].item()


def evaluate_tasks(tasks, model, tokenizer, engine, device, autocast, max_problems, max_generative, batch_size,
                   params, rank=0, world_size=1):
    """{name: {accuracy, problems, seconds}} over `tasks` ({name: task}): the first max_problems of
    each categorical task and max_generative of each generative one (-1: all)."""
    results = {}
    for name, task in tasks.items():
        t0 = time.time()
        limit = max_generative if task.eval_type == "generative" else max_problems
        accuracy, problems = evaluate(task, model, tokenizer, engine, device, autocast, limit, batch_size, params,
                                      rank, world_size)
        results[name] = {"accuracy": accuracy, "problems": problems, "seconds": round(time.time() - t0, 2)}
        log.info("%-14s accuracy %.4f on %d problems in %.1fs", name, accuracy, problems, results[name]["seconds"])
    return results


def chatcore(accuracies, baselines):
    """Mean centered accuracy over the tasks in `accuracies` ({name: accuracy}); `baselines` holds
    each one's accuracy by chance."""
    centered = [(acc - baselines[name]) / (1 - baselines[name]) for name, acc in accuracies.items()]
    return sum(centered) / len(centered)
