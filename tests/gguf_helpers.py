"""Small GGUF files for tests, written with the gguf package's GGUFWriter the way llama.cpp's
converter lays them out: llama.cpp tensor names, q/k rows permuted for Llama, quantized blocks.

Quantized tensors are packed here by hand from (scale, integer) pairs, so the test knows the exact
float32 values the file holds without calling any dequantizer: those values are the "original"
weights the converted checkpoint must reproduce."""

from __future__ import annotations

import gguf
import numpy as np

GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in GLOBAL:
        return GLOBAL[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.weight|bias
    return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: within each head of d rows, row s·d/2 + j moves to 2j + s (interleaved
    RoPE pairs). Written as a row gather, apart from the library's reshape, so that each checks the other."""
    d = w.shape[0] // n_head
    return w[[h * d + s * d // 2 + j for h in range(n_head) for j in range(d // 2) for s in (0, 1)]]


def _f16(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float16)


def quantize(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw block bytes [rows, bytes per row], the float32 values they encode [rows, cols])."""
    rows, cols = w.shape
    if kind == "Q8_0":  # 32 values: f16 d, int8 q[32]; x = d·q
        b = w.reshape(rows, cols // 32, 32)
        d = _f16(np.abs(b).max(-1, keepdims=True) / 127 + 1e-8)
        q = np.clip(np.round(b / d.astype(np.float32)), -127, 127).astype(np.int8)
        raw = np.concatenate([d.view(np.uint8).reshape(rows, -1, 2), q.view(np.uint8)], -1)
        return raw.reshape(rows, -1), (d.astype(np.float32) * q.astype(np.float32)).reshape(rows, cols)
    if kind in ("Q4_0", "Q4_1"):  # 32 values: f16 d (, f16 m), 16 bytes: q[j] low nibble, q[j+16] high
        b = w.reshape(rows, cols // 32, 32)
        if kind == "Q4_0":  # x = d·(q − 8)
            d = _f16(np.abs(b).max(-1, keepdims=True) / 7.5 + 1e-8)
            q = np.clip(np.round(b / d.astype(np.float32)) + 8, 0, 15).astype(np.uint8)
            values = d.astype(np.float32) * (q.astype(np.float32) - 8)
            head = [d.view(np.uint8).reshape(rows, -1, 2)]
        else:  # x = d·q + m
            m = _f16(b.min(-1, keepdims=True))
            d = _f16((b.max(-1, keepdims=True) - m.astype(np.float32)) / 15 + 1e-8)
            q = np.clip(np.round((b - m.astype(np.float32)) / d.astype(np.float32)), 0, 15).astype(np.uint8)
            values = d.astype(np.float32) * q.astype(np.float32) + m.astype(np.float32)
            head = [d.view(np.uint8).reshape(rows, -1, 2), m.view(np.uint8).reshape(rows, -1, 2)]
        packed = q[..., :16] | (q[..., 16:] << 4)
        raw = np.concatenate(head + [packed], -1)
        return raw.reshape(rows, -1), values.reshape(rows, cols).astype(np.float32)
    if kind in ("Q4_K", "Q6_K"):  # 256-value super-blocks: random codes, sane f16 scales
        nb = cols // 256
        if kind == "Q4_K":  # d, dmin (f16), scales[12], qs[128]
            raw = rng.integers(0, 256, (rows, nb, 144), dtype=np.uint8)
            raw[..., 0:2] = _f16(rng.uniform(0.001, 0.01, (rows, nb))).view(np.uint8).reshape(rows, nb, 2)
            raw[..., 2:4] = _f16(rng.uniform(0.001, 0.01, (rows, nb))).view(np.uint8).reshape(rows, nb, 2)
        else:  # ql[128], qh[64], scales[16] (int8), d (f16)
            raw = rng.integers(0, 256, (rows, nb, 210), dtype=np.uint8)
            raw[..., 208:210] = _f16(rng.uniform(0.0005, 0.002, (rows, nb))).view(np.uint8).reshape(rows, nb, 2)
        raw = raw.reshape(rows, -1)
        # No hand-packed oracle for K-quants: these test the plumbing around gguf's dequantizer.
        return raw, gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).astype(np.float32)
    raise ValueError(kind)


SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_vocab(texts=("the cat sat on the mat", "hello world", "1234567 tokens", "don't stop")):
    """A byte-level BPE vocabulary: the specials, the 256 byte characters, and merges learned
    greedily from `texts` (most frequent adjacent pair first, GPT-2 style with Ġ for spaces)."""
    from gally.gguf_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    tokens = list(SPECIALS) + [alphabet[b] for b in range(256)]
    words = []
    for t in texts:
        for i, w in enumerate(t.split(" ")):
            words.append([alphabet[b] for b in (("" if i == 0 else " ") + w).encode()])
    merges = []
    for _ in range(40):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                i += 1
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "types": types, "merges": merges,
            "bos": 1, "eos": 2, "unk": 0, "pad": 2, "add_bos": False, "chat_template": CHATML}


def write_gguf(path, cfg: dict, weights: dict[str, np.ndarray], types: dict[str, str] | None = None,
               arch: str = "llama", tokenizer: dict | None = None, meta: dict | None = None,
               extra_tensors: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes HF-named float32 `weights` of config `cfg` as a GGUF file at `path`. types: HF name →
    "F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K" or "Q6_K" (default F32; 1-D tensors always F32).
    extra_tensors: GGUF name → array, written as is. Returns the weights as the file holds them
    (after quantization), in HF names and layout."""
    rng = np.random.default_rng(seed)
    types = types or {}
    tokenizer = tokenizer or byte_level_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // H
    w.add_uint32(f"{arch}.block_count", cfg["num_hidden_layers"])
    w.add_uint32(f"{arch}.context_length", cfg["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", cfg["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", H)
    w.add_uint32(f"{arch}.attention.head_count_kv", KV)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", cfg["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_tokenizer_model(tokenizer["model"])
    if tokenizer.get("pre"):
        w.add_tokenizer_pre(tokenizer["pre"])
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    if tokenizer.get("merges") is not None:
        w.add_token_merges(tokenizer["merges"])
    if tokenizer.get("scores") is not None:
        w.add_token_scores(tokenizer["scores"])
    for key, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                       ("pad", "padding_token_id")):
        if tokenizer.get(key) is not None:
            w.add_uint32(f"tokenizer.ggml.{field}", tokenizer[key])
    if tokenizer.get("add_bos") is not None:
        w.add_add_bos_token(tokenizer["add_bos"])
    if tokenizer.get("chat_template"):
        w.add_chat_template(tokenizer["chat_template"])
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    held = {}
    for name, t in (extra_tensors or {}).items():  # GGUF-named tensors written as given
        w.add_tensor(name, t)
    for name, t in weights.items():
        kind = types.get(name, "F32") if t.ndim > 1 else "F32"
        heads = {"q_proj": H, "k_proj": KV}.get(name.split(".")[-2]) if arch == "llama" else None
        if kind in ("F32", "F16"):
            data = t.astype(np.float32 if kind == "F32" else np.float16)
            held[name] = data.astype(np.float32)
            w.add_tensor(gguf_name(name), permute(data, heads) if heads else data)
        else:
            raw, values = quantize(t, kind, rng)
            held[name] = values
            w.add_tensor(gguf_name(name), permute(raw, heads) if heads else raw,
                         raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held
