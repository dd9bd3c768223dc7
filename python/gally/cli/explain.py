"""`gally explain TEXT`: the steps of "How LLMs Work" on a prompt, as a summary in the terminal and
one self-contained HTML page (gally.explain)."""

from __future__ import annotations

import argparse
import os
import sys

from ..model import DTYPES

DEFAULT_OUTPUT = "gally-explain.html"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="show each step of an LLM on a prompt: tokens, embeddings, attention, ... as an HTML page",
        description="Run TEXT through the model once, recording every step of \"How LLMs Work\" (tokenization, "
                    "embedding, position, attention, feed-forward, layers, prediction, cost), print a summary and "
                    "write one self-contained HTML page that works offline.")
    p.add_argument("prompt", metavar="TEXT", help='the prompt, as plain text (no chat template); "-": read stdin')
    p.add_argument("-m", "--model", default=None,
                   help="model folder, .gguf file or alias (default: smollm2-135m-instruct)")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="FILE.html",
                   help=f"where to write the page (default: {DEFAULT_OUTPUT})")
    p.add_argument("--steps", type=int, default=4, metavar="N",
                   help="tokens to generate after the prompt (greedy), each shown with its candidates (default 4)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="convert the weights at load (int8/int4: quantize them)")
    p.add_argument("--follow", type=int, default=None, metavar="POSITION",
                   help='the token whose attention is followed (default: "smart" if the prompt has it, else the last)')
    p.add_argument("--compare", default=None, metavar="DTYPES",
                   help="dtypes to load the model again at and time for the cost section, comma-separated, or "
                        "'none' (default: bf16,int8,int4 for models of at most 1B parameters)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: physical cores)")
    p.set_defaults(func=explain_command)


def explain_command(args: argparse.Namespace) -> int:
    import gally

    from ..explain import page

    try:
        page.plotly_js()  # before the work: the page cannot be drawn without it
    except ImportError as e:
        print(f"gally: error: {e}", file=sys.stderr)
        return 1
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    compare = None
    if args.compare is not None:
        compare = [] if args.compare.strip() == "none" else [d.strip() for d in args.compare.split(",") if d.strip()]
    model = gally.load(args.model, dtype=args.dtype, threads=args.threads)
    explanation = model.explain(text, steps=args.steps, follow=args.follow, compare=compare)
    path = explanation.to_html(args.output)
    print(explanation.summary())
    print(f"page: {os.path.abspath(path)} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0
