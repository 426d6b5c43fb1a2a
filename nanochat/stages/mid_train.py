"""Midtrain the base model on conversations: the chat format, tool use, multiple choice, spelling.

    torchrun --nproc_per_node 2 -m nanochat.stages.mid_train -- --run myrun --preset tiny
    python -m nanochat.stages.mid_train --run myrun --preset cpu --identity my_identity.jsonl

Starts from base_train's final checkpoint in the same run (or --checkpoint), with its optimizer
state too if --warm-start-optimizer. Trains on a fixed, shuffled mixture of SmolTalk, MMLU (dev +
validation, as multiple choice), GSM8K (calculator steps as python tool calls), SpellingBee and the
identity conversations (nanochat's, or your own --identity file instead), weighted in epochs and
limited by the same options as in chat_sft, packed best-fit into rows (--rows pad: one per row);
the loss covers assistant tokens only. Validation: bits per byte of assistant text on SmolTalk's
test split; with --chatcore-every N, ChatCORE on the first problems of chat_eval's tasks every N
steps, in metrics.jsonl. Checkpoints, exact resume and metrics.jsonl as in base_train; stage.json's
`checkpoint` output is the final checkpoint.
"""

from nanochat import stage
from nanochat.stages import _finetune
from tasks.mmlu import MMLU

STAGE = "mid_train"


def build_parser():
    return _finetune.finetune_parser(STAGE, __doc__)


def mixture(args):
    return _finetune.conversation_mixture(args, seed=42, extra=[MMLU(split="dev"), MMLU(split="validation")])


def main(args):
    return _finetune.finetune(args, STAGE, mixture(args))


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
