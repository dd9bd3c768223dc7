"""GGUF files for the llama.cpp peers, holding exactly the weights gally runs.

F32, BF16 and F16 come from llama.cpp's own converter (convert_hf_to_gguf.py) run on the model
folder gally loads, so llama.cpp reads the same numbers: f32 bit for bit, bf16 rounded to nearest
even as gally rounds at load. Each is checked tensor by tensor against the folder before use.
Q8_0 and Q4_0 are made from that F32 file by llama-quantize with its default choices, the way
llama.cpp users make them. Files are cached under GALLY_HOME/bench/ by model folder and contents
(derived.folder_for).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

from .. import safetensors_file
from ..dtypes import as_float32, to_dtype
from ..gguf_names import gguf_name, permute_rows, permuted_heads
from .derived import PeerUnavailable, folder_for, run_tool, source_name

# gally dtype → llama.cpp type of the peer's weights
LLAMA_TYPES = {"f32": "F32", "bf16": "BF16", "f16": "F16", "int8": "Q8_0", "int4": "Q4_0"}
# gally KV cache type → llama.cpp's (-ctk/-ctv); int8 ↔ q8_0: 8-bit codes under a scale per 32 (gally's bf16,
# llama.cpp's f16)
LLAMA_KV_TYPES = {"f32": "f32", "bf16": "bf16", "f16": "f16", "int8": "q8_0"}
LLAMA_KV_DEFAULT = "f16"  # llama.cpp's cache type when none is given


def type_of(gguf_path: str, dtype: str) -> str:
    """The llama.cpp type of a peer GGUF's weights as its general.file_type names it ("Q4_K_M" for a
    file given with --gguf int4=...), else the type the harness makes for dtype (LLAMA_TYPES)."""
    from gguf import LlamaFileType

    from ..gguf_import import metadata, open_gguf

    try:
        name = LlamaFileType(int(metadata(open_gguf(gguf_path)).get("general.file_type", -1))).name
    except ValueError:  # no file type, or one this gguf release does not know
        return LLAMA_TYPES.get(dtype, "?")
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def cache_flags(kv_type: str | None) -> list:
    """A llama.cpp tool's flags for a KV cache of `kv_type` (None: none, its default), flash attention on:
    a quantized V cache needs it, and the llama-cpp-python peer runs with it."""
    return ["-ctk", kv_type, "-ctv", kv_type, "-fa", "on"] if kv_type else []


def cached_path(folder: str, dtype: str, cache_dir: str | None = None) -> str:
    """Where the peer GGUF of `folder` at `dtype` lives (see derived.folder_for)."""
    return os.path.join(folder_for(folder, cache_dir), f"{source_name(folder)}-{LLAMA_TYPES[dtype]}.gguf")


def peer_gguf(folder: str, dtype: str, llama_cpp: str | None, llama_cpp_bin: str | None,
              cache_dir: str | None = None, log=None) -> str:
    """The cached GGUF for `dtype`, made first if missing (needs llama.cpp's sources or binaries)."""
    if dtype not in LLAMA_TYPES:
        raise PeerUnavailable(f"llama.cpp has no weight type matching gally's {dtype!r}")
    out = cached_path(folder, dtype, cache_dir)
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    kind = LLAMA_TYPES[dtype]
    tmp = out + ".part"
    if kind in ("F32", "BF16", "F16"):
        script = os.path.join(llama_cpp or "", "convert_hf_to_gguf.py")
        if not llama_cpp or not os.path.isfile(script):
            raise PeerUnavailable(f"no {kind} GGUF cached at {out}; pass --llama-cpp DIR (llama.cpp sources "
                                  "with convert_hf_to_gguf.py) to make one")
        if log:
            log(f"making {out} with convert_hf_to_gguf.py")
        run_tool([sys.executable, script, folder, "--outtype", kind.lower(), "--outfile", tmp], "convert_hf_to_gguf.py")
        check_same_weights(folder, tmp, dtype)
    else:
        tool = find_tool("llama-quantize", llama_cpp_bin, llama_cpp)
        if not tool:
            raise PeerUnavailable(f"no {kind} GGUF cached at {out}; pass --llama-cpp-bin DIR holding llama-quantize")
        source = peer_gguf(folder, "f32", llama_cpp, llama_cpp_bin, cache_dir, log)
        if log:
            log(f"making {out} with llama-quantize")
        run_tool([tool, source, tmp, kind], "llama-quantize")
    os.replace(tmp, out)
    return out


def find_tool(name: str, *dirs: str | None) -> str | None:
    """A llama.cpp binary in the given folders (or their bin/, build/bin/), else on PATH."""
    for d in dirs:
        if d:
            for sub in ("", "bin", os.path.join("build", "bin")):
                path = os.path.join(d, sub, name)
                if os.path.isfile(path) and os.access(path, os.X_OK):
                    return path
    return shutil.which(name)


def check_same_weights(folder: str, gguf_path: str, dtype: str) -> None:
    """Raises PeerUnavailable unless every matrix of the GGUF equals the folder's tensor as gally
    runs it at `dtype` (f32: the stored values; bf16: rounded to nearest even) and every vector equals
    the stored f32 values. Tied embeddings: the GGUF then has no output.weight, as in the folder."""
    from ..gguf_import import metadata, open_gguf

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    reader = open_gguf(gguf_path)
    architecture = metadata(reader).get("general.architecture")
    theirs = {t.name: t for t in reader.tensors}
    tensors = safetensors_file.open_checkpoint(folder)
    not_float = [name for name, t in tensors.items() if t.dtype not in ("F32", "BF16", "F16")]
    if not_float:
        raise PeerUnavailable(f"{folder}: tensor {not_float[0]!r} has dtype {tensors[not_float[0]].dtype}, "
                              f"not F32/BF16/F16")
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        their_name = gguf_name(name)
        if their_name is None:
            raise PeerUnavailable(f"{folder}: tensor {name!r} has no llama.cpp name")
        g = theirs.pop(their_name, None)
        if g is None:
            raise PeerUnavailable(f"{gguf_path}: tensor for {name} is missing")
        w = as_float32(tensor.dtype, tensor.numpy())
        heads = permuted_heads(architecture, name, cfg)
        if heads:
            w = permute_rows(w, heads)
        if w.ndim == 2 and dtype == "bf16":
            want = to_dtype(w, "bf16", name)  # as gally converts at load
            got = np.asarray(g.data).view(np.uint16)
        elif w.ndim == 2 and dtype == "f16":
            want, got = w.astype(np.float16).view(np.uint16), np.asarray(g.data).view(np.uint16)
        else:
            want, got = w.view(np.uint32), np.asarray(g.data).view(np.uint32)
        if got.size != want.size or not np.array_equal(got.reshape(want.shape), want):
            raise PeerUnavailable(f"{gguf_path}: {g.name} ({g.tensor_type.name}) differs from {name} as gally "
                                  f"runs it at {dtype}")
    extra = [n for n in theirs if n != "rope_freqs.weight"]
    if extra:
        raise PeerUnavailable(f"{gguf_path}: tensors {extra[:3]} have no counterpart in {folder}")
