"""The model's hyper-parameters, read from a Hugging Face config.json under the same field names."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import numpy as np

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass
class Config:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_scaling: Optional[dict]
    bos_token_id: Optional[int]
    eos_token_id: list[int]
    sliding_window: Optional[int]
    torch_dtype: Optional[str]

    @property
    def model_type(self) -> str:
        return {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2"}[self.architecture]

    @property
    def qkv_bias(self) -> bool:
        # Qwen2's q/k/v projections always carry biases; Llama's only with attention_bias.
        return self.architecture == "Qwen2ForCausalLM" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.architecture != "Qwen2ForCausalLM" and self.attention_bias

    @classmethod
    def from_file(cls, path: str) -> "Config":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json in the model folder") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                        "qwen2": "Qwen2ForCausalLM"}.get(raw.get("model_type"), None)
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch or raw.get('model_type')!r}; "
                             f"gally runs {', '.join(ARCHITECTURES)}")

        def need(key: str, kind: type = int):
            if key not in raw or raw[key] is None:
                raise ValueError(f"config field {key!r} is missing")
            value = raw[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"config field {key!r} must be an integer, got {value!r}")
            if kind is float and not isinstance(value, (int, float)):
                raise ValueError(f"config field {key!r} must be a number, got {value!r}")
            return kind(value)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or (hidden // heads if heads else 0)
        rope_theta, rope_scaling = _rope_fields(raw)
        eos = raw.get("eos_token_id")
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        bos = raw.get("bos_token_id")
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        sliding = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window they do not use
        cfg = cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=need("vocab_size"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            bos_token_id=bos,
            eos_token_id=eos_list,
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            if getattr(cfg, key) <= 0:
                raise ValueError(f"config field {key!r} must be positive, got {getattr(cfg, key)}")
        if heads % cfg.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({cfg.num_key_value_heads})")
        if cfg.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {cfg.head_dim}")
        cfg.inv_freq()  # rejects unknown RoPE types now rather than at the first token
        return cfg

    @property
    def trained_context(self) -> int:
        """Positions the model was trained for: max_position_embeddings, times the factor of a
        linear RoPE scaling (which stretches the positions of the original window)."""
        s = self.rope_scaling or {}
        if s.get("rope_type", s.get("type")) == "linear" and isinstance(s.get("factor"), (int, float)):
            return int(self.max_position_embeddings * max(1.0, float(s["factor"])))
        return self.max_position_embeddings

    @property
    def attention_scale(self) -> float:
        """The factor on q·k: 1/√head_dim."""
        return float(self.head_dim) ** -0.5

    def core_config(self):
        """The hyper-parameters the C++ model takes (_core.ModelConfig): each of its fields, taken
        from the field or property of this config of the same name."""
        from . import _core

        core = _core.ModelConfig()
        for name, attr in vars(_core.ModelConfig).items():
            if not isinstance(attr, property):
                continue
            value = getattr(self, name)
            if callable(value):  # inv_freq
                value = value()
            if isinstance(value, np.ndarray):
                value = value.tolist()
            setattr(core, name, 0 if value is None else value)  # sliding_window None: 0, full attention
        return core

    def inv_freq(self) -> np.ndarray:
        """RoPE frequencies θ_i = theta^(-2i/d) for i < head_dim/2, with the configured scaling."""
        d = self.head_dim
        exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
        inv = (1.0 / (self.rope_theta ** exponents)).astype(np.float32)
        s = self.rope_scaling or {}
        kind = s.get("rope_type", s.get("type", "default")) or "default"
        if kind == "default":
            return inv
        if kind == "linear":
            return (inv / np.float32(_scaling_number(s, "factor"))).astype(np.float32)
        if kind == "llama3":
            # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
            factor = _scaling_number(s, "factor")
            low = _scaling_number(s, "low_freq_factor")
            high = _scaling_number(s, "high_freq_factor")
            old = _scaling_number(s, "original_max_position_embeddings")
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = 2 * math.pi / inv
            out = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * out / factor + smooth * out
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, out).astype(np.float32)
        raise ValueError(f"unsupported RoPE type {kind!r}; gally supports {', '.join(ROPE_TYPES)}")


def _scaling_number(s: dict, key: str) -> float:
    if not isinstance(s.get(key), (int, float)):
        raise ValueError(f"rope scaling field {key!r} is missing or not a number")
    return float(s[key])


def _rope_fields(raw: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from either spelling: rope_theta + rope_scaling
    (transformers 4) or rope_parameters (transformers 5)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-attention-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind in (None, "default") else dict(params)
        return float(theta), scaling
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
    return float(raw.get("rope_theta", 10000.0)), scaling


def read(folder: str) -> Config:
    return Config.from_file(os.path.join(folder, "config.json"))
