"""Bad input gets a clear error that names what was wrong, never a crash."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import gally
from conftest import make_checkpoint, write_safetensors


def header_file(path, header: dict, data: bytes = b"", raw_header: bytes | None = None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def corrupt(tmp_path, **kwargs):
    folder, _ = make_checkpoint(tmp_path)
    header_file(os.path.join(folder, "model.safetensors"), **kwargs)
    return folder


T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("case, kwargs, message", [
    ("short file", None, "shorter than 8 bytes"),
    ("header past end", dict(header={}, raw_header=None), "header length"),
    ("not json", dict(header={}, raw_header=b"{not json"), "not valid JSON"),
    ("not an object", dict(header={}, raw_header=b"[1, 2]"), "expected a JSON object"),
    ("unknown dtype", dict(header={"a": {**T, "dtype": "Q9"}}, data=bytes(16)), "unknown dtype 'Q9'"),
    ("offsets past data", dict(header={"a": {**T, "data_offsets": [0, 16]}}, data=bytes(8)), "past the data section"),
    ("span vs shape", dict(header={"a": {**T, "data_offsets": [0, 12]}}, data=bytes(16)), "does not match shape"),
    ("reversed offsets", dict(header={"a": {**T, "data_offsets": [16, 0]}}, data=bytes(16)), "not an interval"),
    ("overlap", dict(header={"a": T, "b": {**T, "data_offsets": [8, 24]}}, data=bytes(24)), "'a' and 'b' overlap"),
    ("bad shape", dict(header={"a": {**T, "shape": [2, "x"]}}, data=bytes(16)), "shape must be a list of integers"),
    ("missing key", dict(header={"a": {"dtype": "F32", "shape": [1]}}, data=bytes(4)),
     "needs dtype, shape and data_offsets"),
    ("negative dim", dict(header={"a": {**T, "shape": [-2, -2]}}, data=bytes(16)), "negative"),
])
def test_corrupt_safetensors(tmp_path, case, kwargs, message):
    if kwargs is None:
        folder, _ = make_checkpoint(tmp_path)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"\x01\x02")
    elif case == "header past end":
        folder, _ = make_checkpoint(tmp_path)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", 10_000) + b"{}")
    else:
        folder = corrupt(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=message) as e:
        gally.load(folder)
    assert "model.safetensors" in str(e.value)


def test_truncated_checkpoint(tmp_path):
    folder, _ = make_checkpoint(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match="truncated"):
        gally.load(folder)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        gally.load(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gally.load(str(tmp_path / "empty"))
    folder, _ = make_checkpoint(tmp_path / "m")
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        gally.load(folder)


def test_missing_tensor_and_wrong_shape(tmp_path):
    folder, w = make_checkpoint(tmp_path)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    del w["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(os.path.join(folder, "model.safetensors"), w)
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        gally.load(folder)
    w["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 63), np.float32)
    write_safetensors(os.path.join(folder, "model.safetensors"), w)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \[96, 63\] "
                                         r"but the config implies \[96, 64\]"):
        gally.load(folder)


def test_unsupported_weight_dtype(tmp_path):
    folder, w = make_checkpoint(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    from safetensors.numpy import save_file
    tensors = {k: v.astype(np.float32) for k, v in w.items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="'model.norm.weight' has dtype F64"):
        gally.load(folder)


def test_sharded_checkpoint(tmp_path):
    folder, w = make_checkpoint(tmp_path)
    from reference_numpy import forward
    names = sorted(w)
    half = len(names) // 2
    os.remove(os.path.join(folder, "model.safetensors"))
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        write_safetensors(os.path.join(folder, shard), {k: w[k].astype(np.float32) for k in keys})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    ids = [3, 1, 4, 1, 5]
    assert np.abs(gally.load(folder).logits(ids) - forward(folder, ids, w)).max() <= 1e-3
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    assert "model.norm.weight" in shards["model-00002-of-00002.safetensors"]
    with pytest.raises(ValueError, match="'model.norm.weight' is not in its shard"):
        gally.load(folder)


@pytest.mark.parametrize("overrides, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported RoPE type 'yarn'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "unsupported RoPE type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "'low_freq_factor' is missing"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(hidden_size="64"), "'hidden_size' must be an integer"),
    (dict(vocab_size=0), "'vocab_size' must be positive"),
])
def test_bad_config(tmp_path, overrides, message):
    folder, _ = make_checkpoint(tmp_path)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg.update(overrides)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match=message) as e:
        gally.load(folder)
    assert "config.json" in str(e.value)


def test_mistral_sliding_window(tmp_path):
    folder, _ = make_checkpoint(tmp_path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8)
    model = gally.load(folder)
    assert model.max_context == 8
    model.logits(list(range(8)))
    with pytest.raises(ValueError, match="exceeds max_context 8"):
        model.session().append(list(range(9)))
    s = gally.load(folder, max_context=64).session()
    with pytest.raises(ValueError, match="sliding_window 8"):
        s.append(list(range(9)))
    assert s.position == 0


def test_bad_tokens_and_context(tmp_path):
    folder, _ = make_checkpoint(tmp_path)
    model = gally.load(folder, max_context=16)
    s = model.session()
    s.append([1, 2, 3])
    for ids, message in [([1, 97], "token id 97 at index 1 is outside the vocabulary"),
                         ([-1], "token id -1"),
                         ([2**40], "outside the vocabulary"),
                         ([1.5], "must be integers"),
                         ([], "empty"),
                         ([[1, 2]], "flat sequence")]:
        with pytest.raises(ValueError, match=message):
            s.append(ids)
    with pytest.raises(ValueError, match="exceeds max_context 16"):
        s.append(list(range(14)))
    assert s.position == 3  # nothing was lost
    with pytest.raises(ValueError, match="position must be"):
        s.truncate(4)
    with pytest.raises(ValueError, match="exceeds max_context 16"):
        model.logits(list(range(17)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="int3"), "dtype must be one of"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(threads=1.5), "threads must be a positive integer"),
    (dict(max_context=-1), "max_context must be a positive integer"),
])
def test_bad_load_arguments(tmp_path, kwargs, message):
    folder, _ = make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=message):
        gally.load(folder, **kwargs)


def test_gally_isa_environment():
    def run(isa):
        env = {**os.environ, "GALLY_ISA": isa}
        return subprocess.run([sys.executable, "-c", "import gally, json; print(json.dumps(gally.info()))"],
                              env=env, capture_output=True, text=True)
    for isa in gally.info()["isas"]:
        r = run(isa)
        assert r.returncode == 0 and json.loads(r.stdout)["isa"] == isa
    r = run("avx1024")
    assert r.returncode != 0 and "GALLY_ISA=avx1024 is not available on this CPU" in r.stderr


def test_a_context_past_the_trained_positions_needs_forcing(tmp_path):
    folder, _ = make_checkpoint(tmp_path)  # max_position_embeddings 256
    with pytest.raises(ValueError, match="past the 256 positions .* force_context=True"):
        gally.load(folder, max_context=1000)
    with pytest.warns(UserWarning, match="past the 256 positions"):
        assert gally.load(folder, max_context=1000, force_context=True).max_context == 1000
    linear = make_checkpoint(tmp_path / "linear", rope_scaling={"rope_type": "linear", "factor": 4.0})[0]
    assert gally.load(linear, max_context=1000).max_context == 1000  # its scaling covers 4 × 256
