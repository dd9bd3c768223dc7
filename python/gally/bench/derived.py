"""Models the benchmark derives from the model folder, made once and cached: the llama.cpp peers'
GGUFs (peer_gguf), CTranslate2's conversion (peer_ct2), and gally's own int8/int4 folder, written
by `gally quantize` so that gally loads it zero-copy, as a user who quantized once would.

All of them live in one folder per source, GALLY_HOME/bench/<name>-<key>/, keyed by the source
folder's path and the sizes and times of its weights and config: a changed source gets new files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess


class PeerUnavailable(Exception):
    """A peer cannot run in this configuration; the message says why and how to fix it."""


def gally_home() -> str:
    from ..cache import home
    return home()


def source_name(folder: str) -> str:
    """The folder's base name, safe as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(folder)))


def folder_for(source: str, cache_dir: str | None = None) -> str:
    """The cache folder of everything derived from `source` (not created here)."""
    h = hashlib.sha1(os.path.realpath(source).encode())
    for f in sorted(glob.glob(os.path.join(source, "*.safetensors")) + glob.glob(os.path.join(source, "config.json"))):
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return os.path.join(cache_dir or os.path.join(gally_home(), "bench"), f"{source_name(source)}-{h.hexdigest()[:12]}")


def quantized_folder(source: str, dtype: str, cache_dir: str | None = None, log=None, calibrate: bool = True) -> str:
    """The folder `gally quantize SOURCE OUT --to dtype` writes, made once; `source` itself when it
    is already quantized to `dtype`. calibrate=False: int4 as `--no-calibration` writes it (for random
    weights, where calibration costs minutes at 8B and buys nothing)."""
    from .. import cache, quantize

    stored = quantize.read_checkpoint(source)
    if stored is not None:
        if stored.quant_type != dtype:
            raise ValueError(f"{source} is quantized to {stored.quant_type}; it cannot be benchmarked as {dtype}")
        return source
    # int4's name says its format version (a cache made by an older gally holds version 1's int4),
    # which down_proj stay int8, and whether it is calibrated
    suffix = (f"-v{quantize.VERSION}-ends{quantize.MORE_BITS_ENDS}" + ("-calibrated" if calibrate else "")
              if dtype == "int4" else "")
    out = os.path.join(folder_for(source, cache_dir), f"{source_name(source)}-gally-{dtype}{suffix}")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    with cache.locked(f"bench-{os.path.basename(out)}"):
        if not os.path.isfile(os.path.join(out, "model.safetensors")):  # another run may have made it meanwhile
            if log:
                log(f"making {out} with gally quantize --to {dtype}")
            # whole or not at all
            quantize.quantize_folder(source, out, dtype, calibration="self" if calibrate else None)
    return out


def random_folder(shape: str, dtype: str, cache_dir: str | None = None, log=None) -> str:
    """GALLY_HOME/bench/random-<shape>-<dtype>: random weights in a real model's shapes
    (random_model.py), written once."""
    from .. import cache
    from .random_model import file_bytes, write

    out = os.path.join(cache_dir or os.path.join(gally_home(), "bench"), f"random-{shape}-{dtype}")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    with cache.locked(f"bench-random-{shape}-{dtype}"):
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            cache.check_free_space(os.path.dirname(out), file_bytes(shape, dtype) + (64 << 20),
                                   f"random {shape} weights ({dtype})")
            if log:
                log(f"writing random {shape} weights ({dtype}, {file_bytes(shape, dtype) / 1e9:.1f} GB) to {out}")
            with cache.building(out) as tmp:
                write(tmp, shape, dtype)
    return out


def run_tool(cmd: list, what: str, env: dict | None = None) -> None:
    """Runs a converter; PeerUnavailable with the end of its output when it fails."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if p.returncode != 0:
        tail = "\n".join(p.stdout.splitlines()[-15:])
        raise PeerUnavailable(f"{what} failed (exit {p.returncode}):\n{tail}")
