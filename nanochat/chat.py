"""`nanochat chat`: talk to a run's model in the terminal, the answer streaming as it is generated.

    nanochat chat --run myrun                        interactive, multi-turn (newest of rl -> sft -> mid -> base)
    nanochat chat --run myrun --source base -p "The capital of France is"
    nanochat chat --run file:///path/to/checkpoints/step_000100 --temperature 0

Interactive commands: `/clear` starts a new conversation, `/quit` (or Ctrl-D) leaves.
"""

import argparse
import sys

from nanochat import pipeline

# A model's generation defaults (its generation config), the one place they live: `nanochat chat`
# takes them as its options' defaults, `nanochat serve` for the fields a request leaves out (the web
# UI's included), `nanochat export` writes them to generation_config.json. The frequency penalty
# (OpenAI's) keeps a small model from looping on a phrase: greedy replies of the cpu preset's model
# end by themselves 31 times in 40 without it, 40 with it (docs/cpu-preset.md).
TEMPERATURE, TOP_K, MAX_TOKENS, FREQUENCY_PENALTY = 0.6, 50, 512, 0.5
GENERATION = {"temperature": TEMPERATURE, "top_k": TOP_K, "max_tokens": MAX_TOKENS, "frequency_penalty": FREQUENCY_PENALTY}


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat chat", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run", required=True, help="run name or URI, or a checkpoint URI")
    p.add_argument("--source", choices=list(pipeline.SOURCES), help="which stage's model (default: the newest done)")
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="0: greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="(default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="(default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=FREQUENCY_PENALTY,
                   help="a token's logit drops by this much per time it already occurs in the reply (default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="a token's logit drops by this much if it already occurs in the reply (default: %(default)s)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the best available)")
    return p


def reply(engine, messages, params, out):
    """Streams the assistant's answer to `messages` to `out`; returns its text."""
    prompt = engine.tokenizer.render_for_completion(messages)
    pieces = []
    for piece in engine.stream(prompt, params):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)


def main(argv=None):
    from nanochat.common import autodetect_device_type
    from nanochat.engine import SamplingParams
    from nanochat.inference import load_engine

    args = build_parser().parse_args(argv)
    try:
        engine = load_engine(args.run, args.source, args.device or autodetect_device_type(), max_rows=1)
    except FileNotFoundError as e:
        print(f"nanochat chat: {e}", file=sys.stderr)
        return 1
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed,
                            frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
    if args.prompt is not None:
        reply(engine, [{"role": "user", "content": args.prompt}], params, sys.stdout)
        return 0
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
        messages.append({"role": "user", "content": text})
        sys.stdout.write("nanochat> ")
        try:
            messages.append({"role": "assistant", "content": reply(engine, messages, params, sys.stdout)})
        except KeyboardInterrupt:  # stops this answer, keeps the conversation
            print()
            messages.pop()
