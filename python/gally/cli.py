"""The `gally` command line: `gally info`, and one subcommand per job (convert, run, chat, bench, ...)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


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
    parser = argparse.ArgumentParser(prog="gally", description="CPU inference for Llama-family language models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="show the version, the CPU's instruction sets and the kernels in use")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)
    from .bench.cli import add_parser as add_bench

    add_bench(sub)
    from .gguf_import import add_parser as add_convert

    add_convert(sub)
    from .cli_generate import add_parsers as add_run_and_chat

    add_run_and_chat(sub)
    from .perplexity import add_parser as add_perplexity

    add_perplexity(sub)
    from .quantize import add_parser as add_quantize

    add_quantize(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"gally: error: {e}", file=sys.stderr)
        return 1
