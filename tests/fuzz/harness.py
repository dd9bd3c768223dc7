"""What each fuzz target does with one input: lay it out as model files in a fresh folder, hand
them to gally, and judge the outcome. An input passes when gally accepts it or raises ValueError
or OSError whose message names the folder or file it read; anything else (another exception, a
message that names nothing, a leftover partial folder) raises Finding. A crash or a hang is found
by whoever runs this (atheris, or the replay test's subprocess).

Inputs that hold several files separate them with SEPARATOR (JSON never holds a NUL byte).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np

SEPARATOR = b"\0\0"

# The model every target builds around: small enough that a seed file is a few kilobytes.
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=16,
            max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


class Finding(AssertionError):
    """gally's answer to an input broke the contract (see the module doc)."""


def tiny_weights(cfg: dict = TINY, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    D, F, V, H, KV = (cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                                       "num_key_value_heads"))
    hd = D // H
    w = {"model.embed_tokens.weight": rng.standard_normal((V, D)), "model.norm.weight": np.ones(D),
         "lm_head.weight": rng.standard_normal((V, D)) / 8}
    p = "model.layers.0."
    for name, shape in (("input_layernorm", (D,)), ("post_attention_layernorm", (D,)),
                        ("self_attn.q_proj", (H * hd, D)), ("self_attn.k_proj", (KV * hd, D)),
                        ("self_attn.v_proj", (KV * hd, D)), ("self_attn.o_proj", (D, H * hd)),
                        ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)), ("mlp.down_proj", (D, F))):
        w[p + name + ".weight"] = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) / 8
    return {k: v.astype(np.float32) for k, v in w.items()}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int8): "I8",
             np.dtype(np.uint8): "U8", np.dtype(np.uint16): "BF16"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, a in tensors.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def tiny_tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "Hello", "world", "the", "a", "b", "c", "d", "e",
                                         "f", "g", "h", "i", "<|im_end|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def _write(folder: str, name: str, data: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _split(data: bytes, parts: int) -> list[bytes]:
    pieces = data.split(SEPARATOR, parts - 1)
    return pieces + [b""] * (parts - len(pieces))


def _expect_named(error: BaseException, *names: str) -> None:
    if not isinstance(error, (ValueError, OSError)):
        raise Finding(f"{type(error).__name__} instead of ValueError or OSError: {error}") from error
    message = str(error)
    if not any(n in message for n in names):
        raise Finding(f"{type(error).__name__} names none of {names}: {message}") from error


def _load_and_run(folder: str, *names: str, generate: bool = False) -> str:
    import gally

    try:
        model = gally.load(folder, threads=1)
        logits = model.session(8).append([1, 2, 3])
        if generate:
            model.generate([1, 2, 3], max_new_tokens=2, seed=0)
    except Exception as e:
        _expect_named(e, folder, *names)
        return f"{type(e).__name__}: {e}"
    if logits.shape != (model.config.vocab_size,):
        raise Finding(f"logits of shape {logits.shape}")
    return "loaded"


def _model_folder(work: str, config: dict = TINY) -> str:
    folder = os.path.join(work, "model")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    _write(folder, "config.json", json.dumps(config).encode())
    return folder


def run_safetensors(data: bytes, work: str) -> str:
    """data: model.safetensors of the tiny model's folder."""
    folder = _model_folder(work)
    _write(folder, "model.safetensors", data)
    return _load_and_run(folder)


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def run_index(data: bytes, work: str) -> str:
    """data: model.safetensors.index.json beside two intact shards of the tiny model."""
    folder = _model_folder(work)
    w = tiny_weights()
    names = sorted(w)
    for shard, part in zip(SHARDS, (names[: len(names) // 2], names[len(names) // 2:])):
        _write(folder, shard, safetensors_bytes({k: w[k] for k in part}))
    _write(folder, "model.safetensors.index.json", data)
    return _load_and_run(folder)


def run_config(data: bytes, work: str) -> str:
    """data: config.json SEPARATOR generation_config.json, beside the tiny model's weights and a
    word-level tokenizer; the model is loaded and generates."""
    config, generation = _split(data, 2)
    folder = os.path.join(work, "model")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    _write(folder, "config.json", config)
    if generation:
        _write(folder, "generation_config.json", generation)
    _write(folder, "model.safetensors", safetensors_bytes(tiny_weights()))
    _write(folder, "tokenizer.json", tiny_tokenizer_json())
    return _load_and_run(folder, generate=True)


def run_tokenizer(data: bytes, work: str) -> str:
    """data: tokenizer.json SEPARATOR tokenizer_config.json SEPARATOR chat_template.jinja (the
    last two optional): the tokenizer encodes, decodes, streams and renders a conversation."""
    from gally.tokenizer import Tokenizer

    tokenizer, config, template = _split(data, 3)
    folder = os.path.join(work, "tok")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    _write(folder, "tokenizer.json", tokenizer)
    if config:
        _write(folder, "tokenizer_config.json", config)
    if template:
        _write(folder, "chat_template.jinja", template)
    try:
        tok = Tokenizer.from_folder(folder)
        ids = tok.encode("Hello world, the a b <|im_end|> ünï")
        text = tok.decode(ids)
        stream = tok.stream()
        streamed = "".join(stream.step(i) for i in ids) + stream.flush()
        if streamed != text:
            raise Finding(f"streamed text {streamed!r} differs from decode's {text!r}")
        if tok.chat_template is not None:
            tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    except Finding:
        raise
    except Exception as e:
        _expect_named(e, folder)
        return f"{type(e).__name__}: {e}"
    return "loaded"


def run_gguf(data: bytes, work: str) -> str:
    """data: a .gguf file, converted to a Hugging Face folder, which is then loaded. A failed
    conversion must leave nothing behind: no output folder, no temporary folder beside it."""
    from gally import gguf_import

    path = os.path.join(work, "model.gguf")
    out = os.path.join(work, "converted")
    shutil.rmtree(out, ignore_errors=True)
    _write(work, "model.gguf", data)
    try:
        gguf_import.convert(path, out, "f32", progress=False)
    except Exception as e:
        _expect_named(e, path)
        left = sorted(n for n in os.listdir(work) if n != "model.gguf")
        if left:
            raise Finding(f"a failed conversion left {left} behind") from e
        return f"{type(e).__name__}: {e}"
    return _load_and_run(out)


def run_quantized(data: bytes, work: str) -> str:
    """data: model.safetensors of a `gally quantize` folder of the tiny model (int8 or int4)."""
    return run_safetensors(data, work)


TARGETS = {"safetensors": run_safetensors, "index": run_index, "config": run_config, "tokenizer": run_tokenizer,
           "gguf": run_gguf, "quantized": run_quantized}
