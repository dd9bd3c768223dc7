"""What a token costs: the model's parameters, the bytes of weights one generated token reads at
each dtype, and the time a token takes, measured.

Generating a token runs every layer once: each weight matrix is read whole (the embedding matrix
only for one row, unless it doubles as lm_head), so the bytes read per token are the size of the
weights, and on a CPU the speed of decode is about memory bandwidth / those bytes. The counts
follow the engine's own accounting (csrc/model.cpp: matrix_bytes, Builder::vector): matrices in
their compute dtype, int8 groups of 32 weights with one float16 scale (34 bytes), int4 groups with
a float16 scale and minimum (20 bytes), norms and biases in float32.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import numpy as np

from .. import quantize
from ..config import Config

DTYPE_ROWS = ("f32", "bf16", "int8", "int4")  # the rows of the cost table (f16 costs what bf16 does)
FLOAT_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
COMPARE_MAX_PARAMETERS = 1_000_000_000  # by default, larger models are not loaded again at other dtypes
DECODE_STEPS = 8  # timed decode steps per dtype; the median is reported


@dataclasses.dataclass(frozen=True)
class Weight:
    name: str                # the checkpoint's tensor name
    shape: tuple[int, ...]
    read_per_token: bool     # False for the embedding matrix when lm_head is a separate matrix


def weights(c: Config) -> list[Weight]:
    """Every tensor of a checkpoint with config c, named as Hugging Face names them."""
    D, F, QD, KVD = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    out = [Weight("model.embed_tokens.weight", (c.vocab_size, D), c.tie_word_embeddings)]
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        out += [Weight(p + "input_layernorm.weight", (D,), True),
                Weight(p + "self_attn.q_proj.weight", (QD, D), True),
                Weight(p + "self_attn.k_proj.weight", (KVD, D), True),
                Weight(p + "self_attn.v_proj.weight", (KVD, D), True),
                Weight(p + "self_attn.o_proj.weight", (D, QD), True)]
        if c.qkv_bias:
            out += [Weight(p + f"self_attn.{x}_proj.bias", (size,), True) for x, size in (("q", QD), ("k", KVD),
                                                                                        ("v", KVD))]
        if c.o_bias:
            out.append(Weight(p + "self_attn.o_proj.bias", (D,), True))
        out += [Weight(p + "post_attention_layernorm.weight", (D,), True),
                Weight(p + "mlp.gate_proj.weight", (F, D), True),
                Weight(p + "mlp.up_proj.weight", (F, D), True),
                Weight(p + "mlp.down_proj.weight", (D, F), True)]
        if c.mlp_bias:
            out += [Weight(p + f"mlp.{x}_proj.bias", (size,), True)
                    for x, size in (("gate", F), ("up", F), ("down", D))]
    out.append(Weight("model.norm.weight", (D,), True))
    if not c.tie_word_embeddings:
        out.append(Weight("lm_head.weight", (c.vocab_size, D), True))
    return out


def group_of(name: str) -> str:
    """The part of the model a tensor belongs to, in the article's words."""
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "prediction (lm_head)"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "feed-forward"
    return "norms"


def parameters(c: Config) -> dict[str, int]:
    """Parameters by part of the model ("embedding", "attention", "feed-forward", "norms",
    "prediction (lm_head)" when untied) and "total"."""
    out: dict[str, int] = {}
    for w in weights(c):
        out[group_of(w.name)] = out.get(group_of(w.name), 0) + int(np.prod(w.shape))
    out["total"] = sum(out.values())
    return out


def tensor_bytes(w: Weight, dtype: str, stored_bytes: int, layers: int = 0) -> int:
    """Bytes of one tensor as a model loaded at `dtype` holds it. stored_bytes: bytes per value of
    the checkpoint's floats, which a matrix that cannot be quantized keeps; layers: the model's
    (int4 keeps some layers' down_proj in int8)."""
    n = int(np.prod(w.shape))
    if len(w.shape) == 1:
        return 4 * n
    if dtype in FLOAT_BYTES:
        return FLOAT_BYTES[dtype] * n
    kind = quantize.kind_for(w.name, w.shape, dtype, layers)
    groups = n // quantize.GROUP_SIZE.get(kind or dtype, 32)
    if kind == "int8":
        return n + 2 * groups
    if kind == "int4-v1":
        return n // 2 + 4 * groups
    if kind == "int4":  # per super-block of 8 of the matrix's groups: float16 d and dmin, 12 bytes of 6-bit codes
        return n // 2 + quantize.super_blocks(groups) * (4 + quantize.CODE_BYTES)
    return stored_bytes * n


def bytes_per_token(c: Config, dtype: str, stored_bytes: int = 2) -> int:
    """Bytes of weights one token's forward pass reads with the matrices at `dtype`
    ("f32", "bf16", "f16", "int8", "int4", "int4-v1"); what Model.weight_bytes reports once loaded so."""
    if dtype not in FLOAT_BYTES and dtype not in quantize.KINDS:
        raise ValueError(f"dtype must be one of {', '.join([*FLOAT_BYTES, *quantize.KINDS])}, got {dtype!r}")
    return sum(tensor_bytes(w, dtype, stored_bytes, c.num_hidden_layers) for w in weights(c) if w.read_per_token)


@dataclasses.dataclass
class DecodeTiming:
    seconds: np.ndarray      # float64 [steps]: each timed decode step
    prefill_seconds: float   # the prompt's forward pass
    prompt_tokens: int

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))


def time_decode(model, ids: np.ndarray, steps: int = DECODE_STEPS) -> DecodeTiming:
    """Prefills ids in a fresh session, then times `steps` greedy decode steps one by one."""
    session = model.session(len(ids) + steps + 1)
    t0 = time.perf_counter()
    logits = session.append(ids)
    prefill = time.perf_counter() - t0
    seconds = np.zeros(steps)
    for i in range(steps):
        token = int(np.argmax(logits))
        t0 = time.perf_counter()
        logits = session.append([token])
        seconds[i] = time.perf_counter() - t0
    return DecodeTiming(seconds, prefill, len(ids))


@dataclasses.dataclass
class DtypeCost:
    dtype: str
    bytes_per_token: int
    timing: Optional[DecodeTiming]  # None: not measured (not asked for, or the model cannot load so)
    note: str = ""                  # why not measured, or what this row is

    @property
    def tokens_per_second(self) -> Optional[float]:
        return 1.0 / self.timing.median if self.timing else None

    @property
    def bandwidth(self) -> Optional[float]:
        """Bytes of weights read per second while decoding."""
        return self.bytes_per_token / self.timing.median if self.timing else None


@dataclasses.dataclass
class Cost:
    parameters: dict[str, int]      # by part of the model, and "total"
    dtype: str                      # the loaded model's ("f32", "bf16", "f16", "int8", "int4")
    bytes_per_token: int            # Model.weight_bytes
    timing: DecodeTiming            # the loaded model's decode, measured
    dtypes: list[DtypeCost]         # one row per DTYPE_ROWS, and the loaded dtype if not among them
    threads: int


def stored_float_bytes(model) -> int:
    from . import embeddings

    stored = embeddings.EmbeddingMatrix(model.path).stored
    return {"F32": 4, "BF16": 2, "F16": 2}.get(stored, 2)


def stored_quantization(model) -> Optional[str]:
    """"int8" or "int4" for a checkpoint `gally quantize` wrote, else None."""
    quantized = quantize.read_checkpoint(model.path)
    return quantized.quant_type if quantized else None


def dtypes_to_compare(model, compare: Optional[Sequence[str]]) -> list[str]:
    """The dtypes to load the model again at and time, checked. None: those of DTYPE_ROWS other
    than the loaded one, for models of at most COMPARE_MAX_PARAMETERS; a checkpoint stored
    quantized loads at its own dtype only."""
    from .. import model as model_mod

    stored = stored_quantization(model)
    if compare is None:
        small = parameters(model.config)["total"] <= COMPARE_MAX_PARAMETERS
        return [d for d in DTYPE_ROWS if d != model.dtype] if small and not stored else []
    if isinstance(compare, str):
        raise ValueError(f"compare must be a list of dtypes, got the string {compare!r}")
    for d in compare:
        if d not in model_mod.DTYPES:
            raise ValueError(f"compare: dtype must be one of {', '.join(model_mod.DTYPES)}, got {d!r}")
        if stored and d != stored:
            raise ValueError(f"compare: {model.path} is stored quantized to {stored} and loads at that dtype only, "
                             f"not {d!r}")
    return list(compare)


def cost_of(model, ids: np.ndarray, compare: Sequence[str], steps: int = DECODE_STEPS) -> Cost:
    """The cost section: the loaded model measured, the dtypes of `compare` (dtypes_to_compare)
    loaded and measured, the other rows of DTYPE_ROWS computed."""
    from .. import model as model_mod

    c = model.config
    params = parameters(c)
    own = model.dtype  # "mixed" only for a hand-made checkpoint whose layers differ
    stored = stored_quantization(model)
    timing = time_decode(model, ids, steps)
    float_bytes = stored_float_bytes(model)
    rows = []
    for d in dict.fromkeys([*DTYPE_ROWS, own]):
        if d == own:
            rows.append(DtypeCost(d, model.weight_bytes, timing, "the loaded model"))
            continue
        if d not in compare:
            note = (f"the checkpoint is stored as {stored}" if stored else "not loaded (computed from the config)")
            rows.append(DtypeCost(d, bytes_per_token(c, d, float_bytes), None, note))
            continue
        other = model_mod.load(model.path, dtype=d, threads=model.threads, max_context=len(ids) + steps + 1)
        rows.append(DtypeCost(d, other.weight_bytes, time_decode(other, ids, steps), "loaded and measured"))
        del other
    return Cost(params, own, model.weight_bytes, timing, rows, model.threads)
