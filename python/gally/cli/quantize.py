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
                                          "and mins in super-blocks of 8 groups, fitted to the errors that matter "
                                          "most for the activations the model produces; int4-v1, 5.0 bits: "
                                          "llama.cpp's Q4_1 layout) into a new model folder that gally loads.")
    p.add_argument("source", metavar="SRC", help="model folder, .gguf file or alias")
    p.add_argument("out_dir", metavar="OUT", help="the folder to create (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=KINDS, help="int8, int4 or int4-v1 (gally-quant version 1's int4)")
    p.add_argument("--pure", action="store_true", help="every layer matrix in the --to kind (int4 otherwise keeps "
                   "v_proj and some down_proj in int8: see gally/quantize.py)")
    calibration = p.add_mutually_exclusive_group()
    calibration.add_argument("--calibration-text", metavar="FILE", default=None,
                             help="int4: weigh each input column's errors by its activations on this text "
                                  "(default: on sequences the model samples itself)")
    calibration.add_argument("--no-calibration", action="store_true",
                             help="int4: every input column's errors weigh alike")
    p.set_defaults(func=quantize_command)


def quantize_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    calibration, text = (None if args.no_calibration else "self"), None
    if args.calibration_text is not None:
        if args.to != "int4":  # said in the options' words (quantize_folder says it in its own)
            raise ValueError(f"--calibration-text applies to --to int4 only, not {args.to}")
        with open(args.calibration_text, encoding="utf-8") as f:
            text = f.read()
    layout = quantize_folder(args.source, args.out_dir, args.to, args.pure, calibration=calibration,
                             calibration_text=text)
    size = os.path.getsize(layout.path)
    weights = sum(m.shape[0] * m.shape[1] for m in layout.matrices.values())
    bits = bits_per_weight(layout)
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(bits.items()) if k not in ("layers", "model"))
    print(f"{args.out_dir}: {len(layout.matrices)} matrices ({weights / 1e6:.1f} M weights) in {args.to}, "
          f"model.safetensors {size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s; bits per weight: "
          f"layer matrices {bits.get('layers', 0):.2f} ({kinds}), whole model {bits['model']:.2f}")
    return 0
