"""`gally bench`: llama-bench's options (-m -p -n -t -d -r, comma lists or repeated flags) plus
--dtype, --kv-dtype and --peers."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..model import KV_DTYPES


def _ints(text: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ggufs(text: str) -> dict:
    out = {}
    for item in _names(text):
        dtype, sep, path = item.partition("=")
        if not sep or not path:
            raise argparse.ArgumentTypeError(f"expected DTYPE=PATH, got {item!r}")
        out[dtype] = path
    return out


def _flat(values, default):
    if not values:
        return default
    return [v for chunk in values for v in (chunk if isinstance(chunk, list) else [chunk])]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure prefill and decode speed, optionally beside llama.cpp, "
                                            "transformers and CTranslate2",
                              description="Prefill/decode tokens/s, time to first token, load time, peak RSS and "
                                          "decode GB/s, as mean ± std over repetitions; peers measured in the same "
                                          "run.")
    p.add_argument("-m", "--model", default=None, help="model folder, .gguf or alias (default: the default model)")
    p.add_argument("--shape", default=None, help="random weights in a real model's shapes instead of -m: "
                                                 "smollm2-135m, llama-3.2-1b, llama-3.2-3b or llama-3.1-8b (written "
                                                 "once into GALLY_HOME/bench; 8B bf16 takes 16 GB of disk)")
    p.add_argument("--sequential", action="store_true",
                   help="run the engines one after another instead of side by side (models near the RAM's size)")
    p.add_argument("--dtype", action="append", type=_names, help="weight types, comma-separated (default: f32,bf16)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="KV cache type of gally and of the llama.cpp peers alike (int8: llama.cpp's q8_0; flash "
                        "attention on); default: each engine's own (gally: f32 for f32 weights, else f16; llama.cpp: "
                        "f16). transformers and CTranslate2 keep theirs")
    p.add_argument("-p", "--n-prompt", action="append", type=_ints, help="prompt lengths (default: 512; 0: none)")
    p.add_argument("-n", "--n-gen", action="append", type=_ints, help="generated tokens (default: 128; 0: none)")
    p.add_argument("-t", "--threads", action="append", type=_ints, help="thread counts (default: physical cores)")
    p.add_argument("-d", "--n-depth", action="append", type=_ints, help="tokens already in the context (default: 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions after one warm-up (default: 5)")
    p.add_argument("--peers", action="append", type=_names,
                   help="llama.cpp, transformers, llama-bench and/or ctranslate2")
    p.add_argument("--llama-cpp", default=os.environ.get("GALLY_LLAMA_CPP"),
                   help="llama.cpp sources, to make the peer GGUFs (env GALLY_LLAMA_CPP)")
    p.add_argument("--llama-cpp-bin", default=os.environ.get("GALLY_LLAMA_CPP_BIN"),
                   help="folder with llama-quantize and llama-bench (env GALLY_LLAMA_CPP_BIN)")
    p.add_argument("--llama-cpp-lib", default=os.environ.get("GALLY_LLAMA_CPP_LIB"),
                   help="folder with the libllama the llama.cpp peer loads instead of llama-cpp-python's own, e.g. a "
                        "build for AVX2 only (env GALLY_LLAMA_CPP_LIB); the result names the library and its ISA")
    p.add_argument("--gguf", action="append", type=_ggufs, help="use this peer GGUF for a dtype: DTYPE=PATH,...")
    p.add_argument("--no-generate", action="store_true", help="skip the end-to-end Model.generate row")
    p.add_argument("--serve", action="append", metavar="URL",
                   help="load-test running OpenAI-compatible servers (gally serve, llama-server; repeatable): "
                        "concurrent streaming clients, -p prompt tokens and -n new tokens each")
    p.add_argument("-c", "--concurrency", action="append", type=_ints, help="with --serve: clients at once (default 8)")
    p.add_argument("--requests", type=int, default=None, help="with --serve: requests per run (default 4 × clients)")
    p.add_argument("--vocab", type=int, default=49152, help="with --serve: prompt ids are drawn below this (default "
                                                             "49152, SmolLM2's vocabulary)")
    p.add_argument("--batch", action="append", type=_ints,
                   help="batch sizes, e.g. 1,2,4,8,16: sequences decoded together (each -p prompt tokens, then -n "
                        "new ones), against llama-batched-bench with --peers llama.cpp")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer of the read-bandwidth probe (default: 1024)")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--out", help="also write the result here: markdown, or JSON when the name ends in .json")
    p.add_argument("--title", default="gally bench", help="the markdown's heading")
    p.add_argument("--plot", metavar="FILE", help="also draw the results: FILE.svg, .png or .pdf (matplotlib, the "
                                                  "bench extra); with --out a plot NAME.svg goes beside NAME.md too")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=main)
    return p


def options(args):
    from .run import Options

    ggufs = {}
    for d in args.gguf or []:
        ggufs.update(d)
    return Options(model=args.model, dtypes=_flat(args.dtype, ["f32", "bf16"]), prompts=_flat(args.n_prompt, [512]),
                   gens=_flat(args.n_gen, [128]), threads=_flat(args.threads, None), depths=_flat(args.n_depth, [0]),
                   reps=args.repetitions, peers=_flat(args.peers, []), llama_cpp=args.llama_cpp,
                   llama_cpp_bin=args.llama_cpp_bin, llama_cpp_lib=args.llama_cpp_lib, ggufs=ggufs,
                   generate=not args.no_generate, seed=args.seed, bandwidth_bytes=args.bandwidth_mib << 20,
                   shape=args.shape, sequential=args.sequential, kv_dtype=args.kv_dtype)


def command_of(opts) -> str:
    """The command line that repeats this run, every list spelled out."""
    def csv(values):
        return ",".join(map(str, values))

    words = ["gally", "bench"] + (["-m", opts.model] if opts.model else [])
    words += ["--shape", opts.shape] if opts.shape else []
    words += ["--sequential"] if opts.sequential else []
    words += ["--dtype", csv(opts.dtypes), "-p", csv(opts.prompts), "-n", csv(opts.gens)]
    words += ["--kv-dtype", opts.kv_dtype] if opts.kv_dtype else []
    words += (["-t", csv(opts.threads)] if opts.threads else []) + ["-d", csv(opts.depths), "-r", str(opts.reps)]
    words += ["--peers", csv(opts.peers)] if opts.peers else []
    words += ["--llama-cpp", opts.llama_cpp] if opts.llama_cpp and opts.peers else []
    words += ["--llama-cpp-bin", opts.llama_cpp_bin] if opts.llama_cpp_bin and opts.peers else []
    words += ["--llama-cpp-lib", opts.llama_cpp_lib] if opts.llama_cpp_lib and opts.peers else []
    words += ["--gguf", csv(f"{d}={p}" for d, p in opts.ggufs.items())] if opts.ggufs else []
    words += ["--no-generate"] if not opts.generate else []
    words += ["--seed", str(opts.seed)] if opts.seed else []
    return shlex.join(words)


def main(args) -> int:
    from . import report
    from .run import run

    opts = options(args)
    command = command_of(opts)
    log = (lambda s: None) if args.quiet else (lambda s: print(f"bench: {s}", file=sys.stderr, flush=True))
    if args.serve:
        if args.kv_dtype:
            raise ValueError("--kv-dtype sets the KV cache of the engines the bench loads, not of running servers: "
                             "start them with it (gally serve --kv-dtype, llama-server -ctk/-ctv)")
        return _serve_main(args, log)
    if args.batch:
        from . import batched

        batches = _flat(args.batch, [])
        if not args.n_prompt:
            opts.prompts = [128]
        command += " --batch " + ",".join(map(str, batches))
        res = batched.run_batched(opts, batches, command=command, log=log)
        md = batched.markdown(res, title=args.title if args.title != "gally bench" else "gally bench --batch")
        text = batched.dumps(res) if args.json else md
        dumps, draw = batched.dumps, "plot_batched"
    else:
        res = run(opts, command=command, log=log)
        md = report.markdown(res, title=args.title)
        text = report.dumps(res) if args.json else md
        dumps, draw = report.dumps, "plot_results"
    print(text, end="" if text.endswith("\n") else "\n")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(dumps(res) + "\n" if args.out.endswith(".json") else md)
    from . import plot

    _plots(args, lambda path: getattr(plot, draw)(res, path))
    return 0


def _plots(args, draw) -> None:
    """--plot FILE, and a plot beside an --out file (when matplotlib is there: the bench extra)."""
    from . import plot

    if args.plot:
        print(f"bench: plot written to {draw(args.plot)}", file=sys.stderr)
    if args.out:
        try:
            draw(plot.beside(args.out))
        except RuntimeError as e:  # no matplotlib: the result file stands alone
            print(f"bench: no plot beside {args.out}: {e}", file=sys.stderr)


def _serve_main(args, log) -> int:
    """--serve: the load tool (load.py) against each URL, interleaved URL by URL for each concurrency."""
    from . import load

    prompt = _flat(args.n_prompt, [128])[0]
    gen = _flat(args.n_gen, [128])[0]
    rows = []
    for c in _flat(args.concurrency, [8]):
        for rep in range(args.repetitions):
            urls = args.serve if rep % 2 == 0 else list(reversed(args.serve))
            for url in urls:
                # fresh prompts each repetition (the same for every server): a server's prompt cache
                # (llama-server's slots) must not answer a repetition from the one before
                rows.append(load.run_load(url, c, args.requests or 4 * c, prompt, gen, args.vocab, args.seed + rep,
                                          log=log))
    text = load.dumps(rows) if args.json else load.markdown(rows)
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(load.dumps(rows) + "\n" if args.out.endswith(".json") else load.markdown(rows))
    from .plot import plot_load

    _plots(args, lambda path: plot_load(rows, path))
    return 0
