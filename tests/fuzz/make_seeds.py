"""Writes the seed inputs of every fuzz target into corpus/<target>/seed-*: small valid (and a few
near-valid) instances for the fuzzer to mutate. Run again only when a format changes:

    python tests/fuzz/make_seeds.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import harness  # noqa: E402
import numpy as np  # noqa: E402
from harness import SEPARATOR, TINY, safetensors_bytes, tiny_tokenizer_json, tiny_weights  # noqa: E402


def seeds() -> dict[str, dict[str, bytes]]:
    w = tiny_weights()
    names = sorted(w)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    half = {"metadata": {"total_size": 0}, "weight_map": {**dict.fromkeys(first, harness.SHARDS[0]),
                                                          **dict.fromkeys(second, harness.SHARDS[1])}}
    chatml = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    f16 = {k: v.astype(np.float16) for k, v in w.items()}
    out = {
        "safetensors": {"f32": safetensors_bytes(w), "f16": safetensors_bytes(f16),
                        "small": safetensors_bytes({"model.norm.weight": w["model.norm.weight"]})},
        "index": {"two-shards": json.dumps(half).encode()},
        "config": {
            "llama": json.dumps(TINY).encode() + SEPARATOR + json.dumps({"temperature": 0.7, "top_k": 5}).encode(),
            "llama3-rope": json.dumps({**TINY, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 16}}).encode(),
            "qwen2": json.dumps({**TINY, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}).encode()
                     + SEPARATOR + json.dumps({"do_sample": False, "eos_token_id": [2, 15]}).encode(),
        },
        "tokenizer": {
            "wordlevel": tiny_tokenizer_json() + SEPARATOR + json.dumps(
                {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": chatml}).encode(),
            "jinja": tiny_tokenizer_json() + SEPARATOR + b"{}" + SEPARATOR + chatml.encode(),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        from gally import quantize
        from gguf_helpers import byte_level_vocab, write_gguf

        src = os.path.join(tmp, "src")
        os.makedirs(src)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(TINY, f)
        with open(os.path.join(src, "model.safetensors"), "wb") as f:
            f.write(safetensors_bytes(w))
        out["quantized"] = {}
        for kind in ("int8", "int4"):
            quantize.quantize_folder(src, os.path.join(tmp, kind), kind)
            with open(os.path.join(tmp, kind, "model.safetensors"), "rb") as f:
                out["quantized"][kind] = f.read()
        out["gguf"] = {}
        vocab = byte_level_vocab(("the cat", "hi"))
        cfg = {**TINY, "vocab_size": len(vocab["tokens"])}
        gw = tiny_weights(cfg)
        for name, types in (("f32", None), ("q8_0", {k: "Q8_0" for k in gw if gw[k].ndim == 2})):
            path = os.path.join(tmp, f"{name}.gguf")
            write_gguf(path, cfg, gw, types=types, tokenizer=vocab)
            with open(path, "rb") as f:
                out["gguf"][name] = f.read()
    return out


def main() -> None:
    for target, files in seeds().items():
        folder = os.path.join(HERE, "corpus", target)
        os.makedirs(folder, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(folder, f"seed-{name}"), "wb") as f:
                f.write(data)
            print(f"{target}/seed-{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
