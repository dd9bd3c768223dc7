"""Where a model comes from: a local Hugging Face folder (more sources come with GGUF import)."""

from __future__ import annotations

import os
from typing import Optional


def resolve(source: Optional[str]) -> str:
    """The local folder holding config.json and the safetensors weights for `source`."""
    if source is None:
        raise ValueError("no model given")
    source = os.fspath(source)
    if os.path.isdir(source):
        return source
    raise FileNotFoundError(f"{source}: no such model folder")
