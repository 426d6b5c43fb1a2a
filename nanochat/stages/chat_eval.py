"""Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and SpellingBee; ChatCORE.

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_eval -- --run myrun --preset tiny --source sft
    python -m nanochat.stages.chat_eval --run myrun --preset cpu --source mid -a ARC-Easy,GSM8K --max-generative 200
    python -m nanochat.stages.chat_eval --run myrun --preset cpu --source sft -a ARC-Easy,mytasks:Capitals

Reads the final checkpoint of the --source stage (mid_train, chat_sft or chat_rl) in the same run.
Categorical tasks compare the logits of the answer letters, batched; generative ones sample with
the engine (greedy by default; GSM8K uses the calculator, HumanEval runs in the sandbox). Both run
under the autocast that training used (--dtype). Problems are spread over the processes. Writes
<run>/chat_eval_<source>/stage.json: each task's accuracy, problem count and time, and ChatCORE
over the built-in tasks evaluated.

-a takes `module:Class` for a task of your own (as chat_rl's --task: a Task whose constructor takes
the split; this stage evaluates 'test'). Its accuracy is reported under that name; it stays out of
ChatCORE, which centers each task by its known chance accuracy and so stays comparable across runs.
"""

import time

from nanochat import pipeline, stage, storage
from nanochat.common import log
from nanochat.training_options import COUNT, COUNT_OR_ALL, RATE
from tasks import catalog


def build_parser():
    p = stage.parser("chat_eval", __doc__)
    a = p.add_argument
    a("--source", choices=pipeline.CHAT_SOURCES, required=True, help="which stage's model to evaluate")
    a("-a", "--tasks", default=",".join(catalog.BASELINES),
      help="comma-separated tasks, built-in or module:Class of your own (default: all built-in)")
    a("--max-problems", type=COUNT_OR_ALL, help="problems per categorical task (-1: all)")
    a("--max-generative", type=COUNT_OR_ALL, help="problems per generative task, each sampled (-1: all)")
    a("--batch-size", type=COUNT, help="conversations per forward pass for categorical tasks")
    a("--max-new-tokens", type=COUNT, help="tokens sampled per generative answer")
    a("--temperature", type=RATE, help="0: greedy")
    a("--top-k", type=COUNT, default=None, help="sample among the k most likely tokens")
    stage.add_compute_options(p)
    return p


def main(args):
    from nanochat import checkpoint, common
    from nanochat.engine import Engine, SamplingParams
    from nanochat.evaluation import chatcore

    started = time.time()
    name = f"chat_eval_{args.source}"
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] or [""]
    try:  # task objects read their data only when first used
        tasks = {name: catalog.eval_task(name) for name in names}
    except catalog.UnknownTask as e:
        raise stage.StageError(f"-a: {e}") from None
    source = stage.upstream_checkpoint(args.run, pipeline.SOURCES[args.source])
    compute = common.compute_init(args.device_type)
    model, tokenizer, _ = checkpoint.load_model(source, compute.device)
    dtype = common.autocast_dtype(compute.device_type, args.dtype)
    autocast = common.autocast_context(compute.device_type, dtype)
    engine = Engine(model, tokenizer)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens, seed=1234)

    results = chatcore.evaluate_tasks(tasks, model, tokenizer, engine, compute.device, autocast, args.max_problems,
                                      args.max_generative, args.batch_size, params, compute.rank, compute.world_size)
    accuracies = {t: r["accuracy"] for t, r in results.items()}
    builtin = {t: accuracy for t, accuracy in accuracies.items() if t in catalog.BASELINES}
    score = chatcore.chatcore(builtin, catalog.BASELINES) if builtin else None  # None: only tasks of your own
    if builtin:
        log.info("ChatCORE %.4f over %s", score, ", ".join(builtin))
    metrics = {"chatcore": score, "tasks": results, "source": args.source,
               "dtype": str(dtype).removeprefix("torch."), **accuracies}
    if compute.master:
        stage.commit(args.run, name, args, {"checkpoint": storage.join(source, checkpoint.MANIFEST)}, {}, metrics, started)
    return metrics


if __name__ == "__main__":
    stage.run_main(main, build_parser(), "chat_eval")
