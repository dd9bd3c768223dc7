"""gally against transformers' logits stored in tests/data/transformers_reference (see
tests/transformers_reference.py, which made them): always, torch installed or not. Where torch and
transformers are installed, the stored figures are also checked against a live run."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

import gally
from transformers_reference import CASES, DATA, DTYPES, IDS, reference_logits, write_checkpoint

MANIFEST = json.load(open(os.path.join(DATA, "manifest.json")))
PARAMS = [(case, dtype) for case in CASES for dtype in DTYPES]
LIVE = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def test_every_case_and_dtype_is_stored():
    assert sorted(MANIFEST["files"]) == sorted(f"{c}-{d.lower()}.npy" for c, d in PARAMS)
    assert MANIFEST["ids"] == IDS


@pytest.mark.parametrize("case, dtype", PARAMS)
def test_logits_match_stored_transformers_logits(tmp_path, isa, case, dtype):
    name = f"{case}-{dtype.lower()}.npy"
    # the weights are the bits transformers saw
    assert write_checkpoint(str(tmp_path), case, dtype) == MANIFEST["files"][name]["checkpoint_sha256"]
    want = np.load(os.path.join(DATA, name))
    # an f32 KV cache: transformers keeps its keys and values in f32 (gally's default for 16-bit
    # weights is an f16 cache, whose rounding moves these logits by ~1e-3)
    model = gally.load(str(tmp_path), threads=2, kv_dtype="f32")
    assert model.dtype == dtype.lower() and model.copied_bytes == 0
    got = model.logits(IDS)
    s = model.session()
    s.append(IDS[:12])
    steps = np.stack([s.append([t]) for t in IDS[12:]])
    # avx512bf16 rounds a prompt's activations to bf16 for bf16 weights (README, Precision), and the
    # decode steps after it attend to the keys and values that prompt left; every other set computes in f32
    tol = 3e-2 if isa == "avx512bf16" and dtype == "BF16" else 1e-3
    assert np.abs(got - want).max() <= tol
    assert np.abs(steps - want[12:]).max() <= tol


@pytest.mark.skipif(not LIVE, reason="torch and transformers are not installed: the stored logits are compared, "
                                     "not regenerated")
@pytest.mark.parametrize("case, dtype", PARAMS)
def test_stored_logits_are_what_transformers_computes(tmp_path, case, dtype):
    write_checkpoint(str(tmp_path), case, dtype)
    stored = np.load(os.path.join(DATA, f"{case}-{dtype.lower()}.npy"))
    assert np.abs(reference_logits(str(tmp_path)) - stored).max() <= 1e-5


def test_the_comparison_can_fail(tmp_path):
    # one weight changed: the same comparison sees it
    case, dtype = "llama_gqa_untied", "F32"
    write_checkpoint(str(tmp_path), case, dtype)
    want = np.load(os.path.join(DATA, f"{case}-f32.npy"))
    from conftest import write_safetensors
    from transformers_reference import weights

    w = weights(case)
    w["model.layers.1.mlp.down_proj.weight"][3, 7] += 0.05
    write_safetensors(os.path.join(tmp_path, "model.safetensors"), w, dtype)
    assert np.abs(gally.load(str(tmp_path)).logits(IDS) - want).max() > 1e-3
