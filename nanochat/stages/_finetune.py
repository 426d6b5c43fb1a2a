"""The body of the stages that continue training a checkpoint on conversations (mid_train and
chat_sft): their options, their fixed task mixture and the stage itself. Not a stage of its own
(the underscore keeps it out of the `nanochat` command's list). Torch loads inside `finetune`, so a
stage's `--help` stays light."""

import argparse
import itertools
import math
import time

from nanochat import stage, storage, training_options
from nanochat.common import log
from tasks.common import TaskDataError
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mixtures import TaskMixture
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee


def finetune_parser(stage_name, doc):
    """The parser of a stage that continues training a checkpoint on conversations."""
    p = stage.parser(stage_name, doc)
    a = p.add_argument
    a("--spelling-size", type=int, help="SpellingBee examples in the mixture")
    a("--checkpoint", default=None, help="checkpoint directory URI to start from (default: the upstream stage's final one)")
    a("--total-batch-size", type=int, help="row tokens (T+1 capacity, padding included) per optimizer step over all processes")
    a("--max-seq-len", type=int, help="tokens per row (default: the model's training length)")
    a("--eval-conversations", type=int, help="held-out conversations for the validation loss")
    a("--identity", default=None, help="a JSONL file of your own identity/personality conversations, replacing "
      "nanochat's identity conversations")
    a("--identity-weight", type=weight, help="how many times the identity conversations are repeated in the mixture")
    a("--smoltalk-weight", type=weight, help="how many times each SmolTalk conversation is in the mixture "
      "(a fraction: a fixed random share)")
    a("--smoltalk-max-chars", type=positive, help="leave out SmolTalk conversations longer than this many characters "
      "(a small model imitates long replies by never ending its own)")
    a("--gsm8k-weight", type=weight, help="how many times each GSM8K problem is in the mixture (a fraction: a fixed "
      "random share)")
    training_options.add_options(p)
    return p


def weight(text):
    """argparse type of a mixture weight: a finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"a weight is a number >= 0, got {text}")
    return value


def positive(text):
    """argparse type of a count: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def conversation_mixture(args, seed, extra=()):
    """The fixed shuffled mixture of mid_train and chat_sft, as the options of finetune_parser set
    it: SmolTalk, the `extra` tasks (once each), GSM8K, SpellingBee and the identity conversations
    (nanochat's, or the user's --identity file instead)."""
    weighted = [(SmolTalk(split="train", max_chars=args.smoltalk_max_chars), args.smoltalk_weight),
                *((task, 1) for task in extra), (GSM8K(split="train"), args.gsm8k_weight),
                (SpellingBee(size=args.spelling_size), 1), (CustomJSON(path=args.identity), args.identity_weight)]
    tasks, weights = zip(*weighted)
    return TaskMixture(tasks, weights=weights, seed=seed)


def finetune(args, stage_name, upstream, mode, train_task):
    """Trains the `upstream` stage's model on the conversations of `train_task` (mode 'pack' or
    'pad', see ConversationLoader), evaluating bits per byte of the assistant tokens on SmolTalk's
    test split; commits the stage with its final checkpoint and returns its metrics."""
    import torch

    from nanochat import checkpoint, training
    from nanochat.dataloader import ConversationLoader
    from nanochat.evaluation.bpb import bits_per_byte, model_losses
    from nanochat.optim import setup_optimizers

    started = time.time()
    source = args.checkpoint or stage.upstream_checkpoint(args.run, upstream)
    val_task = SmolTalk(split="test", stop=args.eval_conversations)
    try:
        n_conversations = len(train_task)  # loads and checks every file of the mixture
    except (TaskDataError, OSError) as e:
        raise stage.StageError(str(e)) from None
    trainer = training.Training(args, stage_name)
    model, tokenizer, meta = checkpoint.load_model(source, trainer.device)
    model.train()
    T = args.max_seq_len or model.config.sequence_len
    world = trainer.compute.world_size
    accum = training_options.grad_accum(args.total_batch_size, args.device_batch_size, T + 1, world)
    plan = training_options.Plan(args.num_steps, accum)
    optimizer = setup_optimizers(model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                 matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    state = trainer.resume(model, optimizer)
    batches = ConversationLoader(tokenizer, train_task, args.device_batch_size, T, mode=mode, device=trainer.device,
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
             stage_name, source, plan.num_steps, args.device_batch_size, T + 1, world, accum, n_conversations, mode)
    if trainer.step == 0 and args.eval_every > 0:
        evaluate(0)
    final = trainer.train(model, optimizer, batches, plan, [(args.eval_every, evaluate)],
                          meta={"tokenizer": meta["tokenizer"]})
    val_bpb = evaluate(trainer.step)
    metrics = {"val_bpb": val_bpb, "conversations": n_conversations, "epochs_started": batches.epoch + 1}
    metrics = trainer.commit({"checkpoint": storage.join(source, checkpoint.MANIFEST)}, final, metrics, started)
    log.info("done: validation %.4f bits per byte of assistant text; checkpoint %s", val_bpb, final)
    trainer.close()
    return metrics
