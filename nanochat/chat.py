"""`nanochat chat`: talk to a run's model in the terminal, the answer streaming as it is generated.

    nanochat chat --run myrun                        interactive, multi-turn (newest of rl -> sft -> mid -> base)
    nanochat chat --run myrun --source base -p "The capital of France is"   a base model continues the text
    nanochat chat --run file:///path/to/checkpoints/step_000100 --temperature 0

Interactive commands: `/clear` starts a new conversation, `/quit` (or Ctrl-D) leaves.
"""

import argparse
import math
import sys

from nanochat import pipeline

# The generation defaults of a model whose checkpoint names none of its own (a model we trained). A
# model's generation config (nanochat.checkpoint.generation: these, overlaid with its meta.json's
# `generation`, which `nanochat import` fills from a transformers generation_config.json) is the one
# place its defaults live: `nanochat chat` takes them as its options' defaults, `nanochat serve` for
# the fields a request leaves out (the web UI's included), `nanochat export` writes them to
# generation_config.json. The frequency penalty (OpenAI's) keeps a small model from looping on a
# phrase: greedy replies of the cpu preset's model end by themselves 31 times in 40 without it, 40
# with it (docs/cpu-preset.md).
TEMPERATURE, TOP_K, MAX_TOKENS, FREQUENCY_PENALTY = 0.6, 50, 512, 0.5
GENERATION = {"temperature": TEMPERATURE, "top_k": TOP_K, "max_tokens": MAX_TOKENS, "frequency_penalty": FREQUENCY_PENALTY}
# each field's kind and least value (top_k may also be None: every token)
KINDS = {"temperature": (float, 0), "top_k": (int, 1), "max_tokens": (int, 1), "frequency_penalty": (float, None)}


def generation_config(values, where):
    """GENERATION overlaid with a model's own `values`; an unknown field or a value of the wrong kind
    is a ValueError naming `where` (the file it came from) and the field."""
    for name, value in values.items():
        if name not in KINDS:
            raise ValueError(f"{where}: unknown generation field {name!r} (known: {', '.join(KINDS)})")
        kind, least = KINDS[name]
        if name == "top_k" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
                or not math.isfinite(value) or (least is not None and value < least):
            wanted = ("a finite number" if kind is float else "an integer") + (f" of at least {least}" if least is not None else "")
            raise ValueError(f"{where}: generation field {name} must be {wanted}, not {value!r}")
    return {**GENERATION, **values}


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat chat", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    pipeline.add_model_options(p)
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    # the sampling options default to the model's generation config (GENERATION for a model we trained)
    p.add_argument("--temperature", type=float, help=f"0: greedy (default: the model's, else {GENERATION['temperature']})")
    p.add_argument("--top-k", type=int, help=f"-1: every token (default: the model's, else {GENERATION['top_k']})")
    p.add_argument("--max-tokens", type=int, help=f"(default: the model's, else {GENERATION['max_tokens']})")
    p.add_argument("--frequency-penalty", type=float,
                   help="a token's logit drops by this much per time it already occurs in the reply "
                   f"(default: the model's, else {GENERATION['frequency_penalty']})")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="a token's logit drops by this much if it already occurs in the reply (default: %(default)s)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the best available)")
    return p


def reply(engine, messages, params, out, completing=False):
    """Streams the assistant's answer to `messages` to `out`; returns its text. `completing` (a base
    model, which has learned no chat format): the continuation of the last message's text instead."""
    tokenizer = engine.tokenizer
    if completing:
        prompt = tokenizer.encode(messages[-1]["content"], prepend="<|bos|>")
    else:
        prompt = tokenizer.render_for_completion(messages)
    pieces = []
    for piece in engine.stream(prompt, params):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)


def main(argv=None):
    from nanochat.checkpoint import find_checkpoint
    from nanochat.common import autodetect_device_type
    from nanochat.engine import ContextTooLong, SamplingParams
    from nanochat.inference import LOAD_ERRORS, load_engine

    args = build_parser().parse_args(argv)
    try:
        directory, source = find_checkpoint(args.run, args.source, args.storage)
        engine = load_engine(directory, device=args.device or autodetect_device_type(), max_rows=1)
    except LOAD_ERRORS as e:
        print(f"nanochat chat: {e}", file=sys.stderr)
        return 1
    given = {name: getattr(args, name) for name in GENERATION if getattr(args, name) is not None}
    if given.get("top_k") == -1:  # as the API's top_k
        given["top_k"] = None
    try:
        params = SamplingParams(**{**engine.generation, **given}, seed=args.seed, presence_penalty=args.presence_penalty)
    except ValueError as e:
        print(f"nanochat chat: {e}", file=sys.stderr)
        return 2
    completing = source == "base"
    if args.prompt is not None:
        try:
            reply(engine, [{"role": "user", "content": args.prompt}], params, sys.stdout, completing)
        except ContextTooLong as e:
            print(f"nanochat chat: {e}", file=sys.stderr)
            return 1
        return 0
    if completing:
        print("(a base model: each line you type is continued as text, not answered)", file=sys.stderr)
    messages = []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if text == "/clear":
            messages = []
            continue
        if not text:
            continue
        if completing:  # no conversation: each line on its own
            messages = []
        messages.append({"role": "user", "content": text})
        sys.stdout.write("nanochat> ")
        try:
            messages.append({"role": "assistant", "content": reply(engine, messages, params, sys.stdout, completing)})
        except KeyboardInterrupt:  # stops this answer, keeps the conversation
            print()
            messages.pop()
        except ContextTooLong as e:  # the conversation outgrew the model: say so, and keep the session
            print(f"\n({e}: {'a shorter line' if completing else '/clear starts a new conversation'})", file=sys.stderr)
            messages.pop()
