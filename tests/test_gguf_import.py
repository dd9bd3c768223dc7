"""GGUF → Hugging Face conversion on small GGUF files the tests write themselves (random weights,
llama.cpp's layout: q/k rows permuted, blocks packed by hand): the converted checkpoint must hold
exactly the file's weights and give the engine's logits on the original weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors import safe_open

import gally
from conftest import DEFAULT_CONFIG, random_weights, write_safetensors
from gally import gguf_import, gguf_names, safetensors_file
from gally.cli import main as cli_main
from gguf_helpers import byte_level_vocab, write_gguf

VOCAB = byte_level_vocab()


def tiny_config(**overrides) -> dict:
    return {**DEFAULT_CONFIG, "vocab_size": len(VOCAB["tokens"]), "bos_token_id": 1, "eos_token_id": 2, **overrides}


def write_hf(folder, cfg: dict, weights: dict[str, np.ndarray]) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_safetensors(os.path.join(folder, "model.safetensors"), weights)
    return str(folder)


def converted_tensors(folder) -> dict[str, np.ndarray]:
    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def matrices(weights) -> list[str]:
    return [k for k, v in weights.items() if v.ndim == 2]


def token_ids(vocab_size: int, n: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, n)


VARIANTS = {
    "f32": lambda names: {},
    "f16": lambda names: dict.fromkeys(names, "F16"),
    "q8_0": lambda names: dict.fromkeys(names, "Q8_0"),
    "q4_0": lambda names: dict.fromkeys(names, "Q4_0"),
    "q4_1": lambda names: dict.fromkeys(names, "Q4_1"),
    # what llama.cpp writes for a Q4_1 file: Q8_0 embeddings, Q4_1 elsewhere, some F16
    "mixed": lambda names: {n: "Q8_0" if "embed" in n else "Q4_1" if "proj" in n and "v_proj" not in n else "F16"
                            for n in names},
}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_checkpoint_matches_original(tmp_path, variant, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    weights = random_weights(cfg, seed=3)
    held = write_gguf(tmp_path / "m.gguf", cfg, weights, VARIANTS[variant](matrices(weights)))
    out = gguf_import.convert(tmp_path / "m.gguf", tmp_path / "converted")

    got = converted_tensors(out)
    assert set(got) == set(held)
    for name, w in held.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)  # unpermuted, dequantized exactly
    config = json.load(open(os.path.join(out, "config.json")))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings"):
        assert config[key] == cfg[key], key
    assert config["tie_word_embeddings"] is tied
    assert config["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]

    original = gally.load(write_hf(tmp_path / "original", cfg, held))
    model = gally.load(out)
    ids = token_ids(cfg["vocab_size"])
    np.testing.assert_allclose(model.logits(ids), original.logits(ids), rtol=0, atol=1e-5)


def test_q_k_rows_are_unpermuted(tmp_path):
    """A GGUF whose q/k rows are left in HF order must give different logits: the unpermute matters."""
    cfg = tiny_config()
    weights = random_weights(cfg, seed=4)
    write_gguf(tmp_path / "m.gguf", cfg, weights)
    raw = gguf_names.unpermute_rows(weights["model.layers.0.self_attn.q_proj.weight"], cfg["num_attention_heads"])
    assert not np.array_equal(raw, weights["model.layers.0.self_attn.q_proj.weight"])
    model = gally.load(gguf_import.convert(tmp_path / "m.gguf", tmp_path / "c"))
    wrong = dict(weights)
    for name, heads in (("q_proj", cfg["num_attention_heads"]), ("k_proj", cfg["num_key_value_heads"])):
        for layer in range(cfg["num_hidden_layers"]):
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            wrong[key] = gguf_names.unpermute_rows(weights[key], heads)
    ids = token_ids(cfg["vocab_size"])
    right = gally.load(write_hf(tmp_path / "right", cfg, weights)).logits(ids)
    permuted = gally.load(write_hf(tmp_path / "wrong", cfg, wrong)).logits(ids)
    np.testing.assert_allclose(model.logits(ids), right, rtol=0, atol=1e-5)
    assert np.abs(permuted - right).max() > 1e-2


def test_k_quants(tmp_path):
    cfg = tiny_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    weights = random_weights(cfg, seed=5)
    types = {n: ("Q4_K" if i % 2 else "Q6_K") for i, n in enumerate(matrices(weights))}
    held = write_gguf(tmp_path / "m.gguf", cfg, weights, types)
    out = gguf_import.convert(tmp_path / "m.gguf", tmp_path / "c")
    got = converted_tensors(out)
    for name, w in held.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    ids = token_ids(cfg["vocab_size"])
    np.testing.assert_allclose(gally.load(out).logits(ids),
                               gally.load(write_hf(tmp_path / "o", cfg, held)).logits(ids), rtol=0, atol=1e-5)


def test_llama_attention_and_mlp_biases(tmp_path):
    """q/k biases are permuted like their rows; llama.cpp names the MLP's biases blk.N.ffn_*.bias."""
    cfg = tiny_config(attention_bias=True, mlp_bias=True)
    weights = random_weights(cfg, seed=7)
    assert "model.layers.1.mlp.down_proj.bias" in weights and "model.layers.1.self_attn.k_proj.bias" in weights
    held = write_gguf(tmp_path / "m.gguf", cfg, weights)
    out = gguf_import.convert(tmp_path / "m.gguf", tmp_path / "c")
    got = converted_tensors(out)
    assert set(got) == set(held)
    for name, w in held.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    ids = token_ids(cfg["vocab_size"])
    np.testing.assert_allclose(gally.load(out).logits(ids),
                               gally.load(write_hf(tmp_path / "o", cfg, held)).logits(ids), rtol=0, atol=1e-5)


def test_qwen2_biases_and_no_permutation(tmp_path):
    cfg = tiny_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True)
    weights = random_weights(cfg, seed=6)
    held = write_gguf(tmp_path / "m.gguf", cfg, weights, dict.fromkeys(matrices(weights), "Q8_0"), arch="qwen2")
    out = gguf_import.convert(tmp_path / "m.gguf", tmp_path / "c")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]
    ids = token_ids(cfg["vocab_size"])
    np.testing.assert_allclose(gally.load(out).logits(ids),
                               gally.load(write_hf(tmp_path / "o", cfg, held)).logits(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_dtype(tmp_path, dtype):
    cfg = tiny_config()
    weights = random_weights(cfg, seed=7)
    held = write_gguf(tmp_path / "m.gguf", cfg, weights, dict.fromkeys(matrices(weights), "Q4_1"))
    out = gguf_import.convert(tmp_path / "m.gguf", tmp_path / "c", dtype=dtype)
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        names = list(f.keys())
    header, _ = safetensors_file.read_header(os.path.join(out, "model.safetensors"))
    for name in names:
        want = ("BF16" if dtype == "bf16" else "F16") if held[name].ndim == 2 else "F32"
        assert header[name]["dtype"] == want, name
    if dtype == "f16":
        got = converted_tensors(out)
        for name, w in held.items():
            want = w.astype(np.float16).astype(np.float32) if w.ndim == 2 else w
            np.testing.assert_array_equal(got[name].astype(np.float32), want)
    model = gally.load(out, dtype=dtype)
    assert model.dtype == dtype and model.copied_bytes == 0
    # the engine's own f32 → dtype conversion at load gives the same weights
    ids = token_ids(cfg["vocab_size"])
    converted_at_load = gally.load(write_hf(tmp_path / "o", cfg, held), dtype=dtype)
    np.testing.assert_allclose(model.logits(ids), converted_at_load.logits(ids), rtol=0, atol=1e-5)


def test_rope_scaling(tmp_path):
    from gally.config import Config

    cfg = tiny_config(rope_theta=500000.0)
    weights = random_weights(cfg, seed=8)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    plain = Config.from_dict(cfg).inv_freq()
    divisors = (plain / Config.from_dict({**cfg, "rope_scaling": llama3}).inv_freq()).astype(np.float32)
    write_gguf(tmp_path / "l3.gguf", cfg, weights, extra_tensors={"rope_freqs.weight": divisors})
    config = json.load(open(os.path.join(gguf_import.convert(tmp_path / "l3.gguf", tmp_path / "c3"), "config.json")))
    assert config["rope_scaling"] == llama3 and config["rope_theta"] == 500000.0

    write_gguf(tmp_path / "lin.gguf", cfg, weights, meta={"llama.rope.scaling.type": "linear",
                                                          "llama.rope.scaling.factor": 4.0})
    config = json.load(open(os.path.join(gguf_import.convert(tmp_path / "lin.gguf", tmp_path / "cl"), "config.json")))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    write_gguf(tmp_path / "yarn.gguf", cfg, weights, meta={"llama.rope.scaling.type": "yarn",
                                                           "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ValueError, match="yarn"):
        gguf_import.convert(tmp_path / "yarn.gguf", tmp_path / "cy")


def test_tokenizer_files(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg))
    out = gguf_import.convert(tmp_path / "m.gguf", tmp_path / "c")
    tok_config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"]) == \
           ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok_config["chat_template"] == VOCAB["chat_template"] and tok_config["add_bos_token"] is False
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2

    tok = gally.load(out).tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    text = "the cat sat on the mat, héllo 🐕!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("the") == [VOCAB["tokens"].index("the")]
    ids = tok.encode("<|im_start|>user<|im_end|>")  # specials stay whole
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == "user"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# Strings that exercise the pre-tokenizer regexes, added tokens and byte fallback.
TEXTS = ["the cat sat on the mat", "a b <think>x</think>", "<unk> <s>x</s>", "Hello World", "  leading spaces",
         "trailing   ", "tabs\tand\nnewlines\r\n",
         "numbers 1234567 and 3.14159", "don't I'm we'll THEY'RE", "<|im_start|>user\nhi<|im_end|>",
         "x<|endoftext|>y", "<|im_", "héllo wörld ñ", "東京 タワー", "🐕🐕 emoji 👩‍👩‍👧", "a\u00a0b", "\n\n\n", "",
         "def f(x):\n    return x**2  # comment", "ÅÄÖ åäö", "٠١٢ مرحبا", "\u2581already marked", "  \n \t "]


def _transformers_tokenizer(folder, name):
    transformers = pytest.importorskip("transformers")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


def _sentencepiece_vocab() -> dict:
    """A Llama-2-style vocabulary: <unk> <s> </s>, 256 byte tokens <0xNN>, pieces with ▁ and scores."""
    pieces = ["▁", "t", "h", "e", "a", "c", "s", "o", "n", "m", "l", "w", "r", "d", "H", "W", "1", "2",
              "▁t", "he", "▁the", "at", "▁c", "▁cat", "▁s", "▁sat", "▁o", "▁on", "▁m", "▁mat", "ll", "llo",
              "▁he", "▁hello", "or", "▁w", "▁wor", "▁world", "12", "▁▁", "▁▁▁▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return {"model": "llama", "pre": None, "tokens": tokens, "types": types, "merges": None, "scores": scores,
            "bos": 1, "eos": 2, "unk": 0, "pad": None, "add_bos": None,
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"}


@pytest.mark.parametrize("vocab", ["smollm", "llama-bpe", "qwen2", "sentencepiece"])
def test_tokenizer_matches_transformers(tmp_path, vocab):
    """Both tokenizers are built from the same GGUF file; they must cut every text the same way."""
    spec = _sentencepiece_vocab() if vocab == "sentencepiece" else {**byte_level_vocab(), "pre": vocab}
    if vocab == "llama-bpe":  # Llama 3 style: BOS added by the tokenizer, user-defined tokens
        spec.update(add_bos=True, tokens=spec["tokens"] + ["<think>", "a b"], types=spec["types"] + [4, 4])
    cfg = tiny_config(vocab_size=len(spec["tokens"]))
    write_gguf(tmp_path / "t.gguf", cfg, {}, tokenizer=spec)
    ref = _transformers_tokenizer(tmp_path, "t.gguf")
    from gally import gguf_tokenizer
    from gally.tokenizer import Tokenizer

    path = str(tmp_path / "t.gguf")
    backend, tok_config, eos = gguf_tokenizer.build(gguf_import.metadata(gguf_import.open_gguf(path)), path)
    tok = Tokenizer(backend, {k: tok_config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
                    eos, tok_config.get("chat_template"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True), text
        assert tok.decode(ids) == ref.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    chat = [{"role": "user", "content": "hello world"}]
    assert tok.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_cli_convert(tmp_path, capsys):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), dict.fromkeys(matrices(random_weights(cfg)), "Q8_0"))
    assert cli_main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    assert gally.load(str(tmp_path / "out")).dtype == "bf16"
    assert cli_main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out2")]) == 1
    assert "no such GGUF file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out2")


# --- bad input: a clear error naming the file (and tensor), and nothing written -----------------

def _leftovers(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(tmp_path) if n not in ("m.gguf", "bad.gguf"))


def test_truncated_file(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg))
    data = open(tmp_path / "m.gguf", "rb").read()
    for cut in (len(data) - 100, len(data) // 2, 1000, 10, 0):
        with open(tmp_path / "bad.gguf", "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match=r"bad\.gguf.*(truncated|not a GGUF)"):
            gguf_import.convert(tmp_path / "bad.gguf", tmp_path / "out")
        assert _leftovers(tmp_path) == []


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_import.convert(tmp_path / "bad.gguf", tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_unknown_architecture(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), arch="falcon")
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported"):
        gguf_import.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_unsupported_tensor_type(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    del weights["model.layers.1.mlp.up_proj.weight"]
    int8 = np.ones((cfg["intermediate_size"], cfg["hidden_size"]), np.int8)
    write_gguf(tmp_path / "m.gguf", cfg, weights, extra_tensors={"blk.1.ffn_up.weight": int8})
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_up\.weight' has type I8"):
        gguf_import.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_missing_and_unknown_tensors(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    del weights["model.layers.1.mlp.down_proj.weight"]
    write_gguf(tmp_path / "m.gguf", cfg, weights)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_down\.weight' is missing"):
        gguf_import.convert(tmp_path / "m.gguf", tmp_path / "out")
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg),
               extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_exps\.weight' has no place"):
        gguf_import.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_unsupported_tokenizer(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), tokenizer={**VOCAB, "model": "bert"})
    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported"):
        gguf_import.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg))

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_import.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert _leftovers(tmp_path) == []



def test_large_models_are_sharded(tmp_path, monkeypatch):
    cfg = tiny_config()
    weights = random_weights(cfg, seed=9)
    held = write_gguf(tmp_path / "m.gguf", cfg, weights, dict.fromkeys(matrices(weights), "Q8_0"))
    monkeypatch.setattr(gguf_import, "SHARD_BYTES", 40_000)
    out = gguf_import.convert(tmp_path / "m.gguf", tmp_path / "c")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(index["weight_map"]) == sorted(held)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == files
    ids = token_ids(cfg["vocab_size"])
    np.testing.assert_allclose(gally.load(out).logits(ids), gally.load(write_hf(tmp_path / "o", cfg, held)).logits(ids),
                               rtol=0, atol=1e-5)
