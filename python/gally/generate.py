"""Generation: prompts in, text out, on the token layer (scheduler.py) and the text layer (text.py).

    completion = model.generate("The capital of France is", max_new_tokens=20, temperature=0)
    for chunk in model.generate(prompt, stream=True): print(chunk.text, end="")
    completions = model.generate(["Hi", "Hello"], max_new_tokens=20)     # one batch, decoded together
    chat = model.start_chat(system="Be brief."); chat.send("Hi").text; chat.send("And?")

Every path runs the same loop (_run): the scheduler steps all of a call's prompts together, one
forward pass per step, and each prompt's tokens go through its TextStream. Non-streamed calls join
the chunks, so streamed and non-streamed text agree by construction. A prompt's greedy output is
the same alone or in a batch: each sequence's logits are exactly what it gets alone.

Options (options.py) come from the arguments, else the model folder's generation_config.json
(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens; do_sample false means
greedy), else llama.cpp's defaults.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import options as options_mod
from .options import DEFAULTS, GenerationParams
from .sampling import SamplingParams  # noqa: F401  (re-exported: gally.generate.SamplingParams)
from .scheduler import Request, Scheduler, eos_ids
from .text import Chunk, Completion, TextStream, TokenLogprob

__all__ = ["generate", "chat", "Conversation", "Chunk", "Completion", "TokenLogprob", "resolve_options", "DEFAULTS"]

Prompt = Union[str, Sequence[int]]

# Prompts decoded together by default (each holds a KV cache while it runs; more wait their turn).
BATCH_SIZE = 16


def resolve_options(model, **given) -> GenerationParams:
    """Arguments given, else the model's generation_config.json, else DEFAULTS; all checked."""
    return options_mod.resolve(model.generation_config, model.config.vocab_size,
                               os.path.join(str(model.path), "generation_config.json"), **given)


def _tokenizer(model):
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model has no tokenizer.json; give the prompt as token ids")
    return model.tokenizer


def prompt_ids(model, prompt: Prompt) -> list[int]:
    """Text (encoded without special tokens) or token ids, checked against the vocabulary."""
    from .model import token_array

    if isinstance(prompt, str):
        ids = _tokenizer(model).encode(prompt, add_special_tokens=False)
        if not ids:
            raise ValueError("prompt is empty")
        return ids
    if prompt is None or isinstance(prompt, (dict, bytes)):
        raise ValueError("prompt must be a string or a flat sequence of integer token ids")
    try:
        return token_array(prompt, model.config.vocab_size, "prompt").tolist()
    except ValueError as e:
        if "must be" in str(e):
            raise ValueError("prompt must be a string or a flat sequence of integer token ids") from None
        raise


def _is_batch(prompt) -> bool:
    """A list of prompts (texts, token-id lists, or dicts), rather than one prompt's token ids."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, dict, list, tuple, np.ndarray)) for p in prompt))


def _run(model, jobs: list[tuple[Request, TextStream]], scheduler: Scheduler, on_end=None) -> Iterator[Chunk]:
    """Steps the scheduler until every job's request has ended, yielding a chunk per token and a
    last chunk per request (finish reason, usage, timings). Closing the iterator early ends the
    requests still running."""
    index = {r.id: (i, r, text) for i, (r, text) in enumerate(jobs)}
    open_ = set(index)
    try:
        while open_:
            for ev in scheduler.step():
                i, r, text = index[ev.request.id]
                reason = ev.finish_reason
                if ev.token is not None:
                    piece, stopped = text.feed(ev.token)
                    if stopped and reason is None:
                        scheduler.finish(r, "stop")
                        reason = "stop"
                    yield Chunk(piece, [ev.token], logprobs=[ev.logprob] if ev.logprob else None, index=i)
                if reason is not None:
                    tail, stopped = text.close()
                    open_.discard(r.id)
                    if on_end is not None:
                        on_end(r)
                    yield Chunk(tail, [], finish_reason="stop" if stopped else reason, usage=r.usage(),
                                timings=r.timings(), index=i, context_full=r.context_full and not stopped)
    finally:
        for rid in open_:
            r = index[rid][1]
            scheduler.finish(r, "stop")
            if on_end is not None:
                on_end(r)


def _collect(chunks: Iterator[Chunk], n: int, want_logprobs: list[bool]) -> list[Completion]:
    texts, ids, lps = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
    last = [None] * n
    for c in chunks:
        texts[c.index].append(c.text)
        ids[c.index] += c.token_ids
        lps[c.index] += c.logprobs or []
        if c.finish_reason is not None:
            last[c.index] = c
    return [Completion("".join(texts[i]), ids[i], last[i].finish_reason, last[i].usage, last[i].timings,
                       lps[i] if want_logprobs[i] else None, last[i].context_full) for i in range(n)]


def generate(model, prompt, *, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
             repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
             frequency_penalty: Optional[float] = None, seed: Optional[int] = None,
             stop: Union[str, Sequence[str], None] = None, logprobs: Optional[int] = None, stream: bool = False,
             max_tokens: Optional[int] = None, batch_size: Optional[int] = None, ignore_eos: Optional[bool] = None,
             progress=None):
    """Model.generate: see its documentation."""
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty, seed=seed, stop=stop, logprobs=logprobs, max_tokens=max_tokens,
                 ignore_eos=ignore_eos)
    single = not _is_batch(prompt)
    items = [prompt] if single else list(prompt)
    requests = []
    for i, item in enumerate(items):
        own = {}
        if isinstance(item, dict):
            own = dict(item)
            if "prompt" not in own:
                raise ValueError(f"prompt {i}: a dict prompt needs a 'prompt' key (text or token ids)")
            item = own.pop("prompt")
        try:
            params = resolve_options(model, **{**given, **{k: v for k, v in own.items()}})
            ids = prompt_ids(model, item)
        except (ValueError, TypeError) as e:
            raise type(e)(str(e) if single else f"prompt {i}: {e}") from None
        requests.append((ids, params))
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    scheduler = Scheduler(model, max_sequences=batch_size or min(len(requests), BATCH_SIZE),
                          max_batch_tokens=max(512, batch_size or 0))
    eos = eos_ids(model)
    jobs = []
    for i, (ids, params) in enumerate(requests):
        try:
            r = scheduler.add(ids, params)
        except ValueError as e:
            raise ValueError(str(e) if single else f"prompt {i}: {e}") from None
        r.progress = progress
        jobs.append((r, TextStream(model.tokenizer, params.stop, eos)))
    chunks = _run(model, jobs, scheduler)
    if stream:
        return chunks
    done = _collect(chunks, len(jobs), [p.logprobs is not None for _, p in requests])
    return done[0] if single else done


def render_chat(model, messages) -> list[int]:
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    tok = _tokenizer(model)
    return tok.encode(tok.apply_chat_template(list(messages), add_generation_prompt=True), add_special_tokens=False)


def chat(model, messages: Sequence[dict], *, stream: bool = False, progress=None, **options):
    """Model.chat: see its documentation."""
    return generate(model, render_chat(model, messages), stream=stream, progress=progress, **options)


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
        self._tokens: list[int] = []  # the tokens whose keys and values the session holds
        self.dropped = 0  # messages dropped so far to keep the conversation inside the context
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (keeping the system prompt). The cache stays: the next turn
        reuses whatever prefix it still shares, such as the system prompt."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, *, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
             repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
             frequency_penalty: Optional[float] = None, seed: Optional[int] = None,
             stop: Union[str, Sequence[str], None] = None, logprobs: Optional[int] = None, stream: bool = False,
             max_tokens: Optional[int] = None, ignore_eos: Optional[bool] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> Union[Completion, Iterator[Chunk]]:
        """Adds a user message and generates the reply; the options are Model.generate's
        (max_tokens is max_new_tokens' alias). Returns a Completion, or with stream=True an iterator
        of Chunk. The exchange enters the history when the reply ends; a stream closed early keeps
        the text it gave. When the history and room for a reply (max_new_tokens, at most half the
        context) no longer fit in the context, its oldest turns are dropped, keeping the system
        prompt (`dropped` counts the messages dropped so far). Raises ValueError for a bad option
        (naming it) or a turn that does not fit in the context even alone."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        params = resolve_options(self.model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                                 stop=stop, logprobs=logprobs, max_tokens=max_tokens, ignore_eos=ignore_eos)
        if self._session is None:
            self._session = self.model.session()
        max_context = self._session.max_context
        room = min(params.max_new_tokens or max_context, max_context // 2)
        history = list(self.messages)
        first = 1 if history and history[0]["role"] == "system" else 0
        while True:
            turn = history + [{"role": "user", "content": text}]
            ids = render_chat(self.model, turn)
            if len(ids) + room <= max_context or len(history) <= first:
                break
            del history[first:first + 2]  # the oldest user message and its reply
        scheduler = Scheduler(self.model, max_sequences=1)
        r = scheduler.add(ids, params, session=self._session, session_tokens=self._tokens)
        r.progress = progress
        self.dropped += len(self.messages) - len(history)
        self.messages = history
        chunks = self._turn(turn, scheduler, r, TextStream(self.model.tokenizer, params.stop, scheduler.eos))
        return chunks if stream else _collect(chunks, 1, [params.logprobs is not None])[0]

    def _turn(self, turn: list[dict], scheduler: Scheduler, r: Request, text: TextStream) -> Iterator[Chunk]:
        reply = []

        def ended(req):
            position = self._session.position  # a pass interrupted before its tokens were recorded
            self._tokens = list(req.tokens[:position])
            if position > len(self._tokens):
                self._session.truncate(len(self._tokens))

        try:
            for chunk in _run(self.model, [(r, text)], scheduler, on_end=ended):
                reply.append(chunk.text)
                yield chunk
        finally:
            self.messages = turn + [{"role": "assistant", "content": "".join(reply)}]

