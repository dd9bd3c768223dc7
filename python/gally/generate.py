"""Generation: prompt in, text out. Prefill the prompt, then sample → append one token at a time
until an end-of-sequence token, a stop string, max_new_tokens or the end of the context.

    completion = model.generate("The capital of France is", max_new_tokens=20, temperature=0)
    for chunk in model.generate(prompt, stream=True): print(chunk.text, end="")
    chat = model.start_chat(system="Be brief."); chat.send("Hi").text; chat.send("And?")

Every path runs the same token loop (`_steps`), which yields one Chunk per token: non-streamed
calls join the chunks, so streamed and non-streamed text agree by construction. Per token the loop
does O(1) Python work: one sampler call, one incremental detokenizer step over a short window, and
a stop-string check over the few characters not yet released.

Defaults come from the model folder's generation_config.json (temperature, top_k, top_p, min_p,
repetition_penalty, max_new_tokens; do_sample false means greedy), field by field, else DEFAULTS.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import sampling
from .sampling import Sampler, SamplingParams

# llama.cpp's sampling defaults; mlx-lm's max_tokens.
DEFAULTS = dict(max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
GENERATION_CONFIG_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclasses.dataclass
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives."""
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclasses.dataclass
class Chunk:
    """A piece of a streamed completion: the text its tokens completed (never half a character)."""
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # the last chunk: "stop" or "length"
    usage: Optional[dict] = None         # the last chunk
    timings: Optional[dict] = None       # the last chunk
    logprobs: Optional[list[TokenLogprob]] = None


@dataclasses.dataclass
class Completion:
    text: str                  # without the stop string or end-of-sequence token
    token_ids: list[int]       # every generated token, including the one that ended generation
    finish_reason: str         # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context)
    usage: dict                # prompt_tokens, completion_tokens, total_tokens, cached_tokens
    timings: dict              # ttft_s, prefill_tok_s, decode_tok_s
    logprobs: Optional[list[TokenLogprob]] = None


@dataclasses.dataclass(frozen=True)
class _Options:
    params: SamplingParams
    max_new_tokens: int
    seed: Optional[int]
    stop: tuple[str, ...]
    logprobs: Optional[int]


def resolve_options(model, max_new_tokens=None, temperature=None, top_k=None, top_p=None, min_p=None,
                    repetition_penalty=None, presence_penalty=None, frequency_penalty=None, seed=None, stop=None,
                    logprobs=None) -> _Options:
    """Arguments given, else the model's generation_config.json, else DEFAULTS; all checked."""
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty)
    folder = {k: model.generation_config[k] for k in GENERATION_CONFIG_FIELDS
              if model.generation_config.get(k) is not None}
    if model.generation_config.get("do_sample") is False:
        folder["temperature"] = 0.0
    value = {k: given[k] if given[k] is not None else folder.get(k, DEFAULTS[k]) for k in DEFAULTS}
    n = value.pop("max_new_tokens")
    try:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")
        params = SamplingParams(**value)
    except ValueError as e:
        field = str(e).split()[0]
        if field in folder and given[field] is None:  # the bad value is the model folder's
            raise ValueError(f"{os.path.join(model.path, 'generation_config.json')}: {e}") from None
        raise
    if seed is not None:
        sampling.make_rng(seed)  # checks it
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, (int, np.integer))
                                 or not 0 <= logprobs <= model.config.vocab_size):
        raise ValueError(f"logprobs must be None or an integer in [0, vocab_size], got {logprobs!r}")
    return _Options(params, int(n), seed, _stop_strings(stop), logprobs)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stops)


def _eos_ids(model) -> frozenset[int]:
    """config.json's eos_token_id, generation_config.json's, and the tokenizer's end-of-turn tokens."""
    gen = model.generation_config.get("eos_token_id")
    ids = list(model.config.eos_token_id) + (gen if isinstance(gen, list) else [gen])
    if model.tokenizer is not None:
        ids += list(model.tokenizer.eos_token_ids)
    return frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


def _tokenizer(model):
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model has no tokenizer.json; give the prompt as token ids")
    return model.tokenizer


def _prompt_ids(model, prompt) -> list[int]:
    """Text (encoded without special tokens) or token ids, checked against the vocabulary."""
    if isinstance(prompt, str):
        ids = _tokenizer(model).encode(prompt, add_special_tokens=False)
    else:
        try:
            array = np.asarray(prompt)
        except Exception:
            array = None
        if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError("prompt must be a string or a flat sequence of integer token ids")
        ids = array.astype(np.int64).tolist()
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    if not ids:
        raise ValueError("prompt is empty")
    return ids


def _check_fits(ids: Sequence[int], max_context: int) -> None:
    if len(ids) > max_context:
        raise ValueError(f"prompt of {len(ids)} tokens is longer than the context ({max_context} tokens)")


class _StopText:
    """Generated text on its way out, holding back any tail that could be the start of a stop
    string, so that a stop string split across tokens is never partly released."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that can be released, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        held = self.held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return held[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(held) + 1)) if held.endswith(s[:k])),
                   default=0)
        self.held = held[len(held) - keep:]
        return held[:len(held) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def _steps(model, session, cache: list[int], prompt_ids: list[int], opts: _Options) -> Iterator[Chunk]:
    """The token loop. `cache` lists the tokens whose keys and values `session` holds; the longest
    common prefix with the prompt is kept and only the rest is prefilled (at least one token, for
    its logits). Yields a chunk per generated token, then a last chunk with the finish reason."""
    t0 = time.perf_counter()
    reuse = min(_common_prefix(cache, prompt_ids), len(prompt_ids) - 1) if opts.max_new_tokens else 0
    eos = _eos_ids(model)
    sampler = Sampler(opts.params, model.config.vocab_size, opts.seed, prompt_ids)
    decoder = model.tokenizer.stream(skip_special_tokens=True) if model.tokenizer is not None else None
    text_vocab = model.tokenizer.vocab_size if model.tokenizer is not None else 0
    stop = _StopText(opts.stop)
    generated: list[int] = []
    finish, hit_stop = "length", False
    t_prefill = t_prefilled = t_first = t_last = t0
    try:
        if opts.max_new_tokens:
            session.truncate(reuse)
            del cache[reuse:]
            t_prefill = time.perf_counter()
            logits = session.append(prompt_ids[reuse:])
            cache.extend(prompt_ids[reuse:])
            t_prefilled = time.perf_counter()
        for step in range(opts.max_new_tokens):
            token = sampler(logits)
            generated.append(token)
            t_last = time.perf_counter()
            if step == 0:
                t_first = t_last
            lp = None
            if opts.logprobs is not None:
                chosen, top = sampling.logprobs(logits, token, opts.logprobs)
                lp = [TokenLogprob(token, chosen, top)]
            if token in eos:
                finish = "stop"
                yield Chunk("", [token], logprobs=lp)
                break
            # ids past the tokenizer's vocabulary (padding rows of the embedding) have no text
            piece = decoder.step(token) if decoder is not None and token < text_vocab else ""
            text, hit_stop = stop.feed(piece)
            yield Chunk(text, [token], logprobs=lp)
            if hit_stop:
                finish = "stop"
                break
            if step + 1 == opts.max_new_tokens or session.position == session.max_context:
                break
            logits = session.append(token)
            cache.append(token)
    finally:
        if session.position != len(cache):  # interrupted between an append and its bookkeeping
            session.truncate(min(session.position, len(cache)))
            del cache[session.position:]
    tail = ""
    if not hit_stop and decoder is not None:  # release what was pending: an incomplete character, a stop prefix
        tail, hit_stop = stop.feed(decoder.flush())
        tail += "" if hit_stop else stop.flush()
        finish = "stop" if hit_stop else finish
    prefilled = len(prompt_ids) - reuse if opts.max_new_tokens > 0 else 0
    usage = dict(prompt_tokens=len(prompt_ids), completion_tokens=len(generated),
                 total_tokens=len(prompt_ids) + len(generated), cached_tokens=reuse if prefilled else 0)
    timings = dict(ttft_s=t_first - t0 if generated else 0.0,
                   prefill_tok_s=prefilled / (t_prefilled - t_prefill) if t_prefilled > t_prefill else 0.0,
                   decode_tok_s=(len(generated) - 1) / (t_last - t_first) if len(generated) > 1 and t_last > t_first else 0.0)
    yield Chunk(tail, [], finish_reason=finish, usage=usage, timings=timings)


def _collect(chunks: Iterator[Chunk], want_logprobs: bool) -> Completion:
    texts, ids, lps, last = [], [], [], None
    for c in chunks:
        texts.append(c.text)
        ids += c.token_ids
        if c.logprobs:
            lps += c.logprobs
        last = c
    return Completion("".join(texts), ids, last.finish_reason, last.usage, last.timings,
                      lps if want_logprobs else None)


def _run(model, session, cache, prompt_ids, opts, stream: bool):
    chunks = _steps(model, session, cache, prompt_ids, opts)
    return chunks if stream else _collect(chunks, opts.logprobs is not None)


def generate(model, prompt: Union[str, Sequence[int]], max_new_tokens: Optional[int] = None,
             temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
             min_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
             presence_penalty: Optional[float] = None, frequency_penalty: Optional[float] = None,
             seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
             logprobs: Optional[int] = None, stream: bool = False) -> Union[Completion, Iterator[Chunk]]:
    """Continues `prompt` (text, tokenized without special tokens, or token ids).

    Sampling: repetition_penalty (HF: over prompt + generated tokens), presence_penalty and
    frequency_penalty (OpenAI: over generated tokens), temperature (0: greedy), top_k (0: off),
    top_p (1: off), min_p (0: off); seed makes it reproducible. None takes the model folder's
    generation_config.json value, else DEFAULTS. Stops at an end-of-sequence token, at any of
    the `stop` strings (left out of the text), or after max_new_tokens. logprobs=N reports each
    token's log-probability and the N likeliest alternatives under the model's own distribution.
    stream=True returns an iterator of Chunk; the last carries finish_reason, usage and timings.
    """
    opts = resolve_options(model, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                    presence_penalty, frequency_penalty, seed, stop, logprobs)
    ids = _prompt_ids(model, prompt)
    _check_fits(ids, model.max_context)
    session = model.session(min(model.max_context, len(ids) + opts.max_new_tokens))
    return _run(model, session, [], ids, opts, stream)


def _render_chat(model, messages) -> list[int]:
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    tok = _tokenizer(model)
    return tok.encode(tok.apply_chat_template(list(messages), add_generation_prompt=True), add_special_tokens=False)


def chat(model, messages: Sequence[dict], stream: bool = False, **kwargs) -> Union[Completion, Iterator[Chunk]]:
    """Renders `messages` with the model's chat template (adding the assistant header) and
    generates the reply, which ends at the end-of-turn token. Takes generate()'s arguments."""
    opts = resolve_options(model, **kwargs)
    ids = _render_chat(model, messages)
    _check_fits(ids, model.max_context)
    session = model.session(min(model.max_context, len(ids) + opts.max_new_tokens))
    return _run(model, session, [], ids, opts, stream)


class Conversation:
    """A chat that keeps its KV cache between turns: each send() renders the whole history, keeps
    the cached tokens it shares with it, and prefills only the rest (usage["cached_tokens"])."""

    def __init__(self, model, system: Optional[str] = None):
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string, got {type(system).__name__}")
        _tokenizer(model)
        self.model = model
        self.system = system
        self.messages: list[dict] = []
        self._session = None
        self._cache: list[int] = []  # the tokens whose keys and values the session holds
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (keeping the system prompt). The cache stays: the next turn
        reuses whatever prefix it still shares, such as the system prompt."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, stream: bool = False, **kwargs) -> Union[Completion, Iterator[Chunk]]:
        """Adds a user message and generates the reply (generate()'s arguments). The exchange
        enters the history when the reply ends; a stream closed early keeps the text it gave."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        opts = resolve_options(self.model, **kwargs)
        turn = self.messages + [{"role": "user", "content": text}]
        ids = _render_chat(self.model, turn)
        if self._session is None:
            self._session = self.model.session()
        _check_fits(ids, self._session.max_context)
        chunks = self._turn(turn, ids, opts)
        return chunks if stream else _collect(chunks, opts.logprobs is not None)

    def _turn(self, turn: list[dict], ids: list[int], opts: _Options) -> Iterator[Chunk]:
        reply = []
        try:
            for chunk in _steps(self.model, self._session, self._cache, ids, opts):
                reply.append(chunk.text)
                yield chunk
        finally:
            self.messages = turn + [{"role": "assistant", "content": "".join(reply)}]
