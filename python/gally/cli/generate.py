"""`gally run` and `gally chat`: generation from the terminal, with llama-cli's and mlx_lm's options.

    gally run "What is the capital of France?" --temp 0     # chat template applied; --raw for plain text
    echo "Once upon a time" | gally run --raw -n 64
    gally chat --system "You are terse."                     # /reset, /exit, Ctrl-C stops a reply, Ctrl-D leaves
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..model import DTYPES, KV_DTYPES
from ..options import OPTIONS

CHAT_HELP = "/reset clears the conversation, /exit or Ctrl-D leaves, /help shows this, Ctrl-C stops a reply"
CHAT_COMMANDS = ("/reset", "/exit", "/quit", "/help", "/?")


def add_parsers(subparsers) -> None:
    run = subparsers.add_parser("run", help="generate from a prompt, streaming the text to stdout",
                                description="Generate from PROMPT (or stdin) and stream the text to stdout. The "
                                            "prompt goes through the model's chat template unless --raw.")
    run.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help='the prompt; "-" or absent: read stdin')
    run.add_argument("--raw", action="store_true", help="continue the prompt text as is, without the chat template")
    _add_common(run)
    run.set_defaults(func=run_command)

    chat = subparsers.add_parser("chat", help="talk with the model in the terminal",
                                 description=f"An interactive conversation that keeps its KV cache between turns; "
                                             f"{CHAT_HELP}.")
    _add_common(chat)
    chat.set_defaults(func=chat_command)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model folder, .gguf file or alias (default: smollm2-135m-instruct)")
    for o in OPTIONS:  # the generation options (gally/options.py), one flag each
        if not o.flags:
            continue
        default = "generation_config.json, else " if o.from_generation_config else ""
        shown = o.default if o.default not in (None, ()) else None
        help_text = o.help + (f" (default: {default}{shown})" if shown is not None else "")
        if o.type == "flag":
            p.add_argument(*o.flags, dest=o.name, action="store_const", const=True, default=None, help=o.help)
        elif o.type is None:
            p.add_argument(*o.flags, dest=o.name, action="append", default=None, metavar=o.metavar, help=help_text)
        else:
            p.add_argument(*o.flags, dest=o.name, type=o.type, default=None, metavar=o.metavar, help=help_text)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: physical cores)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="convert the weights at load (int8/int4: quantize them; `gally quantize` stores that)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, dest="max_context", metavar="N",
                   help="context length in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--force-context", action="store_true",
                   help="allow a --ctx-size past the positions the model was trained for (output degrades there)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="the KV cache's element type (default: f32 for f32 weights, else f16)")
    p.add_argument("--verbose", action="store_true", help="print prefill and decode speed to stderr")


def _load(args):
    import gally

    model = gally.load(args.model, dtype=args.dtype, threads=args.threads, max_context=args.max_context,
                       kv_dtype=args.kv_dtype, force_context=args.force_context)
    if args.dtype in ("int8", "int4") and model.copied_bytes:  # a folder, quantized in memory at every load
        print(f"gally: quantized {model.path} to {args.dtype} at load; `gally quantize {model.path} OUT --to "
              f"{args.dtype}` stores it once, and `-m OUT` then loads it at once", file=sys.stderr)
    return model


def _sampling_args(args) -> dict:
    return {o.name: getattr(args, o.name) for o in OPTIONS if o.flags and getattr(args, o.name) is not None}


def _check_chat_template(model) -> None:
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model has no tokenizer.json, so it cannot take a text prompt")
    if model.tokenizer.chat_template is None:
        raise ValueError(f"{model.path}: the model has no chat template; use `gally run --raw` for plain text")


class PrefillProgress:
    """A line on stderr for a long prompt: shown once its prefill has taken PATIENCE_S, cleared at the end."""
    PATIENCE_S = 1.5

    def __init__(self, stream=sys.stderr):
        self.stream, self.start, self.shown = stream, None, False

    def __call__(self, done: int, total: int) -> None:
        import time

        now = time.perf_counter()
        self.start = self.start or now
        if not self.shown and now - self.start < self.PATIENCE_S and done < total:
            return
        if done < total:
            left = (total - done) * (now - self.start) / max(done, 1)
            self.stream.write(f"\rgally: reading the prompt: {done}/{total} tokens, {left:.0f} s left ")
            self.shown = True
        elif self.shown:
            self.stream.write("\r" + " " * 70 + "\r")
        self.stream.flush()


def _progress():
    return PrefillProgress() if sys.stderr.isatty() else None


def _stream_out(chunks, out) -> Optional[object]:
    """Writes each chunk's text as it comes; returns the last chunk (finish reason, usage, timings)."""
    last = None
    for chunk in chunks:
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        last = chunk
    return last


def _report(last, err) -> None:
    u, t = last.usage, last.timings
    print(f"prompt: {u['prompt_tokens']} tokens ({u['cached_tokens']} cached), {t['prefill_tok_s']:.1f} tok/s | "
          f"generated: {u['completion_tokens']} tokens, {t['decode_tok_s']:.1f} tok/s | "
          f"time to first token: {t['ttft_s']:.3f} s | finish: {last.finish_reason}", file=err)


def run_command(args: argparse.Namespace) -> int:
    if args.raw and args.system is not None:
        raise ValueError("--system needs the chat template; drop --raw")
    if args.prompt in (None, "-"):
        if sys.stdin.isatty():
            print("gally: reading the prompt from stdin; end it with Ctrl-D", file=sys.stderr)
        prompt = sys.stdin.read()
    else:
        prompt = args.prompt
    model = _load(args)
    kwargs = _sampling_args(args)
    if args.raw:
        chunks = model.generate(prompt, stream=True, progress=_progress(), **kwargs)
    else:
        _check_chat_template(model)
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        chunks = model.chat(messages + [{"role": "user", "content": prompt}], stream=True, progress=_progress(),
                            **kwargs)
    try:
        last = _stream_out(chunks, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `gally run ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if last is not None and last.context_full:
        print(f"gally: the reply reached the end of the context ({model.max_context} tokens; -c N for more)",
              file=sys.stderr)
    if args.verbose:
        _report(last, sys.stderr)
    return 0


def chat_command(args: argparse.Namespace) -> int:
    from ..generate import resolve_options

    try:
        import readline  # noqa: F401  (gives input() line editing and history)
    except ImportError:
        pass
    model = _load(args)
    _check_chat_template(model)
    kwargs = _sampling_args(args)
    resolve_options(model, **kwargs)  # bad values fail now, not at the first message
    conv = model.start_chat(system=args.system)
    told_dropped = False
    print(f"gally chat: {model.path}\n{CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in a shell
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            conv.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"gally: unknown command {text}; the commands are {', '.join(CHAT_COMMANDS[:4])} ({CHAT_HELP})",
                  file=sys.stderr)
            continue
        dropped = conv.dropped
        try:
            chunks = conv.send(text, stream=True, progress=_progress(), **kwargs)
        except ValueError as e:  # this turn alone is longer than the context
            print(f"gally: error: {e}", file=sys.stderr)
            continue
        if conv.dropped > dropped and not told_dropped:
            print(f"(the conversation outgrew the context of {model.max_context} tokens: its oldest turns are "
                  f"dropped from now on; /reset starts afresh)", file=sys.stderr)
            told_dropped = True
        last = None
        try:
            last = _stream_out(chunks, sys.stdout)
        except KeyboardInterrupt:
            chunks.close()  # the partial reply stays in the conversation
            sys.stdout.write("\n")
            print("(stopped)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if last is not None and last.context_full:
            print(f"(the reply reached the end of the context of {model.max_context} tokens)", file=sys.stderr)
        if _typed_ahead_eof():  # Ctrl-D pressed during the reply
            return 0
        if args.verbose and last is not None:
            _report(last, sys.stderr)


def _typed_ahead_eof() -> bool:
    """Discards what was typed while a reply was printed (it is not the next message), and says
    whether that included Ctrl-D: an end of input, which ends the chat."""
    if not sys.stdin.isatty():
        return False
    import select

    fd = sys.stdin.fileno()
    discarded = False
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 4096)
        if not data:
            return True
        discarded = True
    if discarded:
        print("(text typed during the reply was discarded)", file=sys.stderr)
    return False
