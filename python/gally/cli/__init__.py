"""The `gally` command line: `gally info`, and one subcommand per job (convert, run, chat, bench, ...).

Each subcommand's parser and command live in a module here (convert, explain, generate: run and
chat, cache, perplexity, quantize, serve; bench in gally/bench/cli.py); the library modules they call know
nothing of argparse, the terminal or exit codes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Optional, Sequence

from ..bench.cli import add_parser as add_bench
from .cache import add_parser as add_cache
from .convert import add_parser as add_convert
from .explain import add_parser as add_explain
from .generate import add_parsers as add_run_and_chat
from .perplexity import add_parser as add_perplexity
from .quantize import add_parser as add_quantize
from .serve import add_parser as add_serve


def _info(args: argparse.Namespace) -> int:
    import gally

    info = gally.info()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>10}: {', '.join(value) if isinstance(value, list) else value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="gally", description="CPU inference for Llama-family language models")
    parser.add_argument("--version", action="version", version=f"gally {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="show the version, the CPU's instruction sets and the kernels in use")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)
    add_bench(sub)
    add_cache(sub)
    add_convert(sub)
    add_explain(sub)
    add_run_and_chat(sub)
    add_perplexity(sub)
    add_quantize(sub)
    add_serve(sub)
    return parser


def typed_flags(message: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> str:
    """An error about an argument by its Python name (`max_context must be ...`, `loading X failed:
    ValueError: threads must be ...`) names the flag the user typed for it instead (`-c must be`,
    `--threads must be`); a value the user did not type (a default, generation_config.json's) keeps
    its name."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        typed = [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in action.option_strings
                 or (len(a) > 2 and a[:2] in action.option_strings and not a.startswith("--"))]  # -t4
        if not typed:
            continue
        flag = typed[-1][:2] if typed[-1] not in action.option_strings else typed[-1]
        pattern = re.compile(rf"(^|: ){re.escape(action.dest)} (?!\()")  # not "threads (-t) must be"
        if pattern.search(message):
            message = pattern.sub(rf"\g<1>{flag} ", message, count=1)
            break
    return message.replace("force_context=True (--force-context)", "--force-context")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the shell's prompt on a line of its own, not after "^C"
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"gally: error: {typed_flags(str(e), subcommands(parser)[args.command], argv)}", file=sys.stderr)
        return 1


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
