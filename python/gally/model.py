"""gally.load and the objects it returns: Model (weights + config + tokenizer) and Session
(one sequence's KV cache). Tokens in, logits out; everything per token runs in C++."""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence, Union

import numpy as np

from . import _core, config as config_mod, safetensors_file, sources
from .config import Config

# Sessions allocate their KV cache up front, so the default context is capped for laptop memory:
# 4096 tokens cost 46 MB of f32 cache for SmolLM2-135M and 2 GB for Llama-3-8B.
MAX_CONTEXT_CAP = 4096

DTYPES = ("f32", "bf16", "f16", "int8", "int4")
QUANTIZED = ("int8", "int4")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's FMA units)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "core_id") as f:
                core = f.read().strip()
            with open(base + "physical_package_id") as f:
                package = f.read().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _token_array(token_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be a flat sequence of integers, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError("token_ids is empty")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"token id {int(ids[i])} at index {i} is outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int32, copy=False)


class Session:
    """One sequence: its KV cache and position. append() runs new tokens and returns the logits
    of the last one. Sessions of one model are independent and may run in parallel threads."""

    def __init__(self, model: "Model", max_context: int):
        self.model = model
        self._core = _core.Session(model._core, max_context)
        self._lock = threading.Lock()

    @property
    def position(self) -> int:
        """Tokens in the cache: the position the next token will take."""
        return self._core.position

    @property
    def max_context(self) -> int:
        return self._core.max_context

    def append(self, token_ids: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
        """Runs token_ids after the cached ones; returns float32 logits [vocab_size] of the last."""
        return self.forward(token_ids)

    def forward(self, token_ids, *, all_logits: bool = False, hidden_states: Optional[np.ndarray] = None,
                attentions: Optional[np.ndarray] = None, mlp_activations: Optional[np.ndarray] = None) -> np.ndarray:
        """append() with options: all_logits returns [n, vocab_size]; hidden_states (float32
        [layers + 1, n, hidden]), attentions (float32 [layers, heads, n, position + n], zeroed) and
        mlp_activations (float32 [layers, n, intermediate]) are filled when given: the embeddings
        then each layer's output; each head's softmax; each layer's silu(gate) ⊙ up."""
        cfg = self.model.config
        ids = _token_array(token_ids, cfg.vocab_size)
        n = len(ids)
        if self.position + n > self.max_context:
            raise ValueError(f"sequence of {self.position + n} tokens ({self.position} cached + {n} new) "
                             f"exceeds max_context {self.max_context}")
        for name, buf in (("hidden_states", hidden_states), ("attentions", attentions),
                          ("mlp_activations", mlp_activations)):
            if buf is not None and (not isinstance(buf, np.ndarray) or buf.dtype != np.float32
                                    or not buf.flags.c_contiguous or not buf.flags.writeable):
                raise ValueError(f"{name} must be a writable C-contiguous float32 numpy array")
        logits = np.empty((n, cfg.vocab_size) if all_logits else cfg.vocab_size, dtype=np.float32)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this session is already running in another thread; use one session per thread")
        try:
            self._core.forward(ids, logits, all_logits, hidden_states, attentions, mlp_activations)
        finally:
            self._lock.release()
        return logits

    def truncate(self, position: int) -> None:
        """Forgets every cached token from `position` on, so generation can continue from there."""
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not 0 <= position <= self.position:
            raise ValueError(f"position must be an integer in [0, {self.position}], got {position!r}")
        self._core.truncate(int(position))

    def reset(self) -> None:
        self._core.truncate(0)


_NOT_LOADED = object()


class Model:
    """A loaded model. Weights are views into the mapped files unless a dtype conversion was asked for."""

    def __init__(self, path: str, config: Config, core, max_context: int, tokenizer=None,
                 generation_config: Optional[dict] = None, tokenizer_folder: Optional[str] = None):
        self.path = path
        self.config = config
        self._core = core
        self.max_context = max_context
        # tokenizer_folder: loaded on first use instead, so that a model driven by token ids
        # never holds it (~27 MB of heap for SmolLM2's 49k-entry tokenizer.json)
        self._tokenizer = _NOT_LOADED if tokenizer is None and tokenizer_folder else tokenizer
        self._tokenizer_folder = tokenizer_folder
        self.generation_config = generation_config or {}

    @property
    def tokenizer(self):
        """The model's Tokenizer (gally.tokenizer), or None without a tokenizer.json."""
        if self._tokenizer is _NOT_LOADED:
            self._tokenizer = _load_tokenizer(self._tokenizer_folder)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    @property
    def threads(self) -> int:
        return self._core.threads

    @property
    def dtype(self) -> str:
        """The compute dtype of the weight matrices ("f32", "bf16", "f16", or "mixed")."""
        kinds = self._core.dtypes
        return next(iter(kinds)) if len(kinds) == 1 else "mixed"

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one token's forward pass reads."""
        return self._core.weight_bytes

    @property
    def copied_bytes(self) -> int:
        """Bytes converted at load; 0 when every weight is a view into the mapped file."""
        return self._core.copied_bytes

    def unembed(self, hidden: np.ndarray) -> np.ndarray:
        """float32 logits [n, vocab_size] = lm_head(RMSNorm(hidden)) for residual-stream vectors
        hidden [n, hidden_size]: the prediction step alone, as the forward pass makes it. Applied to
        Session.forward's recorded hidden states it is the logit lens."""
        hidden = np.asarray(hidden, dtype=np.float32)
        if hidden.ndim == 1:
            hidden = hidden[None]
        if hidden.ndim != 2 or hidden.shape[1] != self.config.hidden_size:
            raise ValueError(f"hidden must have shape [n, {self.config.hidden_size}], got {list(hidden.shape)}")
        if not np.isfinite(hidden).all():
            raise ValueError("hidden holds NaN or infinite values")
        return self._core.unembed(np.ascontiguousarray(hidden))

    def session(self, max_context: Optional[int] = None) -> Session:
        return Session(self, self.max_context if max_context is None else _check_positive_int(max_context, "max_context"))

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits [len(token_ids), vocab_size], computed in a fresh context."""
        ids = _token_array(token_ids, self.config.vocab_size)
        if len(ids) > self.max_context:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds max_context {self.max_context}")
        return self.session(len(ids)).forward(ids, all_logits=True)

    def generate(self, prompt, **kwargs):
        from .generate import generate
        return generate(self, prompt, **kwargs)

    def chat(self, messages, **kwargs):
        from .generate import chat
        return chat(self, messages, **kwargs)

    def start_chat(self, system: Optional[str] = None):
        from .generate import Conversation
        return Conversation(self, system=system)

    def explain(self, prompt, **kwargs):
        """The steps of "How LLMs Work" on this model for one prompt (gally.explain.explain):
        an Explanation with the data as NumPy arrays, .summary() and .to_html(path)."""
        from .explain import explain
        return explain(self, prompt, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.path!r}, {c.architecture}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"dtype={self.dtype}, threads={self.threads})")


def load(source: Optional[str] = None, dtype: Optional[str] = None, threads: Optional[int] = None,
         max_context: Optional[int] = None) -> Model:
    """Loads a model: a Hugging Face folder, a .gguf file, or an alias (default: smollm2-135m-instruct).

    dtype: None keeps the stored dtype; "f32", "bf16" or "f16" converts once at load; "int8" or
    "int4" quantizes a float checkpoint at load (`gally quantize` stores one, loaded zero-copy).
    threads: default, the physical cores. max_context: default, the config's
    max_position_embeddings capped at 4096 tokens (the KV cache is allocated per session).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    threads = physical_cores() if threads is None else _check_positive_int(threads, "threads")
    folder = sources.resolve(source, None if dtype in QUANTIZED else dtype)
    cfg = config_mod.read(folder)
    if max_context is None:
        max_context = min(cfg.max_position_embeddings, MAX_CONTEXT_CAP)
        if cfg.sliding_window:
            max_context = min(max_context, cfg.sliding_window)
    else:
        max_context = _check_positive_int(max_context, "max_context")
    tensors = safetensors_file.open_checkpoint(folder)
    tensors, dtype = _quantization(folder, tensors, dtype)
    cc = _core.ModelConfig()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "qkv_bias", "o_bias", "mlp_bias"):
        setattr(cc, key, getattr(cfg, key))
    cc.inv_freq = cfg.inv_freq().tolist()
    cc.attention_scale = float(cfg.head_dim) ** -0.5
    cc.sliding_window = cfg.sliding_window or 0
    try:
        core = _core.Model(cc, tensors, dtype or "", threads)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    return Model(folder, cfg, core, max_context, tokenizer_folder=folder,
                 generation_config=_load_generation_config(folder))


def _quantization(folder: str, tensors: dict, dtype: Optional[str]) -> tuple[dict, Optional[str]]:
    """Checks a quantized checkpoint's format (tag, scales, group sizes), or quantizes a float
    one when dtype asks for int8/int4. Returns the tensors and the dtype for the float ones."""
    from . import quantize

    stored = quantize.read_checkpoint(folder)
    if stored is not None:
        if dtype not in (None, stored.quant_type):
            raise ValueError(f"{folder}: the checkpoint is quantized to {stored.quant_type}; "
                             f"load it with dtype=None or {stored.quant_type!r}, not {dtype!r}")
        return tensors, None
    if dtype not in QUANTIZED:
        return tensors, dtype
    arrays = {name: (t.dtype, t.numpy()) for name, t in tensors.items()}
    out, _ = quantize.quantize_tensors(arrays, dtype)
    return {name: tensors[name] if name in tensors and out[name][1] is arrays[name][1]
            else _core.tensor_from_numpy(name, dt, a) for name, (dt, a) in out.items()}, None


def _load_tokenizer(folder: str):
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    from .tokenizer import Tokenizer
    return Tokenizer.from_folder(folder)


def _load_generation_config(folder: str) -> dict:
    import json
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
