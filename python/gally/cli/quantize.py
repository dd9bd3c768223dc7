"""`gally quantize SRC OUT --to int8|int4|int4-v1`: an int8 or int4 copy of a model (quantize.quantize_folder)."""

from __future__ import annotations

import argparse
import os
import time

from ..quantize import KINDS, bits_per_weight, quantize_folder


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int8 or int4 copy of a model",
                              description="Quantize a model's weight matrices to int8 (groups of 32, float16 "
                                          "scales) or int4 (4.5 bits per weight: groups of 32 with 6-bit scales "
                                          "and mins in super-blocks of 8 groups; int4-v1, 5.0 bits: llama.cpp's Q4_1 "
                                          "layout) into a new model folder that gally loads.")
    p.add_argument("source", metavar="SRC", help="model folder, .gguf file or alias")
    p.add_argument("out_dir", metavar="OUT", help="the folder to create (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=KINDS, help="int8, int4 or int4-v1 (gally-quant version 1's int4)")
    p.set_defaults(func=quantize_command)


def quantize_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    layout = quantize_folder(args.source, args.out_dir, args.to)
    size = os.path.getsize(layout.path)
    weights = sum(m.shape[0] * m.shape[1] for m in layout.matrices.values())
    layers, model = bits_per_weight(layout)
    print(f"{args.out_dir}: {len(layout.matrices)} matrices ({weights / 1e6:.1f} M weights) in {args.to}, "
          f"model.safetensors {size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s; bits per weight: "
          f"layer matrices {layers:.2f}, whole model {model:.2f}")
    return 0
