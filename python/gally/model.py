"""gally.load and the objects it returns: Model (weights + config + tokenizer) and Session
(one sequence's KV cache). Tokens in, logits out; everything per token runs in C++."""

from __future__ import annotations

import os
import threading
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _core, config as config_mod, safetensors_file, sources
from .config import Config

if TYPE_CHECKING:  # for the annotations only: generate and text import this module
    from .generate import Conversation
    from .text import Chunk, Completion

# The KV cache pool's default share of the machine's memory (load's kv_cache_bytes).
KV_CACHE_SHARE = 0.25

# Threads per model (csrc/model.h): far more than any CPU's cores; each started thread reserves a stack.
MAX_THREADS = _core.MAX_THREADS
# Tokens one session may hold (csrc/model.h, ConfigLimits), whatever its KV cache's size.
MAX_CONTEXT = _core.config_limits()["max_context"]

DTYPES = ("f32", "bf16", "f16", "int8", "int4", "int4-v1")
KV_DTYPES = ("f32", "bf16", "f16", "int8")
QUANTIZED = ("int8", "int4", "int4-v1")  # int4-v1: gally-quant version 1's int4 (llama.cpp's Q4_1 layout)


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


def physical_memory() -> int:
    """Bytes of physical memory, or 8 GiB where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def token_array(token_ids, vocab_size: int, name: str = "token_ids") -> np.ndarray:
    """token_ids as a fresh int32 array, checked: a flat, non-empty sequence of integers inside the
    vocabulary. The one check of token ids on the way in (the C++ checks again, as a last line)."""
    try:
        ids = np.array(token_ids)  # a copy: the caller may change its array while a pass runs
    except (ValueError, TypeError):
        ids = None
    if ids is None or ids.dtype == object:
        raise ValueError(f"{name} must be a flat sequence of integer token ids")
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of integers, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name} is empty")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        i = int(bad[0])
        where = "" if name == "token_ids" else f" of {name}"
        raise ValueError(f"token id {int(ids[i])} at index {i}{where} is outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int32)


def _check_max_context(max_context) -> int:
    max_context = _check_positive_int(max_context, "max_context")
    if max_context > MAX_CONTEXT:
        raise ValueError(f"max_context must be at most {MAX_CONTEXT}, got {max_context}")
    return max_context


def check_context(position: int, n: int, max_context: int, what: str = "sequence") -> None:
    """The one check that n more tokens after `position` fit in `max_context`."""
    if position + n > max_context:
        cached = f" ({position} cached + {n} new)" if position else ""
        raise ValueError(f"{what} of {position + n} tokens{cached} is longer than the context: it exceeds max_context "
                         f"{max_context}; load the model with a larger one (gally.load(max_context=N), or -c N on "
                         f"the command line)")


class _Held:
    """A lock this thread acquired, released on leaving a with block."""
    __slots__ = ("lock",)

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()


class Session:
    """One sequence: its KV cache and position. append() runs new tokens and returns the logits
    of the last one. Sessions of one model are independent and may run in parallel threads; one
    session is used by one thread at a time (a second one gets a RuntimeError)."""

    def __init__(self, model: "Model", max_context: int, _sequence=None):
        self.model = model
        self._seq = _sequence if _sequence is not None else _core.Sequence(model._core, model._pool, max_context)
        self._runner = None  # made at the first pass: a forked session that is never run costs no scratch
        self._lock = threading.Lock()

    def _locked(self) -> "_Held":
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this session is already running in another thread; use one session per thread")
        return _Held(self._lock)

    @property
    def position(self) -> int:
        """Tokens in the cache: the position the next token will take (read after any forward
        pass another thread is running)."""
        with self._lock:
            return self._seq.position

    @property
    def max_context(self) -> int:
        return self._seq.max_context

    def append(self, token_ids: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
        """Runs token_ids after the cached ones; returns float32 logits [vocab_size] of the last."""
        return self.forward(token_ids)

    def forward(self, token_ids: Union[int, Sequence[int], np.ndarray], *, all_logits: bool = False,
                hidden_states: Optional[np.ndarray] = None,
                attentions: Optional[np.ndarray] = None, mlp_activations: Optional[np.ndarray] = None,
                input_squares: Optional[np.ndarray] = None) -> np.ndarray:
        """append() with options: all_logits returns [n, vocab_size]; hidden_states (float32
        [layers + 1, n, hidden]), attentions (float32 [layers, heads, n, position + n], zeroed) and
        mlp_activations (float32 [layers, n, intermediate]) are filled when given: the embeddings
        then each layer's output; each head's softmax; each layer's silu(gate) ⊙ up.
        input_squares (float64 [layers, width]) is added to: Σ x² over the tokens for each column
        of a layer's four matmul inputs, laid out as quantize.input_columns(config) says (the
        statistics quantize.calibrate collects)."""
        cfg = self.model.config
        ids = token_array(token_ids, cfg.vocab_size)
        for name, buf, dtype in (("hidden_states", hidden_states, np.float32), ("attentions", attentions, np.float32),
                                 ("mlp_activations", mlp_activations, np.float32),
                                 ("input_squares", input_squares, np.float64)):
            if buf is not None and (not isinstance(buf, np.ndarray) or buf.dtype != dtype
                                    or not buf.flags.c_contiguous or not buf.flags.writeable):
                raise ValueError(f"{name} must be a writable C-contiguous {np.dtype(dtype).name} numpy array")
        logits = np.empty((len(ids), cfg.vocab_size) if all_logits else cfg.vocab_size, dtype=np.float32)
        with self._locked():
            check_context(self._seq.position, len(ids), self._seq.max_context)
            if self._runner is None:
                self._runner = _core.Runner(self.model._core, min(self._seq.max_context, MAX_PASS_TOKENS))
            try:
                self._runner.forward(self._seq, ids, logits, all_logits, hidden_states, attentions, mlp_activations,
                                     input_squares)
            except MemoryError:  # std::bad_alloc: say what was asked of memory, not just that it failed
                position = self._seq.position
                raise MemoryError(f"out of memory running {len(ids)} tokens after {position}: this sequence's KV cache "
                                  f"would hold {(position + len(ids)) * self.model.kv_bytes_per_token:,} bytes "
                                  f"({self.model.kv_bytes_per_token:,} a token); give a smaller max_context or "
                                  f"kv_cache_bytes") from None
        return logits

    def truncate(self, position: int) -> None:
        """Forgets every cached token from `position` on, so generation can continue from there."""
        with self._locked():
            if (isinstance(position, bool) or not isinstance(position, (int, np.integer))
                    or not 0 <= position <= self._seq.position):
                raise ValueError(f"position must be an integer in [0, {self._seq.position}], got {position!r}")
            self._seq.truncate(int(position))

    def reset(self) -> None:
        """Forgets the whole cache."""
        self.truncate(0)

    def fork(self, position: Optional[int] = None) -> "Session":
        """A new session holding this one's first `position` tokens (default: all), sharing their
        KV cache blocks until either writes there: a common prefix is computed once."""
        with self._locked():
            position = self._seq.position if position is None else position
            if (isinstance(position, bool) or not isinstance(position, (int, np.integer))
                    or not 0 <= position <= self._seq.position):
                raise ValueError(f"position must be an integer in [0, {self._seq.position}], got {position!r}")
            return Session(self.model, self._seq.max_context, _sequence=self._seq.fork(int(position)))


class Runner:
    """Forward passes that extend several sessions at once: each weight is read once per pass for
    all of them. The decode steps of a batch give each session exactly what it would get alone."""

    def __init__(self, model: "Model", max_tokens: int = None):
        self.model = model
        self.max_tokens = MAX_PASS_TOKENS if max_tokens is None else _check_positive_int(max_tokens, "max_tokens")
        self._core = _core.Runner(model._core, self.max_tokens)

    @property
    def gemm_min_tokens(self) -> int:
        """A prompt's slices of fewer tokens take the row-wise kernels (csrc/kernels/kernels.h): 4 in a
        quantized model, 16 or 17 in a float one, by kernel set."""
        return self._core.gemm_min_tokens

    def forward(self, sessions: Sequence[Session], token_ids: Sequence) -> np.ndarray:
        """Appends token_ids[i] to sessions[i]; returns float32 logits [len(sessions), vocab_size],
        each session's last token. One session may bring more than max_tokens tokens; several
        must fit in one pass together."""
        vocab = self.model.config.vocab_size
        ids = [token_array(t, vocab, f"token_ids[{i}]") for i, t in enumerate(token_ids)]
        if len(ids) != len(sessions) or not sessions:
            raise ValueError("give one list of token ids per session, for at least one session")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in one batch")
        for i, (s, t) in enumerate(zip(sessions, ids)):
            if s.model is not self.model:
                raise ValueError(f"session {i} belongs to another model")
            check_context(s.position, len(t), s.max_context)
        return self.forward_checked(sessions, np.concatenate(ids), [len(t) for t in ids])

    def forward_checked(self, sessions: Sequence[Session], token_ids, counts: Sequence[int]) -> np.ndarray:
        """forward() for a caller that has checked its arguments (the scheduler: prompts checked
        once, sampled tokens valid by construction): token_ids flat, counts[i] of them for
        sessions[i]. The C++ still checks ids and contexts, as a last line of defence."""
        logits = np.empty((len(sessions), self.model.config.vocab_size), dtype=np.float32)
        held = []
        try:
            for s in sessions:
                held.append(s._locked())
            self._core.forward_batch([s._seq for s in sessions], np.asarray(token_ids, np.int32),
                                     np.asarray(counts, np.int32), logits)
        finally:
            for h in held:
                h.lock.release()
        return logits


# Most tokens one forward pass takes; a longer input goes in several passes.
MAX_PASS_TOKENS = 512


_NOT_LOADED = object()


class Model:
    """A loaded model. Weights are views into the mapped files unless a dtype conversion was asked for."""

    def __init__(self, path: str, config: Config, core, max_context: int, kv_cache_bytes: int,
                 generation_config: Optional[dict] = None, tokenizer_folder: Optional[str] = None,
                 kv_dtype: str = "f32"):
        self.path = path
        self.config = config
        self._core = core
        self.max_context = max_context
        # The KV cache of every sequence of this model comes from this pool, block by block.
        blocks = kv_cache_bytes // _core.KvPool.bytes_per_block(core, kv_dtype)
        self._pool = _core.KvPool(core, max(1, blocks), kv_dtype)
        # tokenizer_folder: loaded on first use, so that a model driven by token ids never holds it
        # (~27 MB of heap for SmolLM2's 49k-entry tokenizer.json)
        self._tokenizer = _NOT_LOADED if tokenizer_folder else None
        self._tokenizer_folder = tokenizer_folder
        self.generation_config = generation_config or {}

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type: "f32", "bf16", "f16" or "int8"."""
        return self._pool.dtype

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one sequence holds (keys and values of every layer)."""
        return self._pool.block_bytes // self._pool.block_rows

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache pool's cap: all sequences of this model together hold at most this much."""
        return self._pool.max_blocks * self._pool.block_bytes

    def kv_cache_usage(self) -> dict:
        """The pool now: bytes held by sequences (in_use), mapped in all (allocated), and the cap."""
        return {"in_use": self._pool.in_use * self._pool.block_bytes,
                "allocated": self._pool.allocated * self._pool.block_bytes, "capacity": self.kv_cache_bytes,
                "block_tokens": self._pool.block_rows}

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
        """The compute dtype of the weight matrices ("f32", "bf16", "f16", "int8", "int4", "int4-v1",
        or "mixed"); "int4" also when some layer matrices are int8, as `gally quantize --to int4` keeps
        v_proj and some down_proj."""
        kinds = set(self._core.dtypes)
        if kinds == {"int4", "int8"}:
            return "int4"
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
        """A new, empty sequence of at most max_context tokens (default: the model's), whose KV
        cache grows from the model's pool as it fills."""
        max_context = self.max_context if max_context is None else _check_max_context(max_context)
        _check_fits_memory(max_context, self.kv_bytes_per_token, self.kv_dtype)
        if max_context * self.kv_bytes_per_token > self.kv_cache_bytes:
            raise ValueError(f"max_context {max_context} needs {_mib(max_context * self.kv_bytes_per_token)} of KV "
                             f"cache, more than the model's whole pool of {_mib(self.kv_cache_bytes)}; load it with a "
                             f"larger kv_cache_bytes or a smaller max_context")
        return Session(self, max_context)

    def runner(self, max_tokens: Optional[int] = None) -> Runner:
        """A Runner: forward passes over batches of this model's sessions, up to max_tokens
        tokens each (default 512)."""
        return Runner(self, max_tokens)

    def logits(self, token_ids: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """float32 logits [len(token_ids), vocab_size], computed in a fresh context."""
        ids = token_array(token_ids, self.config.vocab_size)
        check_context(0, len(ids), self.max_context)
        return self.session(len(ids)).forward(ids, all_logits=True)

    def generate(self, prompt: Union[str, Sequence[int], Sequence[Union[str, Sequence[int], dict]]], *,
                 max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
                 frequency_penalty: Optional[float] = None, seed: Optional[int] = None,
                 stop: Union[str, Sequence[str], None] = None, logprobs: Optional[int] = None,
                 stream: bool = False, max_tokens: Optional[int] = None, batch_size: Optional[int] = None,
                 ignore_eos: Optional[bool] = None, progress: Optional[Callable[[int, int], None]] = None
                 ) -> Union["Completion", list["Completion"], Iterator["Chunk"]]:
        """Continues a prompt, or a batch of prompts decoded together.

        prompt: text (tokenized without special tokens), a flat list of token ids, or a list of
            prompts — texts, token-id lists, or dicts {"prompt": ..., <option>: ...} whose options
            override this call's for that prompt. A batch's greedy outputs equal each prompt's alone.
        max_new_tokens (alias max_tokens): most tokens to generate; -1: until the context is full.
        temperature: 0 is greedy. top_k (0: off), top_p (1: off), min_p (0: off) filter the
            candidates. repetition_penalty (HF, over prompt and generated tokens; 1: off),
            presence_penalty and frequency_penalty (OpenAI, over generated tokens).
        seed: makes sampling reproducible (each prompt of a batch has its own random stream).
        stop: a string or list of strings that end generation, left out of the text.
        logprobs: N, to report each token's log-probability and the N likeliest alternatives.
        ignore_eos: keep generating past end-of-sequence tokens (for benchmarks).
        stream: return an iterator of Chunk (text, token_ids, logprobs; the last one of each prompt
            carries finish_reason, usage and timings; a batch's chunks carry their prompt's index).
        batch_size: prompts decoded at once (default: all of them, at most 16; the others wait).
        progress: a function progress(done, total) called as each chunk of a long prompt is
            computed (for a progress bar).

        An option left None takes the model folder's generation_config.json value, else llama.cpp's
        default (gally.options). Returns a Completion (text, token_ids, finish_reason "stop" or
        "length", usage, timings, logprobs), or a list of them for a batch.
        Raises ValueError naming the option or prompt that is wrong, before generating anything.
        """
        from .generate import generate
        return generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                        stop=stop, logprobs=logprobs, stream=stream, max_tokens=max_tokens, batch_size=batch_size,
                        ignore_eos=ignore_eos, progress=progress)

    def chat(self, messages: Sequence[dict], *, max_new_tokens: Optional[int] = None,
             temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
             min_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
             presence_penalty: Optional[float] = None, frequency_penalty: Optional[float] = None,
             seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None, logprobs: Optional[int] = None,
             stream: bool = False, max_tokens: Optional[int] = None, ignore_eos: Optional[bool] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> Union["Completion", Iterator["Chunk"]]:
        """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content":
        text}, ...]), rendered with the model's chat template and its assistant header; the reply
        ends at the end-of-turn token. Options as generate(). Returns a Completion, or with
        stream=True an iterator of Chunk. Raises ValueError for malformed messages or a model
        without a chat template."""
        from .generate import chat
        return chat(self, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, seed=seed, stop=stop, logprobs=logprobs, stream=stream,
                    max_tokens=max_tokens, ignore_eos=ignore_eos, progress=progress)

    def start_chat(self, system: Optional[str] = None) -> "Conversation":
        """A Conversation (gally.generate.Conversation) that keeps its KV cache between turns:
        conversation.send(text, **options) returns the reply and only computes the new turn."""
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
         max_context: Optional[int] = None, kv_cache_bytes: Optional[int] = None,
         kv_dtype: Optional[str] = None, force_context: bool = False, check_tensors: bool = False) -> Model:
    """Loads a model: a Hugging Face folder, a .gguf file, or an alias (default: smollm2-135m-instruct).

    dtype: None keeps the stored dtype; "f32", "bf16" or "f16" converts a folder's weights at load;
    "int8" or "int4" quantizes a float folder's weights at load (`gally quantize` stores such a
    folder, which loads zero-copy); "int4-v1" is the int4 of gally-quant version 1 (llama.cpp's Q4_1
    layout, 5 bits per weight), whose stored checkpoints load with dtype "int4" too. A .gguf file or
    an alias is converted to dtype once, into the cache (GALLY_HOME/models; `gally cache` lists it),
    and loaded from there zero-copy afterwards.
    threads: default, the physical cores. max_context: the most tokens a sequence may hold;
    default, the config's max_position_embeddings (and sliding_window, where smaller), at most
    what the KV cache pool holds. kv_cache_bytes: the most memory the KV caches of all sequences
    together hold; default, a quarter of the machine's memory. A sequence's cache grows with the
    tokens it holds. kv_dtype: the KV cache's element type, "f32", "bf16" or "f16" (half the
    bytes per token), or "int8" (int8 codes under a bf16 scale per 32: 17/64 of f32's bytes);
    default f32 for f32 weights, else f16. A max_context past the positions the
    model was trained for (Config.trained_context) is refused: its output degrades there; with
    force_context it is allowed, with a warning. threads is at most MAX_THREADS, max_context at
    most MAX_CONTEXT. check_tensors: reads every weight once and raises ValueError naming the first
    tensor that holds a NaN or an infinity (as llama.cpp's --check-tensors); off by default, since
    it reads the whole file at load.

    Returns a Model. Raises FileNotFoundError for a missing source, ValueError for a bad argument or
    a corrupt or unsupported checkpoint (the message names the file and tensor or field).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    threads = physical_cores() if threads is None else _check_positive_int(threads, "threads")
    if threads > MAX_THREADS:
        raise ValueError(f"threads must be at most {MAX_THREADS}, got {threads}")
    if kv_cache_bytes is None:
        kv_cache_bytes = int(KV_CACHE_SHARE * physical_memory())
    kv_cache_bytes = _check_positive_int(kv_cache_bytes, "kv_cache_bytes")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    folder = sources.resolve(source, dtype)  # a GGUF source: its cached conversion to dtype, int8/int4 included
    cfg = config_mod.read(folder)
    explicit = max_context is not None
    if explicit:
        max_context = _check_max_context(max_context)
        if max_context > cfg.trained_context:
            beyond = (f"max_context {max_context} is past the {cfg.trained_context} positions {folder} was trained "
                      f"for (max_position_embeddings and its RoPE scaling); beyond them its output degrades")
            if not force_context:
                raise ValueError(beyond + "; pass force_context=True (--force-context) to run there anyway")
            warnings.warn(beyond, stacklevel=2)
    else:
        max_context = min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings, MAX_CONTEXT)
    tensors = safetensors_file.open_checkpoint(folder)
    if check_tensors:
        safetensors_file.check_finite(tensors, folder)
    tensors, dtype = _quantization(folder, tensors, dtype, threads)
    try:
        core = _core.Model(cfg.core_config(), tensors, dtype or "", threads)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    if kv_dtype is None:  # f16 halves the cache; measured on SmolLM2, perplexity moves by <= 0.04% (README)
        kv_dtype = "f32" if set(core.dtypes) == {"f32"} else "f16"
    model = Model(folder, cfg, core, max_context, kv_cache_bytes, tokenizer_folder=folder,
                  generation_config=_load_generation_config(folder), kv_dtype=kv_dtype)
    positions = model.kv_cache_bytes // model.kv_bytes_per_token  # what the whole pool holds
    if explicit:
        _check_fits_memory(max_context, model.kv_bytes_per_token, model.kv_dtype)
    if max_context > positions:
        if explicit:
            raise ValueError(f"max_context {max_context} needs {_mib(max_context * model.kv_bytes_per_token)} of KV "
                             f"cache, more than kv_cache_bytes allows ({_mib(model.kv_cache_bytes)}); give a larger "
                             f"kv_cache_bytes or a smaller max_context")
        model.max_context = positions
    return model


def _check_fits_memory(max_context: int, bytes_per_token: int, kv_dtype: str) -> None:
    """Refuses a context whose KV cache alone, for one sequence, exceeds the machine's memory: it
    could never be filled (the cache grows as tokens come, so a smaller one costs nothing up front)."""
    needed, memory = max_context * bytes_per_token, physical_memory()
    if needed > memory:
        raise ValueError(f"max_context {max_context} needs {needed:,} bytes ({needed / 2**30:,.1f} GiB) of KV cache "
                         f"for one sequence ({bytes_per_token:,} bytes a token), more than this machine's "
                         f"{memory:,} bytes ({memory / 2**30:,.1f} GiB) of memory; give a smaller max_context (-c)"
                         + (", or kv_dtype f16 for half the bytes (int8: about a quarter)" if kv_dtype == "f32"
                            else ", or kv_dtype int8 for about half the bytes" if kv_dtype in ("bf16", "f16") else ""))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _quantization(folder: str, tensors: dict, dtype: Optional[str], threads: int) -> tuple[dict, Optional[str]]:
    """Checks a quantized checkpoint's format (tag, scales, group sizes), or quantizes a float
    one when dtype asks for int8/int4 (int4 calibrated as `gally quantize` does, on the model's
    int8 quantization run with `threads`). Returns the tensors and the dtype for the float ones."""
    from . import quantize

    stored = quantize.read_checkpoint(folder)
    if stored is not None:
        if dtype not in (None, stored.quant_type) and not (dtype == "int4" and stored.quant_type == "int4-v1"):
            raise ValueError(f"{folder}: the checkpoint is quantized to {stored.quant_type}; "
                             f"load it with dtype=None or {stored.quant_type!r}, not {dtype!r}")
        return tensors, None
    if dtype not in QUANTIZED:
        return tensors, dtype
    arrays = {name: (t.dtype, t.numpy()) for name, t in tensors.items()}
    calibration = quantize.calibrate_source(folder, threads=threads) if dtype == "int4" else None
    out, _ = quantize.quantize_tensors(arrays, dtype, calibration=calibration)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
