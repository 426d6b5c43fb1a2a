"""Reinforcement learning on GSM8K: GRPO-style policy gradient from the rewards of sampled answers.

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_rl -- --run myrun --preset tiny
    python -m nanochat.stages.chat_rl --run myrun --preset cpu --num-samples 8

Starts from chat_sft's final checkpoint in the same run (or --checkpoint). Each step, every process
takes its share of --examples-per-step training questions (rank r: r, r+W, ...), samples
--num-samples answers to each with the engine (tool use on), and rewards each 1 if its final answer
is right. The advantage of an answer is its reward minus the mean reward of its question's answers;
the loss is the advantage-weighted negative log-likelihood of the sampled tokens (tool outputs,
which the model did not choose, are left out), averaged over those tokens. pass@k on a held-out
slice of the test split is logged every --eval-every steps. Checkpoints, exact resume and outputs as
in the other training stages.

--task names the task: GSM8K (default), or `module:Class` for your own (a Task whose constructor
takes the split, 'train' or 'test', and whose `reward(conversation, completion)` is in [0, 1]).
"""

import collections
import importlib
import time

from nanochat import checkpoint, stage, storage, training
from nanochat.common import log, pad_right, sum_over_ranks

STAGE = "chat_rl"


def build_parser():
    p = stage.parser(STAGE, __doc__)
    a = p.add_argument
    a("--checkpoint", default=None, help="checkpoint directory URI to start from (default: chat_sft's final one)")
    a("--task", default="GSM8K", help="GSM8K, or module:Class of your own task")
    a("--examples-per-step", type=int, help="questions per optimizer step over all processes")
    a("--num-samples", type=int, help="answers sampled per question (the group whose mean is the baseline)")
    a("--max-new-tokens", type=int, help="tokens sampled per answer")
    a("--temperature", type=float, help="sampling temperature")
    a("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    a("--eval-examples", type=int, help="held-out questions for pass@k")
    training.add_options(p)
    return p


def load_task(spec, split):
    """The task named by --task, on `split`."""
    if ":" not in spec:
        from tasks.gsm8k import GSM8K

        if spec != "GSM8K":
            raise stage.StageError(f"--task {spec!r}: use GSM8K or module:Class")
        return GSM8K(split)
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)(split)
    except (ImportError, AttributeError) as e:
        raise stage.StageError(f"--task {spec!r}: {e}") from None


def sampled_mask(token_ids, output_start, output_end):
    """1 for the tokens the model sampled, 0 for forced tool output (<|output_start|> .. <|output_end|>)."""
    mask, forced = [], False
    for t in token_ids:
        forced = forced or t == output_start
        mask.append(0 if forced else 1)
        forced = forced and t != output_end
    return mask


class Rollouts:
    """An iterator of one question's sampled answers at a time, as (inputs, targets, advantages):
    the prompt + each answer, targets -1 outside the sampled tokens. Its state is the number of
    questions it has taken, and each question's samples are seeded by its number, so a resumed
    run samples exactly what an uninterrupted one would."""

    def __init__(self, engine, tokenizer, task, params, num_samples, rank, world_size, device, seed, state=None):
        self.engine, self.tokenizer, self.task, self.params = engine, tokenizer, task, params
        self.num_samples, self.rank, self.world_size, self.device, self.seed = num_samples, rank, world_size, device, seed
        self.taken = state["taken"] if state else 0
        self.rewards = collections.deque(maxlen=64)

    def __iter__(self):
        return self

    def __next__(self):
        import dataclasses

        import torch

        while True:  # the next question whose prompt leaves room to answer
            question = self.taken * self.world_size + self.rank  # its samples use seeds seed + question * k + 0..k-1
            conversation = self.task[question % len(self.task)]
            prompt = self.tokenizer.render_for_completion(conversation)
            self.taken += 1
            if fits(prompt, self.engine):
                break
        params = dataclasses.replace(self.params, seed=self.seed + question * self.num_samples)
        completions = self.engine.generate(prompt, params, n=self.num_samples).completions
        rewards = [self.task.reward(conversation, c.text) for c in completions]
        self.rewards.extend(rewards)
        mean = sum(rewards) / len(rewards)
        special = self.tokenizer.special_ids
        targets = []  # position p predicts token p + 1: the answer's tokens, -1 where not sampled
        for c in completions:
            mask = sampled_mask(c.token_ids, special["<|output_start|>"], special["<|output_end|>"])
            targets.append([-1] * (len(prompt) - 1) + [t if m else -1 for t, m in zip(c.token_ids, mask)])
        ids = pad_right([prompt + c.token_ids for c in completions], self.tokenizer.bos_token_id)[:, :-1]
        advantages = torch.tensor([r - mean for r in rewards])
        return ids.to(self.device), pad_right(targets, -1).to(self.device), advantages.to(self.device)

    def state_dict(self):
        return {"taken": self.taken}

    def mean_reward(self):
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0


def fits(prompt, engine, room=8):
    """Whether a prompt leaves the engine's context room for an answer of at least `room` tokens."""
    return len(prompt) + room <= engine.max_len


def policy_gradient_loss(model, batch):
    """Advantage-weighted negative log-likelihood of the sampled tokens, per sampled token."""
    inputs, targets, advantages = batch
    nll = model(inputs, targets, loss_reduction="none")  # 0 where targets are -1
    sampled = (targets >= 0).sum().clamp(min=1)
    return (nll * advantages[:, None]).sum() / sampled


def pass_at_k(engine, tokenizer, task, n, params, num_samples, rank, world_size, device):
    """Fraction of the first n questions with at least one right answer among num_samples."""
    import dataclasses

    import torch

    counts = torch.zeros(2, dtype=torch.long, device=device)
    for i in range(rank, min(n, len(task)), world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        if not fits(prompt, engine):  # counted as a miss
            counts[1] += 1
            continue
        completions = engine.generate(prompt, dataclasses.replace(params, seed=i * num_samples), n=num_samples).completions
        counts[0] += any(task.reward(conversation, c.text) > 0 for c in completions)
        counts[1] += 1
    sum_over_ranks(counts)
    return counts[0].item() / max(1, counts[1].item())


def main(args):
    from nanochat.engine import Engine, SamplingParams
    from nanochat.optim import setup_optimizers

    started = time.time()
    source = args.checkpoint or stage.upstream_checkpoint(args.run, "chat_sft")
    train_task, eval_task = load_task(args.task, "train"), load_task(args.task, "test")
    run = training.Training(args, STAGE)
    world = run.compute.world_size
    if args.examples_per_step % world:
        raise stage.StageError(f"--examples-per-step {args.examples_per_step} is not a multiple of the {world} processes")
    model, tokenizer, meta = checkpoint.load_model(source, run.device)
    model.train()
    optimizer = setup_optimizers(model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                 matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    state = run.resume(model, optimizer)
    engine = Engine(model, tokenizer, max_rows=max(16, args.num_samples))
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens)
    rollouts = Rollouts(engine, tokenizer, train_task, params, args.num_samples, run.compute.rank, world, run.device,
                        args.seed, state)
    tokens_per_step = args.examples_per_step * args.num_samples * model.config.sequence_len
    plan = training.Plan(args.num_steps, args.examples_per_step // world, tokens_per_step)

    def evaluate(step):
        score = pass_at_k(engine, tokenizer, eval_task, args.eval_examples, params, args.num_samples,
                          run.compute.rank, world, run.device)
        run.metrics.add({"step": step, "pass@k": score, "mean_reward": rollouts.mean_reward()})
        log.info("step %d/%d: pass@%d %.3f on %d held-out questions; mean training reward %.3f", step, plan.num_steps,
                 args.num_samples, score, args.eval_examples, rollouts.mean_reward())
        return score

    log.info("chat_rl from %s on %s: %d steps of %d questions x %d samples", source, args.task, plan.num_steps,
             args.examples_per_step, args.num_samples)
    if run.step == 0 and args.eval_every > 0:
        evaluate(0)
    final = run.run(model, optimizer, rollouts, plan, [(args.eval_every, evaluate)], meta={"tokenizer": meta["tokenizer"]},
                    loss=policy_gradient_loss)
    score = evaluate(run.step)
    metrics = {"pass@k": score, "k": args.num_samples, "mean_reward": rollouts.mean_reward()}
    run.commit({"checkpoint": storage.join(source, checkpoint.MANIFEST)}, final, metrics, started)
    log.info("done: pass@%d %.3f; checkpoint %s", args.num_samples, score, final)
    run.close()


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
