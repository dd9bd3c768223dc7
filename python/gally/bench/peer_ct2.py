"""The CTranslate2 peer's model: the Hugging Face folder gally's int8 is quantized from, converted
once by CTranslate2's own converter (TransformersConverter, quantization="int8": each weight matrix
in int8 with one float scale per row, the way CTranslate2 users make it) and cached beside the
peer GGUFs (derived.folder_for). The converter loads the folder with transformers + torch, in its
own process, so that the benchmark's process never imports torch."""

from __future__ import annotations

import importlib.util
import os
import sys

from .derived import PeerUnavailable, folder_for, run_tool, source_name

# gally dtype → CTranslate2 quantization (at conversion) and compute type (at load)
CT2_TYPES = {"int8": "int8"}
INSTALL = "pip install ctranslate2==4.8.5 (converting needs torch and transformers as well)"

_CONVERT = ("import sys; from ctranslate2.converters import TransformersConverter; "
            "TransformersConverter(sys.argv[1], low_cpu_mem_usage=True)"
            ".convert(sys.argv[2], quantization=sys.argv[3], force=True)")  # force: into the empty temporary folder


def cached_folder(folder: str, dtype: str, cache_dir: str | None = None) -> str:
    return os.path.join(folder_for(folder, cache_dir), f"{source_name(folder)}-ct2-{CT2_TYPES[dtype]}")


def ct2_folder(folder: str, dtype: str, cache_dir: str | None = None, log=None) -> str:
    """The cached CTranslate2 model of `folder` at `dtype`, converted first if missing."""
    from .. import cache

    if dtype not in CT2_TYPES:
        raise PeerUnavailable(f"the benchmark pairs CTranslate2 {', '.join(CT2_TYPES.values())} with gally's "
                              f"{', '.join(CT2_TYPES)} only, not {dtype}")
    out = cached_folder(folder, dtype, cache_dir)
    if os.path.isfile(os.path.join(out, "model.bin")):
        return out
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise PeerUnavailable(f"no CTranslate2 model cached at {out}, and its converter needs {' and '.join(missing)} "
                              "(pip install torch==2.13.0 transformers)")
    with cache.locked(f"bench-{os.path.basename(out)}"):
        if not os.path.isfile(os.path.join(out, "model.bin")):  # another run may have made it meanwhile
            if log:
                log(f"making {out} with CTranslate2's TransformersConverter (quantization={CT2_TYPES[dtype]})")
            with cache.building(out) as tmp:
                run_tool([sys.executable, "-c", _CONVERT, folder, tmp, CT2_TYPES[dtype]],
                         "CTranslate2's TransformersConverter")
    return out
