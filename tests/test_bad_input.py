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
    # dimensions whose products would overflow an int in the C++ core
    (dict(num_attention_heads=65536, num_key_value_heads=65536, head_dim=65536),
     "'num_attention_heads' is 65536, more than gally's limit of 1024"),
    (dict(hidden_size=2**31), "'hidden_size' is 2147483648, more than gally's limit of 65536"),
    (dict(num_hidden_layers=4_000_000_000), "'num_hidden_layers' is 4000000000, more than gally's limit of 1024"),
    (dict(vocab_size=1 << 23), "'vocab_size' is 8388608, more than gally's limit of 4194304"),
    (dict(num_attention_heads=1024, num_key_value_heads=1, head_dim=256),
     "num_attention_heads x head_dim = 262144 is more than gally's limit of 131072"),
    (dict(hidden_size=65536, vocab_size=65536, head_dim=16), "a weight matrix of 65536 x hidden_size 65536 elements"),
    (dict(num_key_value_heads=8), "not a multiple of num_key_value_heads"),
    (dict(max_position_embeddings=-5), "'max_position_embeddings' must be positive"),
    # numbers that would make the logits NaN
    (dict(rope_theta=0), "'rope_theta' must be a finite positive number, got 0"),
    (dict(rope_theta=-1e4), "'rope_theta' must be a finite positive number"),
    (dict(rope_theta=float("nan")), "'rope_theta' must be a finite number, got nan"),
    (dict(rope_theta="big"), "'rope_theta' must be a finite number, got 'big'"),
    (dict(rope_theta=1e-300), "non-finite RoPE frequencies"),
    (dict(rms_norm_eps=float("inf")), "'rms_norm_eps' must be a finite number, got inf"),
    (dict(rms_norm_eps=-1e-5), "'rms_norm_eps' must be in \\[0, 1\\)"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "'factor' must be a positive finite number, got 0"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
                        "original_max_position_embeddings": 64}), "'high_freq_factor' \\(2.0\\) must exceed"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": float("inf"), "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "'factor' must be"),
    (dict(rope_scaling={"rope_type": ["linear"], "factor": 2.0}), "'rope_type' must be a string"),
    (dict(rope_parameters=[1, 2]), "'rope_parameters' must be an object"),
    # fields of the wrong type, named rather than crashing
    (dict(architectures={"a": 1}), "'architectures' must be a list of strings"),
    (dict(head_dim=16.5), "'head_dim' must be an integer, got 16.5"),
    (dict(num_key_value_heads=[2]), "'num_key_value_heads' must be an integer"),
    (dict(eos_token_id={"x": 1}), "'eos_token_id' must be an integer or a list of integers"),
    (dict(bos_token_id="<s>"), "'bos_token_id' must be an integer"),
    (dict(tie_word_embeddings="yes"), "'tie_word_embeddings' must be true or false"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=-4096), "'sliding_window' must be >= 0, got -4096"),
    (dict(architectures=["MistralForCausalLM"], sliding_window="4k"), "'sliding_window' must be an integer"),
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
    (dict(max_context=(1 << 20) + 1), "max_context must be at most 1048576"),
    (dict(threads=10**5), "threads must be at most 1024"),
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


def test_core_checks_the_config_bounds_itself(tmp_path):
    # heads = kv heads = head_dim = 65536 made heads x head_dim wrap to 0 in an int, which zero-row
    # q/k/v tensors then matched; the C++ check refuses the config whoever builds it.
    from gally import _core

    c = _core.ModelConfig()
    for key, value in dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=65536,
                           num_key_value_heads=65536, head_dim=65536, vocab_size=97).items():
        setattr(c, key, value)
    c.inv_freq = [1.0] * 32768
    c.attention_scale = 1.0
    with pytest.raises(ValueError, match="config: num_attention_heads must be in \\[1, 1024\\], got 65536"):
        _core.Model(c, {}, "", 1)
    c.num_attention_heads = c.num_key_value_heads = 4
    c.head_dim = 16
    c.inv_freq = [1.0] * 7 + [float("nan")]
    with pytest.raises(ValueError, match="RoPE frequencies must be finite"):
        _core.Model(c, {}, "", 1)
    c.inv_freq = [1.0] * 8
    c.rms_norm_eps = float("inf")
    with pytest.raises(ValueError, match="rms_norm_eps must be in \\[0, 1\\)"):
        _core.Model(c, {}, "", 1)


def test_session_kv_cache_is_bounded(tmp_path, monkeypatch):
    from gally import model as model_mod

    monkeypatch.setattr(model_mod, "physical_memory", lambda: 1 << 42)  # the C++ bound, not the machine's
    # 5 layers x (k, v) x 64 heads x 512 x 4 bytes = 1.25 MiB a token: 2^20 tokens take 1.25 TiB, over
    # the 1 TiB a session may have (the weights are small: hidden_size 2)
    folder, _ = make_checkpoint(tmp_path, hidden_size=2, intermediate_size=2, num_hidden_layers=5, vocab_size=4,
                                num_attention_heads=64, num_key_value_heads=64, head_dim=512)
    model = gally.load(folder, max_context=16, kv_cache_bytes=2**41)
    assert model.session(16).max_context == 16
    with pytest.raises(ValueError, match="max_context must be at most 1048576, got 1048577"):
        model.session((1 << 20) + 1)
    with pytest.raises(ValueError, match="max_context 1048576 needs a KV cache of 1374389534720 bytes, more than "
                                         "the 1099511627776 a session may have"):
        model.session(1 << 20)
    from gally import _core
    with pytest.raises(ValueError, match="max_context must be in \\[1, 1048576\\]"):
        _core.Sequence(model._core, model._pool, (1 << 20) + 1)


def test_safetensors_header_over_100_mb(tmp_path):
    folder, _ = make_checkpoint(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(8 + 100_000_001 + 16)  # sparse: no disk used
    with pytest.raises(ValueError, match="header length 100000001 exceeds the format's limit of 100000000 bytes") as e:
        gally.load(folder)
    assert path in str(e.value)


def _with_nan(folder, w, name="model.layers.1.mlp.up_proj.weight", dtype="F32"):
    w = {k: v.astype(np.float32) for k, v in w.items()}
    w[name] = w[name].copy()
    w[name][3, 5] = np.nan
    write_safetensors(os.path.join(folder, "model.safetensors"), w, dtype)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_check_tensors_names_a_tensor_with_nan(tmp_path, dtype):
    folder, w = make_checkpoint(tmp_path)
    gally.load(folder, check_tensors=True)  # clean weights pass
    _with_nan(folder, w, dtype=dtype)
    with pytest.raises(ValueError, match=f"tensor 'model.layers.1.mlp.up_proj.weight' \\({dtype}\\) holds a NaN "
                                         f"or an infinity at flat index {3 * 64 + 5}") as e:
        gally.load(folder, check_tensors=True)
    assert folder in str(e.value)
    gally.load(folder)  # off by default: the file is not read at load


def test_non_finite_logits_never_become_text(tmp_path):
    from generation_helpers import make_text_checkpoint

    folder = make_text_checkpoint(tmp_path / "m")
    vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
    _, w = make_checkpoint(tmp_path / "w", vocab_size=vocab)
    _with_nan(folder, w)
    model = gally.load(folder)
    assert np.isnan(model.session().append([1, 2, 3])).any()
    for kwargs in (dict(temperature=0), dict(temperature=0.8, seed=1), dict(temperature=1.0, top_k=0, top_p=1.0,
                                                                            min_p=0.0, seed=1)):
        with pytest.raises(ValueError, match="the model produced non-finite logits .* weights or config are corrupt"):
            model.generate("Hello", max_new_tokens=3, **kwargs)
        with pytest.raises(ValueError, match="non-finite logits"):
            list(model.generate("Hello", max_new_tokens=3, stream=True, **kwargs))


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "go past 100000 steps"),
    ("{% set ns = namespace(s='') %}{% for i in range(90000) %}{% for m in messages * 1000 %}{{ m.role }}{% endfor %}"
     "{% endfor %}", "ran for more than 2 s"),
    ("{{ 'ab' * 10**9 }}", "repeats a sequence of 2 items 1000000000 times"),
    ("{{ [0] * 2**30 }}", "repeats a sequence of 1 items"),
    ("{{ 3 ** 100000000 }}", "raises a number to the power 100000000"),
])
def test_hostile_chat_template_is_stopped(template, message):
    from gally import chat_template

    with pytest.raises(chat_template.ChatTemplateError, match=message):
        chat_template.render(template, [{"role": "user", "content": "hi"}])
    assert chat_template.render("{% for i in range(3) %}{{ i * 2 }}{% endfor %}{{ 'ab' * 2 }}", []) == "024abab"


def test_gguf_with_absurd_block_count_is_refused_at_once(tmp_path):
    # A 1 KB file claiming 4e9 layers made the importer loop over range(block_count) for ever.
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for key, value in dict(block_count=4_000_000_000, context_length=64, embedding_length=8,
                           feed_forward_length=16, **{"attention.head_count": 2}).items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert os.path.getsize(path) < 1024
    code = f"from gally import gguf_import; gguf_import.convert({path!r}, {str(tmp_path / 'out')!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert (f"ValueError: {path}: config field 'num_hidden_layers' is 4000000000, more than gally's limit of 1024"
            in r.stderr)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("tensors, entries", [(2**60, 0), (0, 2**40), (1000, 0)])
def test_gguf_header_counts_beyond_the_file_are_refused(tmp_path, tensors, entries):
    from gally import gguf_import

    path = str(tmp_path / "m.gguf")
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, tensors, entries) + bytes(1000))
    with pytest.raises(ValueError, match=f"corrupt GGUF file: {tensors} tensors and {entries} metadata entries "
                                         f"cannot fit in a file of 1024 bytes") as e:
        gguf_import.convert(path, str(tmp_path / "out"))
    assert path in str(e.value)


def _small_gguf(path, extra):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(block_count=1, context_length=64, embedding_length=8, feed_forward_length=16,
                           **{"attention.head_count": 2}).items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case, extra, message", [
    ("1-D embedding", lambda w: w.add_tensor("token_embd.weight", np.zeros(8, np.float32)), "IndexError"),
    ("tokens an integer", lambda w: (w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32)),
                                     w.add_string("tokenizer.ggml.model", "gpt2"),
                                     w.add_uint32("tokenizer.ggml.tokens", 5)), "TypeError"),
    ("merges integers", lambda w: (w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32)),
                                   w.add_string("tokenizer.ggml.model", "gpt2"), w.add_token_list(["a", "b"]),
                                   w.add_array("tokenizer.ggml.merges", [1, 2])), "AttributeError"),
    ("linear scaling without factor", lambda w: (w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32)),
                                                 w.add_string("llama.rope.scaling.type", "linear")),
     "llama.rope.scaling.factor must be a number, got None"),
])
def test_malformed_gguf_metadata_is_a_value_error_naming_the_file(tmp_path, case, extra, message):
    from gally import gguf_import

    path = tmp_path / "m.gguf"
    _small_gguf(path, extra)
    with pytest.raises(ValueError, match=message) as e:
        gguf_import.convert(str(path), str(tmp_path / "out"))
    assert str(e.value).startswith(f"{path}: ")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_context_larger_than_the_machine_is_refused_with_the_bytes(tmp_path, monkeypatch):
    from gally import model as model_mod

    folder, _ = make_checkpoint(tmp_path, max_position_embeddings=1 << 20)
    monkeypatch.setattr(model_mod, "physical_memory", lambda: 1 << 28)  # a 256 MiB machine
    # 2 layers x (k, v) x 2 heads x 16 x 4 bytes = 512 bytes a token (f32 weights: f32 cache)
    with pytest.raises(ValueError, match=r"max_context 1048576 needs 536,870,912 bytes \(0.5 GiB\) of KV cache for "
                                         r"one sequence \(512 bytes a token\), more than this machine's "
                                         r"268,435,456 bytes \(.*\) of memory; give a smaller max_context \(-c\), "
                                         r"or kv_dtype f16 for half the bytes \(int8: about a quarter\)"):
        gally.load(folder, max_context=1 << 20, kv_cache_bytes=1 << 40)
    model = gally.load(folder, max_context=1 << 18, kv_cache_bytes=1 << 40)  # 128 MiB: fits
    assert model.session().max_context == 1 << 18
    with pytest.raises(ValueError, match="max_context 1048576 needs 536,870,912 bytes"):
        model.session(1 << 20)
    # a 128 MiB machine: a compact cache's hint is int8
    monkeypatch.setattr(model_mod, "physical_memory", lambda: 1 << 27)
    with pytest.raises(ValueError, match=r"\(256 bytes a token\).*or kv_dtype int8 for about half the bytes"):
        gally.load(folder, max_context=1 << 20, kv_cache_bytes=1 << 40, kv_dtype="f16")
    with pytest.raises(ValueError, match=r"\(144 bytes a token\).*of memory; give a smaller max_context \(-c\)$"):
        gally.load(folder, max_context=1 << 20, kv_cache_bytes=1 << 40, kv_dtype="int8")
