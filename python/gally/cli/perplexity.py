"""`gally perplexity -f text.txt --ctx 512 [-m MODEL] [--dtype bf16] [--json]`: perplexity.perplexity
on a text file, with a progress bar on a terminal."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..model import DTYPES, KV_DTYPES
from ..perplexity import perplexity


class ProgressBar:
    """A one-line bar on a terminal: [#####-----] 7/14 windows, ppl so far, time left."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width, self.start = stream, width, time.perf_counter()

    def __call__(self, done: int, total: int, ppl: float) -> None:
        filled = self.width * done // total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (total - done)
        self.stream.write(f"\r[{'#' * filled}{'-' * (self.width - filled)}] {done}/{total} windows  "
                          f"ppl {ppl:.4f}  {eta:.0f} s left ")
        if done == total:
            self.stream.write("\r" + " " * (self.width + 60) + "\r")
        self.stream.flush()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("perplexity", help="perplexity of a model on a text file (llama.cpp's protocol)",
                              description="Perplexity on FILE: non-overlapping windows of --ctx tokens (no BOS), "
                                          "each scoring its second half, as llama-perplexity does.")
    p.add_argument("-m", "--model", default=None,
                   help="model folder, .gguf file or alias (default: smollm2-135m-instruct)")
    p.add_argument("-f", "--file", required=True, help='text file (UTF-8); "-" reads stdin')
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="convert the weights at load")
    p.add_argument("--force-context", action="store_true",
                   help="allow a --ctx past the positions the model was trained for")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="the KV cache's element type (default: f32 for f32 weights, else f16)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object: ppl, stderr, tokens_scored, ...")
    p.set_defaults(func=perplexity_command)


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def perplexity_command(args: argparse.Namespace) -> int:
    import gally

    text = _read_text(args.file)
    if isinstance(args.ctx, int) and args.ctx >= 2:
        max_context = args.ctx
    else:
        max_context = None  # perplexity() names the bad --ctx
    model = gally.load(args.model, dtype=args.dtype, threads=args.threads, max_context=max_context,
                       kv_dtype=args.kv_dtype, force_context=args.force_context)
    bar = ProgressBar() if sys.stderr.isatty() and not args.json else None
    start = time.perf_counter()
    result = perplexity(model, text, ctx=args.ctx, progress=bar)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**result, "model": model.path, "dtype": model.dtype, "seconds": round(seconds, 3)}))
    else:
        print(f"perplexity {result['ppl']:.4f} ± {result['stderr']:.4f}  ({result['tokens_scored']} tokens scored "
              f"in {result['windows']} windows of {result['ctx']}, {model.dtype}, {seconds:.1f} s)")
    return 0
