"""The CORE metric (DCLM): in-context-learning tasks scored by the model's losses, no generation.

A task of the eval bundle (`core.yaml` + `eval_data/*.jsonl` + `eval_meta_data.csv`) is one of:
    multiple_choice    {query, choices, gold}: the prompts differ in their ending (the choice);
                       the choice with the lowest mean loss over its tokens wins
    schema             {context_options, continuation, gold}: the prompts differ in their start
                       (the context); the context under which the shared continuation has the
                       lowest mean loss wins
    language_modeling  {context, continuation}: right only if greedy decoding reproduces every
                       token of the continuation
Each example is preceded by `num_fewshot` solved examples of the same task, drawn with a seed per
example, separated by blank lines. Accuracy is centered by the task's random baseline, (acc - b) /
(1 - b), and CORE is the mean centered accuracy over the tasks present in the bundle.
"""

import csv
import json
import random

import torch
import torch.nn.functional as F
import yaml

from nanochat import dataset, sources, storage
from nanochat.common import pad_right, sum_over_ranks

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# The 22 tasks of CORE as DCLM defines it; a bundle may lack some (the report names them).
CORE_TASKS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa", "commonsense_qa",
    "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande", "bigbench_dyck_languages",
    "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators", "bigbench_repeat_copy_logic", "squad", "coqa",
    "boolq", "bigbench_language_identification",
)


class BundleError(ValueError):
    """The eval bundle is missing a file or a row is malformed; the message names it."""


def load_tasks(bundle):
    """The tasks of the bundle directory URI whose data files are present, and the CORE tasks
    that are absent (from core.yaml or from eval_data/): ([task dict], [absent label])."""
    config = yaml.safe_load(storage.read_text(storage.join(bundle, "core.yaml")))
    baselines = read_baselines(storage.join(bundle, "eval_meta_data.csv"))
    tasks, missing = [], []
    for spec in config["icl_tasks"]:
        uri = storage.join(bundle, "eval_data", spec["dataset_uri"])
        if not storage.exists(uri):
            missing.append(spec["label"])
            continue
        if spec["icl_task_type"] not in TASK_TYPES:
            raise BundleError(f"{spec['label']}: unknown icl_task_type {spec['icl_task_type']!r}")
        if spec["label"] not in baselines:
            raise BundleError(f"{spec['label']}: no random baseline in eval_meta_data.csv")
        tasks.append({
            "label": spec["label"],
            "type": spec["icl_task_type"],
            "num_fewshot": spec["num_fewshot"][0],
            "delimiter": spec.get("continuation_delimiter", " "),
            "baseline": baselines[spec["label"]],
            "examples": read_examples(uri, spec["icl_task_type"]),
        })
    present = {t["label"] for t in tasks}
    return tasks, [label for label in CORE_TASKS if label not in present and label not in missing] + missing


def load_bundle(bundle=None, storage_uri=None):
    """load_tasks of the eval bundle directory `bundle`, by default the data cache's (fetched and
    unpacked first if needed) or, in a pipeline run, the declared one (`dataset.eval_bundle_dir`):
    (tasks, absent labels, bundle URI). A BundleError names what failed."""
    try:
        bundle = bundle or dataset.eval_bundle_dir(storage_uri)
        return (*load_tasks(bundle), bundle)
    except (dataset.DownloadError, sources.SourceError, FileNotFoundError) as e:
        raise BundleError(f"eval bundle {bundle or 'of the data cache'}: {e}") from None


def read_baselines(uri):
    """{task label: random-baseline accuracy in [0, 1)} from eval_meta_data.csv."""
    rows = csv.DictReader(storage.read_text(uri).splitlines())
    return {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in rows}


REQUIRED_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
                   "language_modeling": ("context", "continuation")}


def read_examples(uri, task_type):
    examples = []
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise BundleError(f"{uri}: line {lineno}: not JSON ({e})") from None
        missing = [f for f in REQUIRED_FIELDS[task_type] if f not in example]
        if missing:
            raise BundleError(f"{uri}: line {lineno}: missing {', '.join(missing)} for a {task_type} task")
        examples.append(example)
    return examples


# prompts

def fewshot_examples(task, idx):
    """The solved examples shown before example `idx`: a seeded draw from the others."""
    others = [i for i in range(len(task["examples"])) if i != idx]
    return [task["examples"][i] for i in random.Random(1234 + idx).sample(others, task["num_fewshot"])]


def render_prompts(task, idx):
    """The prompts of example `idx`: one per choice (multiple_choice) or per context option
    (schema), or [without, with] the continuation (language_modeling)."""
    item, delim = task["examples"][idx], task["delimiter"]
    shots = fewshot_examples(task, idx)
    if task["type"] == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task["type"] == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in shots)
        return [f"{prefix}{context}{delim}{item['continuation']}" for context in item["context_options"]]
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in shots)
    prompt = f"{prefix}{item['context'].strip()}{delim}"
    # The delimiter's trailing space belongs with the continuation, as the tokenizer glues them.
    return [prompt.strip(), prompt + item["continuation"]]


def common_length(seqs, from_end=False):
    """Length of the prefix (or suffix) that all the sequences share."""
    n = 0
    for column in zip(*(reversed(s) if from_end else s for s in seqs)):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def spans(task, token_lists):
    """(sequences to run, [(start, end)] of the scored tokens in each)."""
    if task["type"] == "multiple_choice":
        # a choice that is a prefix of another still scores its last token
        start = min(common_length(token_lists), min(len(t) for t in token_lists) - 1)
        return token_lists, [(start, len(t)) for t in token_lists]
    if task["type"] == "schema":
        n = common_length(token_lists, from_end=True)
        return token_lists, [(len(t) - n, len(t)) for t in token_lists]
    without, full = token_lists
    return [full], [(common_length([without, full]), len(full))]


def crop(seqs, bounds, max_len):
    """Drops tokens from the left of sequences longer than max_len, shifting their spans."""
    out_seqs, out_bounds = [], []
    for seq, (start, end) in zip(seqs, bounds):
        cut = max(0, len(seq) - max_len)
        out_seqs.append(seq[cut:])
        out_bounds.append((max(1, start - cut), end - cut))
    return out_seqs, out_bounds


# scoring

@torch.no_grad()
def evaluate_example(model, tokenizer, task, idx, device, autocast, max_len):
    """True if the model gets example `idx` right."""
    token_lists = tokenizer.encode(render_prompts(task, idx), prepend="<|bos|>")
    seqs, bounds = crop(*spans(task, token_lists), max_len)
    ids = pad_right(seqs, tokenizer.bos_token_id).to(device)
    with autocast():
        logits = model(ids)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
    # position p predicts token p + 1: the scored tokens start..end are predicted at start-1..end-1
    if task["type"] == "language_modeling":
        (start, end), = bounds
        return bool((logits[0, start - 1:end - 1].argmax(-1) == ids[0, start:end]).all())
    mean_losses = [losses[i, start - 1:end - 1].mean().item() for i, (start, end) in enumerate(bounds)]
    return mean_losses.index(min(mean_losses)) == task["examples"][idx]["gold"]


def evaluate_task(model, tokenizer, task, device, autocast, max_len, max_examples=-1, rank=0, world_size=1):
    """Accuracy on the task (its first max_examples of a fixed shuffle; -1: all), ranks taking
    examples r, r+W, ... and summing their counts."""
    order = list(range(len(task["examples"])))
    random.Random(1337).shuffle(order)
    if max_examples > 0:
        order = order[:max_examples]
    counts = torch.zeros(2, dtype=torch.long, device=device)  # correct, total
    for idx in order[rank::world_size]:
        counts[0] += evaluate_example(model, tokenizer, task, idx, device, autocast, max_len)
        counts[1] += 1
    sum_over_ranks(counts)
    return counts[0].item() / counts[1].item()


def centered(accuracy, baseline):
    return (accuracy - baseline) / (1 - baseline)


def core_metric(model, tokenizer, tasks, device, autocast, max_len, max_examples=-1, rank=0, world_size=1, progress=None):
    """{"core": mean centered accuracy, "tasks": {label: {accuracy, centered, baseline, examples}}}."""
    results = {}
    for task in tasks:
        accuracy = evaluate_task(model, tokenizer, task, device, autocast, max_len, max_examples, rank, world_size)
        n = len(task["examples"]) if max_examples < 0 else min(max_examples, len(task["examples"]))
        results[task["label"]] = {"accuracy": accuracy, "centered": centered(accuracy, task["baseline"]),
                                  "baseline": task["baseline"], "examples": n}
        if progress:
            progress(task["label"], results[task["label"]])
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "tasks": results}
