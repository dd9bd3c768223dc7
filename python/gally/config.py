"""The model's hyper-parameters, read from a Hugging Face config.json under the same field names."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import numpy as np

from . import _core

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")

# gally's bounds on a config (csrc/model.h, ConfigLimits, says why): the dimensions, a weight
# matrix's elements (< 2^31) and heads x head_dim. max_position_embeddings only sets the default
# context (capped far lower), so its bound just keeps the number sane (Llama 4 Scout: 10M).
_LIMITS = _core.config_limits()
LIMITS = {key: _LIMITS[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "head_dim", "vocab_size")}
LIMITS["num_key_value_heads"] = _LIMITS["num_attention_heads"]
LIMITS["max_position_embeddings"] = 1 << 30


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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"config field 'architectures' must be a list of strings, got {archs!r}")
        model_type = raw.get("model_type") if isinstance(raw.get("model_type"), str) else None
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                        "qwen2": "Qwen2ForCausalLM"}.get(model_type)
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch or model_type!r}; "
                             f"gally runs {', '.join(ARCHITECTURES)}")

        hidden = _int_field(raw, "hidden_size")
        heads = _int_field(raw, "num_attention_heads")
        kv_heads = _int_field(raw, "num_key_value_heads", default=heads)
        head_dim = _int_field(raw, "head_dim", default=hidden // heads if heads > 0 else 0)
        rope_theta, rope_scaling = _rope_fields(raw)
        eos = raw.get("eos_token_id")
        eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(_is_int(e) for e in eos_list):
            raise ValueError(f"config field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
        bos = raw.get("bos_token_id")
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        if bos is not None and not _is_int(bos):
            raise ValueError(f"config field 'bos_token_id' must be an integer, got {bos!r}")
        sliding = _int_field(raw, "sliding_window", default=None, low=0)
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window they do not use
        dtype = raw.get("torch_dtype") or raw.get("dtype")
        cfg = cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=_int_field(raw, "intermediate_size"),
            num_hidden_layers=_int_field(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_int_field(raw, "vocab_size"),
            rms_norm_eps=_number_field(raw, "rms_norm_eps", 1e-6),
            max_position_embeddings=_int_field(raw, "max_position_embeddings", default=2048),
            tie_word_embeddings=_bool_field(raw, "tie_word_embeddings"),
            attention_bias=_bool_field(raw, "attention_bias"),
            mlp_bias=_bool_field(raw, "mlp_bias"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            bos_token_id=bos,
            eos_token_id=eos_list,
            sliding_window=sliding or None,
            torch_dtype=dtype if isinstance(dtype, str) else None,
        )
        for key, most in LIMITS.items():
            value = getattr(cfg, key)
            if value <= 0:
                raise ValueError(f"config field {key!r} must be positive, got {value}")
            if value > most:
                raise ValueError(f"config field {key!r} is {value}, more than gally's limit of {most}")
        if cfg.num_key_value_heads > heads or heads % cfg.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({cfg.num_key_value_heads})")
        if cfg.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {cfg.head_dim}")
        if heads * cfg.head_dim > _LIMITS["attention_width"]:
            raise ValueError(f"num_attention_heads x head_dim = {heads * cfg.head_dim} is more than gally's limit "
                             f"of {_LIMITS['attention_width']}")
        widest = max(heads * cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
        if widest * hidden > _LIMITS["matrix_elements"]:
            raise ValueError(f"a weight matrix of {widest} x hidden_size {hidden} elements is more than gally's "
                             f"limit of {_LIMITS['matrix_elements']}")
        if not 0 <= cfg.rms_norm_eps < 1:
            raise ValueError(f"config field 'rms_norm_eps' must be in [0, 1), got {cfg.rms_norm_eps!r}")
        if not (math.isfinite(rope_theta) and rope_theta > 0):
            raise ValueError(f"config field 'rope_theta' must be a finite positive number, got {rope_theta!r}")
        cfg.inv_freq()  # rejects unknown RoPE types and absurd scaling now rather than at the first token
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
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = self._scaled_inv_freq()
        if not np.isfinite(inv).all():
            raise ValueError(f"rope_theta {self.rope_theta!r} with rope scaling {self.rope_scaling!r} gives "
                             f"non-finite RoPE frequencies")
        return inv

    def _scaled_inv_freq(self) -> np.ndarray:
        d = self.head_dim
        exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
        inv = (1.0 / (self.rope_theta ** exponents)).astype(np.float32)
        s = self.rope_scaling or {}
        kind = s.get("rope_type", s.get("type", "default")) or "default"
        if not isinstance(kind, str):
            raise ValueError(f"rope scaling field 'rope_type' must be a string, got {kind!r}")
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
            if not high > low:
                raise ValueError(f"rope scaling field 'high_freq_factor' ({high}) must exceed "
                                 f"'low_freq_factor' ({low})")
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = 2 * math.pi / inv
            out = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * out / factor + smooth * out
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, out).astype(np.float32)
        raise ValueError(f"unsupported RoPE type {kind!r}; gally supports {', '.join(ROPE_TYPES)}")


def _scaling_number(s: dict, key: str) -> float:
    value = s.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"rope scaling field {key!r} is missing or not a number")
    if not (math.isfinite(value) and 0 < value <= 1e12):
        raise ValueError(f"rope scaling field {key!r} must be a positive finite number, got {value!r}")
    return float(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_MISSING = object()


def _int_field(raw: dict, key: str, default: Any = _MISSING, low: Optional[int] = None) -> Any:
    """An integer field (absent or null: `default`, and an error when there is none)."""
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"config field {key!r} is missing")
        return default
    if not _is_int(value):
        raise ValueError(f"config field {key!r} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"config field {key!r} must be >= {low}, got {value}")
    return value


def _number_field(raw: dict, key: str, default: float) -> float:
    value = raw.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _bool_field(raw: dict, key: str) -> bool:
    value = raw.get(key)
    if value is None:
        return False
    if not isinstance(value, bool) and value not in (0, 1):
        raise ValueError(f"config field {key!r} must be true or false, got {value!r}")
    return bool(value)


def _rope_fields(raw: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from either spelling: rope_theta + rope_scaling
    (transformers 4) or rope_parameters (transformers 5)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-attention-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = _number_field(params, "rope_theta", _number_field(raw, "rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind in (None, "default") else dict(params)
        return theta, scaling
    if params is not None:
        raise ValueError(f"config field 'rope_parameters' must be an object, got {params!r}")
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
    return _number_field(raw, "rope_theta", 10000.0), scaling


def read(folder: str) -> Config:
    return Config.from_file(os.path.join(folder, "config.json"))
