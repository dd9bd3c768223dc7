"""Writes a Hugging Face folder with random weights in a real model's shapes (gally.bench.random_model):
for timing where the real weights cannot be fetched or would not fit. Not for quality.

    python bench/random_checkpoint.py OUT_FOLDER [f32|bf16]
        [--shape smollm2-135m|llama-3.2-1b|llama-3.2-3b|llama-3.1-8b]

`gally bench --shape NAME` makes (once, in GALLY_HOME/bench/) and uses such a folder itself.
"""

from __future__ import annotations

import argparse

from gally.bench.random_model import SHAPES, write

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("dtype", nargs="?", default="f32", choices=("f32", "bf16"))
    p.add_argument("--shape", default="smollm2-135m", choices=tuple(SHAPES))
    a = p.parse_args()
    write(a.out, a.shape, a.dtype)
