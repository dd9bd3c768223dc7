"""gally: CPU inference for Llama-family language models.

    model = gally.load("path/to/hf-folder")      # or a .gguf file, or an alias
    logits = model.logits([1, 2, 3])              # float32 [3, vocab_size]
    s = model.session(); s.append(ids)            # KV-cached, one call per batch of tokens
"""

from __future__ import annotations

import os

# The forward pass meets OpenMP barriers ~150 times per token. libgomp spins 300k rounds before
# sleeping, so on a busy machine a waiting thread holds a core its partner needs: SmolLM2 decode
# measured 5.9 tok/s under load with the default, 14 with 10k rounds (~0.1 ms), which still
# covers the microsecond waits of an idle machine. Read when libgomp loads, with _core below.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

from . import _core  # noqa: E402
from .config import Config
from .model import Model, Session, load, physical_cores

KvCacheFull = _core.KvCacheFull  # a sequence needs KV cache blocks the model's pool cannot give

__version__ = "0.1.0"

_core.selected_isa()  # reads GALLY_ISA now: a variant this CPU lacks is an error at import
__all__ = ["load", "info", "Model", "Session", "Config", "Engine", "QueueFull", "KvCacheFull", "__version__"]


def info() -> dict:
    """The build and the CPU: version, selected kernel set (isa), those this CPU can run (isas),
    default threads, whether OpenMP is compiled in, and what runs the threads (parallel: "openmp", or
    "threads" for gally's own pool in a build without OpenMP)."""
    return {
        "version": __version__,
        "isa": _core.selected_isa(),
        "isas": list(_core.available_isas()),
        "avx512bf16": bool(_core.has_avx512bf16()),
        "threads": physical_cores(),
        "openmp": bool(_core.openmp()),
        "parallel": _core.parallel_backend(),
    }


_SUBMODULES = ("perplexity", "generate", "quantize", "explain", "engine", "options", "scheduler", "tokenizer")


def __getattr__(name: str):
    # The engine (threads, asyncio) and the submodules the README names (gally.perplexity...) are
    # imported when first asked for, not with gally.
    if name in ("Engine", "QueueFull"):
        from . import engine

        return getattr(engine, name)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"gally.{name}")
    raise AttributeError(f"module 'gally' has no attribute {name!r}")
