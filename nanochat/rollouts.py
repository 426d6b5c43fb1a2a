"""chat_rl's sampling side: rollouts (one question's sampled answers as a training batch), the
policy-gradient loss over them, and pass@k. The engine samples under the autocast training uses,
so the policy that samples is the policy that is trained. Tasks come in as objects."""

import collections
import dataclasses

import torch

from nanochat.common import pad_right, sum_over_ranks


def sampled_mask(token_ids, output_start, output_end):
    """1 for the tokens the model sampled, 0 for forced tool output (<|output_start|> .. <|output_end|>)."""
    mask, forced = [], False
    for t in token_ids:
        forced = forced or t == output_start
        mask.append(0 if forced else 1)
        forced = forced and t != output_end
    return mask


def fits(prompt, engine, room=8):
    """Whether a prompt leaves the engine's context room for an answer of at least `room` tokens."""
    return len(prompt) + room <= engine.max_len


class Rollouts:
    """An iterator of one question's sampled answers at a time, as (inputs, targets, advantages):
    the prompt + each answer, targets -1 outside the sampled tokens. Its state is the number of
    questions it has taken, and each question's samples are seeded by its number, so a resumed
    run samples exactly what an uninterrupted one would."""

    def __init__(self, engine, tokenizer, task, params, num_samples, rank, world_size, device, seed, autocast,
                 state=None):
        self.engine, self.tokenizer, self.task, self.params = engine, tokenizer, task, params
        self.num_samples, self.rank, self.world_size, self.device, self.seed = num_samples, rank, world_size, device, seed
        self.autocast = autocast
        self.taken = state["taken"] if state else 0
        self.rewards = collections.deque(maxlen=64)

    def __iter__(self):
        return self

    def __next__(self):
        if self.device.type == "cuda":  # the training work queued before finishes first: the time
            torch.cuda.synchronize(self.device)  # the loop measures in next() is the sampling's own
        while True:  # the next question whose prompt leaves room to answer
            question = self.taken * self.world_size + self.rank  # its samples use seeds seed + question * k + 0..k-1
            conversation = self.task[question % len(self.task)]
            prompt = self.tokenizer.render_for_completion(conversation)
            self.taken += 1
            if fits(prompt, self.engine):
                break
        params = dataclasses.replace(self.params, seed=self.seed + question * self.num_samples)
        with self.autocast():
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


def policy_gradient_loss(model, batch):
    """Advantage-weighted negative log-likelihood of the sampled tokens, per sampled token."""
    inputs, targets, advantages = batch
    nll = model(inputs, targets, loss_reduction="none")  # 0 where targets are -1
    sampled = (targets >= 0).sum().clamp(min=1)
    return (nll * advantages[:, None]).sum() / sampled


def pass_at_k(engine, tokenizer, task, n, params, num_samples, rank, world_size, device, autocast):
    """Fraction of the first n questions with at least one right answer among num_samples."""
    counts = torch.zeros(2, dtype=torch.long, device=device)
    for i in range(rank, min(n, len(task)), world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        if not fits(prompt, engine):  # counted as a miss
            counts[1] += 1
            continue
        with autocast():
            completions = engine.generate(prompt, dataclasses.replace(params, seed=i * num_samples), n=num_samples).completions
        counts[0] += any(task.reward(conversation, c.text) > 0 for c in completions)
        counts[1] += 1
    sum_over_ranks(counts)
    return counts[0].item() / max(1, counts[1].item())
