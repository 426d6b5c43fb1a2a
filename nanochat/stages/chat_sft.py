"""Supervised finetuning of the midtrained model (or the base model) on curated conversations.

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_sft -- --run myrun --preset tiny
    python -m nanochat.stages.chat_sft --run myrun --preset cpu --identity my_identity.jsonl

Starts from mid_train's final checkpoint in the same run (or --from-stage's: base_train in a run
that skips mid_train, as upstream's 2026 speedrun does; or --checkpoint), with its optimizer state
too if --warm-start-optimizer. Trains on a fixed, shuffled mixture of SmolTalk, GSM8K (with tool
calls), SpellingBee, the identity conversations (nanochat's, or your own --identity file instead)
and, with --mmlu-weight, MMLU's auxiliary_train, each task weighted in epochs: --identity-weight
passes over the identity conversations, --smoltalk-weight, --gsm8k-weight and --mmlu-weight over
SmolTalk (optionally without its conversations over --smoltalk-max-chars), GSM8K and MMLU, a
fraction being a fixed random share of one pass. --num-steps -1 trains one pass over the mixture,
and --init-lr-frac scales every learning rate, as upstream's 2026 chat_sft (the GPU presets).
Conversations are packed best-fit into full rows (--rows pad: one per row); the loss covers
assistant tokens only.
ChatCORE every --chatcore-every steps, validation, checkpoints, exact resume and outputs as in
mid_train.
"""

from nanochat import stage
from nanochat.stages import _finetune

STAGE = "chat_sft"


def build_parser():
    return _finetune.finetune_parser(STAGE, __doc__)


def mixture(args):
    return _finetune.conversation_mixture(args, seed=43)


def main(args):
    return _finetune.finetune(args, STAGE, mixture(args))


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
