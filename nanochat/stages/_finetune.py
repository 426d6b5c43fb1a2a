"""The body of the stages that continue training a checkpoint on conversations (mid_train and
chat_sft): their options, their fixed task mixture and the stage itself. Not a stage of its own
(the underscore keeps it out of the `nanochat` command's list). Torch loads inside `finetune`, so a
stage's `--help` stays light.

Options beyond training's own: which stage's final model to start from (`--from-stage`, by default
the one the pipeline table names; a run that skips mid_train starts chat_sft from base_train's, as
upstream's 2026 speedrun does), how rows are made (`--rows`: conversations packed best-fit, or one
per row padded), a warm start from the optimizer state the upstream stage ended with, as upstream's
chat_sft does (`--warm-start-optimizer`), ChatCORE measured on the first problems of each of
chat_eval's tasks every `--chatcore-every` steps (metrics.jsonl, as base_train's CORE), and, as
upstream's 2026 chat_sft, one pass over the mixture (`--num-steps -1`), MMLU's auxiliary_train in it
(`--mmlu-weight`) and the learning rates at a fraction of the options' (`--init-lr-frac`)."""

import argparse
import itertools
import math
import time

from nanochat import pipeline, stage, storage, training_options
from nanochat.common import log
from nanochat.training_options import COUNT, COUNT_OR_ALL, RATE, SIZE
from tasks import catalog
from tasks.common import TaskDataError
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mixtures import TaskMixture
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee


def finetune_parser(stage_name, doc):
    """The parser of a stage that continues training a checkpoint on conversations."""
    p = stage.parser(stage_name, doc)
    a = p.add_argument
    a("--spelling-size", type=SIZE, help="SpellingBee examples in the mixture (0: none)")
    a("--from-stage", default=pipeline.STAGES[stage_name].trains_on, choices=pipeline.models_before(stage_name),
      help="start from this stage's final checkpoint in the run")
    a("--checkpoint", default=None, help="checkpoint directory URI to start from (default: --from-stage's final one)")
    a("--total-batch-size", type=COUNT, help="row tokens (T+1 capacity, padding included) per optimizer step over all processes")
    a("--max-seq-len", type=COUNT, help="tokens per row (default: the model's training length)")
    a("--eval-conversations", type=COUNT, help="held-out conversations for the validation loss")
    a("--identity", default=None, help="a JSONL file of your own identity/personality conversations, replacing "
      "nanochat's identity conversations")
    a("--identity-weight", type=RATE, help="epochs of the identity conversations in the mixture: how many times "
      "each is in it (a fraction: a fixed random share of one pass)")
    a("--smoltalk-weight", type=RATE, help="epochs of SmolTalk in the mixture (a fraction: a fixed random share)")
    a("--smoltalk-max-chars", type=COUNT, help="leave out SmolTalk conversations longer than this many characters "
      "(a small model imitates long replies by never ending its own)")
    a("--gsm8k-weight", type=RATE, help="epochs of GSM8K in the mixture (a fraction: a fixed random share)")
    a("--mmlu-weight", type=RATE, help="epochs of MMLU's auxiliary_train split (100k multiple-choice questions) in "
      "the mixture, as upstream's chat_sft trains 3; 0 leaves it out (the download stage fetches it with --mmlu-train)")
    a("--init-lr-frac", type=RATE, help="every parameter group's learning rate times this (upstream's chat_sft starts "
      "at 0.8 of pretraining's rates)")
    a("--rows", choices=["pack", "pad"], help="pack: whole conversations best-fit into full rows (padded only where no "
      "buffered conversation fits); pad: one conversation per row, each batch padded to its longest")
    a("--warm-start-optimizer", action=argparse.BooleanOptionalAction, help="start from the optimizer state "
      "(momentum, Adam moments) the upstream checkpoint ended with; this stage's learning rates and schedule stay its "
      "own. Needs the upstream's number of processes")
    a("--chatcore-every", type=COUNT_OR_ALL, help="steps between ChatCORE evaluations on the first problems of each of "
      "chat_eval's tasks (-1: never)")
    a("--chatcore-max-problems", type=COUNT_OR_ALL, help="problems per categorical task in those evaluations (-1: all)")
    a("--chatcore-max-generative", type=COUNT_OR_ALL, help="problems per generative task in those evaluations (-1: all)")
    a("--chatcore-max-new-tokens", type=COUNT, help="tokens sampled per generative answer in those evaluations")
    training_options.add_options(p)
    p.set_defaults(rows="pack", warm_start_optimizer=False, chatcore_every=-1, chatcore_max_problems=-1,
                   chatcore_max_generative=24, chatcore_max_new_tokens=512, mmlu_weight=0.0, init_lr_frac=1.0)
    return p


def conversation_mixture(args, seed, extra=()):
    """The fixed shuffled mixture of mid_train and chat_sft, as the options of finetune_parser set
    it: SmolTalk, the `extra` tasks (one epoch each), GSM8K, SpellingBee, the identity conversations
    (nanochat's, or the user's --identity file instead) and, with --mmlu-weight, MMLU's
    auxiliary_train, each weighted in epochs."""
    weighted = [(SmolTalk(split="train", max_chars=args.smoltalk_max_chars), args.smoltalk_weight),
                *((task, 1) for task in extra), (GSM8K(split="train"), args.gsm8k_weight),
                (SpellingBee(size=args.spelling_size), 1), (CustomJSON(path=args.identity), args.identity_weight)]
    if args.mmlu_weight > 0:  # last, so a mixture without it is the same as before the option
        weighted.append((MMLU(split="auxiliary_train"), args.mmlu_weight))
    tasks, weights = zip(*weighted)
    return TaskMixture(tasks, weights=weights, seed=seed)


def finetune(args, stage_name, train_task):
    """Trains the model of --checkpoint, else of the --from-stage stage, on the conversations of
    `train_task` (rows as --rows makes them, see ConversationLoader), evaluating bits per byte of the
    assistant tokens on SmolTalk's test split; commits the stage with its final checkpoint and
    returns its metrics."""
    import torch

    from nanochat import checkpoint, training
    from nanochat.dataloader import ConversationLoader
    from nanochat.evaluation.bpb import bits_per_byte, model_losses

    started = time.time()
    if args.identity and not storage.exists(args.identity):
        raise stage.StageError(f"--identity {args.identity}: no such file (your identity conversations, JSONL)")
    source = args.checkpoint or stage.upstream_checkpoint(args.run, args.from_stage)
    val_task = SmolTalk(split="test", stop=args.eval_conversations)
    chat_tasks = {name: catalog.eval_task(name) for name in catalog.BASELINES} if args.chatcore_every > 0 else {}
    n_conversations, *_ = read_tasks(train_task, *chat_tasks.values())
    trainer = training.Training(args, stage_name)
    model, tokenizer, meta = checkpoint.load_model(source, trainer.device)
    model.train()
    T = args.max_seq_len or model.config.sequence_len
    world = trainer.compute.world_size
    accum = training_options.grad_accum(args.total_batch_size, args.device_batch_size, T + 1, world)
    if args.num_steps < -1:
        raise stage.StageError(f"--num-steps must be -1 (one pass over the mixture) or >= 0, got {args.num_steps}")
    num_steps = args.num_steps if args.num_steps >= 0 else epoch_steps(tokenizer, train_task, args, T, accum, trainer.device)
    plan = training_options.Plan(num_steps, accum)
    optimizer = trainer.optimizer(model)
    for group in optimizer.param_groups:  # as upstream's --init-lr-frac: every group, the fixed-rate gates too
        group["lr"] = group["initial_lr"] = group["lr"] * args.init_lr_frac
    state = trainer.resume(model, optimizer)
    if state is None and args.warm_start_optimizer:
        warm_start(optimizer, source, trainer.compute.rank, world)
    batches = ConversationLoader(tokenizer, train_task, args.device_batch_size, T, mode=args.rows, device=trainer.device,
                                 state=state)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=trainer.device)

    def evaluate(step):
        val = ConversationLoader(tokenizer, val_task, args.device_batch_size, T, mode="pad", epochs=1, device=trainer.device)
        losses = model_losses(model, trainer.autocast)
        bpb = bits_per_byte(itertools.islice(val, len(val_task)), token_bytes, model=losses)["model"]
        trainer.metrics.add({"step": step, "val_bpb": bpb})
        log.info("step %d/%d: validation %.4f bits per byte of assistant text", step, plan.num_steps, bpb)
        return bpb

    log.info("%s from %s: %d steps of %d x %d-token rows x %d processes x %d accumulation, %d conversations (%s)",
             stage_name, source, plan.num_steps, args.device_batch_size, T + 1, world, accum, n_conversations, args.rows)
    if trainer.step == 0 and args.eval_every > 0:
        evaluate(0)
    hooks = [(args.eval_every, evaluate), (args.chatcore_every, chatcore_hook(args, trainer, model, tokenizer, chat_tasks))]
    final = trainer.train(model, optimizer, batches, plan, hooks, meta=checkpoint.tokenizer_meta(meta["tokenizer"]))
    val_bpb = evaluate(trainer.step)
    metrics = {"val_bpb": val_bpb, "conversations": n_conversations, "epochs_started": batches.epoch + 1}
    metrics = trainer.commit({"checkpoint": storage.join(source, checkpoint.MANIFEST)}, final, metrics, started)
    log.info("done: validation %.4f bits per byte of assistant text; checkpoint %s", val_bpb, final)
    trainer.close()
    return metrics


def epoch_steps(tokenizer, task, args, T, accum, device):
    """The optimizer steps of one pass over `task` as this stage's loader makes its rows (--num-steps
    -1; upstream's chat_sft trains one epoch): the most batches any process's share fills, `accum`
    batches a step. It renders every conversation an extra time, before training."""
    import torch
    import torch.distributed as dist

    from nanochat.dataloader import ConversationLoader

    batches = sum(1 for _ in ConversationLoader(tokenizer, task, args.device_batch_size, T, mode=args.rows, epochs=1))
    if dist.is_initialized():
        most = torch.tensor(batches, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        batches = int(most)
    steps = math.ceil(batches / accum)
    log.info("one pass over the mixture: %d batches of %d rows on the busiest process, %d steps", batches,
             args.device_batch_size, steps)
    return steps


def read_tasks(*tasks):
    """The lengths of the tasks, read now (tasks load their files lazily): bad or missing data fails
    the stage before any training."""
    try:
        return [len(task) for task in tasks]
    except (TaskDataError, OSError) as e:
        raise stage.StageError(str(e)) from None


def warm_start(optimizer, source, rank, world_size):
    """Loads into `optimizer` this rank's optimizer state of the checkpoint `source` (the momentum
    and Adam moments the upstream stage ended with), keeping the optimizer's own hyperparameters:
    learning rates, their schedule, betas and weight decay are this stage's. Upstream's chat_sft
    starts so from pretraining's optimizer. An imported model's checkpoint has no optimizer state:
    the optimizer then starts fresh, with a warning."""
    from nanochat import checkpoint

    manifest = checkpoint.read_manifest(source)
    if not any(name.startswith("optim_rank_") for name in manifest["files"]):
        log.warning("--warm-start-optimizer: %s holds no optimizer state (an imported model): the optimizer starts "
                    "fresh", source)
        return
    saved = manifest["world_size"]
    if saved != world_size:
        raise stage.StageError(f"--warm-start-optimizer: {source} holds the optimizer state of {saved} processes and "
                               f"this stage runs {world_size}; run it with --nproc_per_node {saved}, or "
                               "without --warm-start-optimizer")
    loaded, _ = checkpoint.load_rank_state(source, rank)  # this stage keeps its own RNG state
    groups = optimizer.state_dict()["param_groups"]
    layout = [(g["kind"], len(g["params"])) for g in groups]
    if (saved_layout := [(g.get("kind"), len(g["params"])) for g in loaded["param_groups"]]) != layout:
        raise stage.StageError(f"--warm-start-optimizer: the optimizer state in {source} has the parameter groups "
                               f"{saved_layout} and this stage's optimizer {layout} (another optimizer recipe?)")
    try:
        optimizer.load_state_dict({"state": loaded["state"], "param_groups": groups})
    except ValueError as e:
        raise stage.StageError(f"--warm-start-optimizer: {source}: {e}") from None
    log.info("warm start: the optimizer state of %s (this stage's learning rates)", source)


def chatcore_hook(args, trainer, model, tokenizer, tasks):
    """The hook measuring ChatCORE as chat_eval does (greedy answers), on the first
    --chatcore-max-problems of each categorical task and --chatcore-max-generative of each
    generative one; it records the score and each task's accuracy in metrics.jsonl."""
    from nanochat.engine import Engine, SamplingParams
    from nanochat.evaluation import chatcore

    # greedy, and seeded: unseeded rows would draw their seeds from Python's global random
    params = SamplingParams(temperature=0.0, max_tokens=args.chatcore_max_new_tokens, seed=1234)

    def evaluate_chatcore(step):
        engine = Engine(model, tokenizer)  # its cache lives for this evaluation only
        results = chatcore.evaluate_tasks(tasks, model, tokenizer, engine, trainer.device, trainer.autocast,
                                          args.chatcore_max_problems, args.chatcore_max_generative,
                                          args.device_batch_size, params, trainer.compute.rank, trainer.compute.world_size)
        accuracies = {name: r["accuracy"] for name, r in results.items()}
        score = chatcore.chatcore(accuracies, catalog.BASELINES)
        trainer.metrics.add({"step": step, "chatcore": score, **{f"chatcore/{n}": a for n, a in accuracies.items()}})

    return evaluate_chatcore
