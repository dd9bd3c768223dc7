"""The `gally` command line: `gally info`, and one subcommand per job (convert, run, chat, bench, ...).

Each subcommand's parser and command live in a module here (convert, explain, generate: run and
chat, cache, perplexity, quantize, serve; bench in gally/bench/cli.py); the library modules they call know
nothing of argparse, the terminal or exit codes.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
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
        print(f"gally: error: {e}", file=sys.stderr)
        return 1
