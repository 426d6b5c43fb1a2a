"""The `nanochat` command: runs pipeline stages, chats and serves.

    nanochat tok_train --run myrun --preset tiny     any stage, with the options of `python -m nanochat.stages.<stage>`
    nanochat tok_train --help                        a stage's options
    nanochat chat --run myrun [-p PROMPT]            chat in the terminal (see `nanochat chat --help`)
    nanochat serve --run myrun [--port 8000]         OpenAI-compatible API + web UI (see `nanochat serve --help`)
    nanochat export --run myrun --to DIR             a Hugging Face transformers model directory (see `export --help`)
    nanochat import SRC --run myrun                  a transformers or upstream nanochat model as a finished stage
    nanochat identity --persona me.json --out OUT    identity conversations for --identity (see `identity --help`)
    nanochat version                                 package version, git commit and source hash
"""

import argparse
import importlib
import json
import pkgutil
import sys

import nanochat.stages
from nanochat.common import code_version


def stage_names():
    return sorted(m.name for m in pkgutil.iter_modules(nanochat.stages.__path__) if not m.name.startswith("_"))


def usage():
    stages = "\n".join(f"  {name}" for name in stage_names())
    return f"{__doc__}\nstages:\n{stages}\n"


def version(argv):
    """`nanochat version`: a parser of its own, though it takes no options, so that --help explains
    and anything else is a usage error instead of being ignored."""
    argparse.ArgumentParser(prog="nanochat version",
                            description="Prints, as JSON, the package version, git commit and source hash").parse_args(argv)
    print(json.dumps(code_version(), indent=2))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "version":
        return version(rest)
    if command == "chat":
        from nanochat.chat import main as chat

        return chat(rest)
    if command == "serve":
        from nanochat.serve import main as serve

        return serve(rest) or 0
    if command == "export":
        from nanochat.export import main as export

        return export(rest)
    if command == "import":  # a keyword in Python: the module is nanochat.importer
        from nanochat.importer import main as import_model

        return import_model(rest)
    if command == "identity":
        from nanochat.identity import main as identity

        return identity(rest)
    if command in stage_names():
        from nanochat import stage

        module = importlib.import_module(f"nanochat.stages.{command}")
        parser = module.build_parser()
        parser.prog = f"nanochat {command}"  # its usage and errors name the command typed
        stage.run_main(module.main, parser, command, rest)
        return 0
    print(f"nanochat: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
