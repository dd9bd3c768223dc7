"""`gally serve`: the OpenAI-compatible server (gally/serve/) from the command line.

    gally serve -m MODEL [--host 127.0.0.1] [--port 8000] [--parallel N] [--max-queue Q] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import os
import sys

from ..model import DTYPES, KV_DTYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
                                          "/v1/models, /health, /metrics, /tokenize, /detokenize) whose requests are "
                                          "decoded together (continuous batching). Binds to loopback unless --host "
                                          "says otherwise. Needs: pip install 'gally[serve]'.")
    p.add_argument("-m", "--model", default=None,
                   help="model folder, .gguf file or alias (default: smollm2-135m-instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--parallel", "-np", type=int, default=4, metavar="N",
                   help="requests decoded together; more wait in the queue (default 4)")
    p.add_argument("--max-queue", type=int, default=64, metavar="Q",
                   help="requests allowed to wait; past it the answer is 503 with Retry-After (default 64)")
    p.add_argument("--api-key", default=os.environ.get("GALLY_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (env GALLY_API_KEY)")
    p.add_argument("--alias", default=None, help="the model's name in the API (default: the model folder's name)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="convert or quantize the weights at load")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: physical cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, dest="max_context", metavar="N",
                   help="most tokens a request may hold (default: the model's)")
    p.add_argument("--force-context", action="store_true",
                   help="allow a --ctx-size past the positions the model was trained for (output degrades there)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="the KV cache's element type (default: f32 for f32 weights, else f16)")
    p.add_argument("--kv-cache-mib", type=int, default=None, metavar="MIB",
                   help="KV cache of all requests together (default: a quarter of the memory)")
    p.add_argument("--batch-tokens", type=int, default=512, metavar="N",
                   help="tokens per forward pass: decode steps plus prompt chunks (default 512)")
    p.add_argument("--prefix-cache", type=int, default=None, metavar="N",
                   help="finished requests kept for prompts that start the same way (default: 2 × --parallel)")
    p.add_argument("--max-body-mib", type=int, default=8, metavar="MIB", help="largest request body (default 8)")
    p.set_defaults(func=serve_command)


def model_name(source, folder: str) -> str:
    if source and not os.path.exists(source):
        return source  # an alias or hub id
    return os.path.basename(os.path.normpath(source or folder))


def serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise RuntimeError(f"gally serve needs the serve extra ({e.name} is missing): pip install 'gally[serve]'") \
            from None
    import gally

    from .. import sources

    for name in ("port", "parallel", "batch_tokens", "max_body_mib"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    folder = sources.resolve(args.model, args.dtype)  # a GGUF source is converted (once) before the server starts
    name = args.alias or model_name(args.model, folder)
    kv = None if args.kv_cache_mib is None else args.kv_cache_mib << 20

    def load():
        model = gally.load(args.model, dtype=args.dtype, threads=args.threads, max_context=args.max_context,
                           kv_cache_bytes=kv, kv_dtype=args.kv_dtype, force_context=args.force_context)
        engine = gally.Engine(model, max_sequences=args.parallel,
                              max_batch_tokens=max(args.batch_tokens, args.parallel), max_queue=args.max_queue,
                              prefix_cache=2 * args.parallel if args.prefix_cache is None else args.prefix_cache)
        print(f"gally serve: {name} ready on http://{args.host}:{args.port}/v1 ({args.parallel} parallel, "
              f"{model.threads} threads, {model.dtype})", file=sys.stderr, flush=True)
        return model, engine

    failed = []
    server = None

    def load_failed(message: str) -> None:
        failed.append(message)
        print(f"gally: error: loading {args.model or 'the default model'} failed: {message}", file=sys.stderr,
              flush=True)
        server.should_exit = True

    app = create_app(load, name, api_key=args.api_key, max_body_bytes=args.max_body_mib << 20,
                     on_load_error=load_failed)
    print(f"gally serve: loading {name} (GET /health answers 503 until it is ready)", file=sys.stderr, flush=True)
    # SIGTERM or Ctrl-C: uvicorn stops accepting, lets the running requests finish (up to 60 s), then
    # the app's shutdown closes the engine
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=60))
    server.run()
    return 1 if failed else 0
