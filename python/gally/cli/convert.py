"""`gally convert MODEL.gguf OUT_DIR [--dtype f32|bf16|f16|int8|int4]`: a GGUF file as a Hugging Face
folder (gguf_import.convert)."""

from __future__ import annotations

import argparse
import os

from ..gguf_import import DTYPES, QUANTIZED, convert
from ..quantize import quantize_folder
from ..sources import gguf_file


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a GGUF file into a Hugging Face folder gally loads",
                              description="Dequantize a GGUF model (llama, qwen2) into a Hugging Face folder: "
                                          "config.json, model.safetensors, tokenizer.json, tokenizer_config.json.")
    p.add_argument("gguf", metavar="MODEL.gguf", help="the GGUF file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to create (must not exist or be empty)")
    p.add_argument("--dtype", choices=tuple(DTYPES) + QUANTIZED, default="f32",
                   help="dtype of the weight matrices (default f32; norms and biases stay f32; int8/int4: as "
                        "`gally quantize` writes them)")
    p.add_argument("--no-calibration", action="store_true",
                   help="int4: every input column's errors weigh alike (default: calibrated as gally quantize does, "
                        "on the file's int8 conversion, which stays in the cache)")
    p.set_defaults(func=convert_command)


def convert_command(args: argparse.Namespace) -> int:
    if args.dtype == "int4" and os.path.isfile(args.gguf) and gguf_file(args.gguf):  # calibrated, as gally quantize
        quantize_folder(args.gguf, args.out_dir, args.dtype, calibration=None if args.no_calibration else "self")
        print(args.out_dir)
    else:
        print(convert(args.gguf, args.out_dir, args.dtype))
    return 0
