"""Reinforcement learning on GSM8K: GRPO-style policy gradient from the rewards of sampled answers.

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_rl -- --run myrun --preset tiny
    python -m nanochat.stages.chat_rl --run myrun --preset cpu --num-samples 8

Starts from chat_sft's final checkpoint in the same run (or --from-stage's, or --checkpoint). Each
step, every process takes its share of --examples-per-step training questions (rank r: r, r+W, ...),
samples --num-samples answers to each with the engine (tool use on, under the training's autocast),
and rewards each 1 if its final answer is right. The advantage of an answer is its reward minus the
mean reward of its question's answers; the loss is the advantage-weighted negative log-likelihood of
the sampled tokens (tool outputs, which the model did not choose, are left out), averaged over those
tokens. pass@k on a held-out slice of the test split is logged every --eval-every steps.
Checkpoints, exact resume and outputs as in the other training stages; in metrics.jsonl and
stage.json, `batch_time_s` is the time spent sampling, `train_time_s` the time spent training on the
samples, and `tokens` the sampled tokens trained on (tok_per_s and mfu are over training time).

--task names the task: GSM8K (default), or `module:Class` for your own (a Task whose constructor
takes the split, 'train' or 'test', and whose `reward(conversation, completion)` is in [0, 1]).
"""

import time

from nanochat import pipeline, stage, storage, training_options
from nanochat.common import log
from nanochat.training_options import COUNT, RATE
from tasks import catalog
from tasks.gsm8k import GSM8K

STAGE = "chat_rl"


def build_parser():
    p = stage.parser(STAGE, __doc__)
    a = p.add_argument
    a("--from-stage", default=pipeline.STAGES[STAGE].trains_on, choices=pipeline.models_before(STAGE),
      help="start from this stage's final checkpoint in the run")
    a("--checkpoint", default=None, help="checkpoint directory URI to start from (default: --from-stage's final one)")
    a("--task", default="GSM8K", help="GSM8K, or module:Class of your own task")
    a("--examples-per-step", type=COUNT, help="questions per optimizer step over all processes")
    a("--num-samples", type=COUNT, help="answers sampled per question (the group whose mean is the baseline)")
    a("--max-new-tokens", type=COUNT, help="tokens sampled per answer")
    a("--temperature", type=RATE, help="sampling temperature")
    a("--top-k", type=COUNT, default=None, help="sample among the k most likely tokens")
    a("--eval-examples", type=COUNT, help="held-out questions for pass@k")
    training_options.add_options(p)
    return p


def load_task(spec, split):
    """The task --task names, on `split`."""
    try:
        return catalog.task(spec, split, {"GSM8K": GSM8K})
    except catalog.UnknownTask as e:
        raise stage.StageError(f"--task {e}") from None


def main(args):
    from nanochat import checkpoint, training
    from nanochat.engine import Engine, SamplingParams
    from nanochat.rollouts import Rollouts, pass_at_k, policy_gradient_loss

    started = time.time()
    source = args.checkpoint or stage.upstream_checkpoint(args.run, args.from_stage)
    train_task, eval_task = load_task(args.task, "train"), load_task(args.task, "test")
    trainer = training.Training(args, STAGE)
    rank, world = trainer.compute.rank, trainer.compute.world_size
    if args.examples_per_step % world:
        raise stage.StageError(f"--examples-per-step {args.examples_per_step} is not a multiple of the {world} processes")
    model, tokenizer, meta = checkpoint.load_model(source, trainer.device)
    model.train()
    optimizer = trainer.optimizer(model)
    state = trainer.resume(model, optimizer)
    engine = Engine(model, tokenizer, max_rows=max(16, args.num_samples))
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens)
    rollouts = Rollouts(engine, tokenizer, train_task, params, args.num_samples, rank, world, trainer.device,
                        args.seed, trainer.autocast, state)
    plan = training_options.Plan(args.num_steps, args.examples_per_step // world)  # a pass per question

    def evaluate(step):
        score = pass_at_k(engine, tokenizer, eval_task, args.eval_examples, params, args.num_samples, rank, world,
                          trainer.device, trainer.autocast)
        trainer.metrics.add({"step": step, "pass@k": score, "mean_reward": rollouts.mean_reward()})
        log.info("step %d/%d: pass@%d %.3f on %d held-out questions; mean training reward %.3f", step, plan.num_steps,
                 args.num_samples, score, args.eval_examples, rollouts.mean_reward())
        return score

    log.info("chat_rl from %s on %s: %d steps of %d questions x %d samples", source, args.task, plan.num_steps,
             args.examples_per_step, args.num_samples)
    if trainer.step == 0 and args.eval_every > 0:
        evaluate(0)
    final = trainer.train(model, optimizer, rollouts, plan, [(args.eval_every, evaluate)],
                          meta=checkpoint.tokenizer_meta(meta["tokenizer"]), loss=policy_gradient_loss)
    score = evaluate(trainer.step)
    metrics = {"pass@k": score, "k": args.num_samples, "mean_reward": rollouts.mean_reward()}
    metrics = trainer.commit({"checkpoint": storage.join(source, checkpoint.MANIFEST)}, final, metrics, started)
    log.info("done: pass@%d %.3f; checkpoint %s; %.0f s sampling, %.0f s training", args.num_samples, score, final,
             metrics["batch_time_s"], metrics["train_time_s"])
    trainer.close()
    return metrics


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
