"""The token layer: prompts in, tokens out, for many sequences at once (continuous batching).

A Scheduler holds requests — a prompt's token ids, its options (options.GenerationParams) and a
session for its KV cache — and advances all of them by one forward pass per step():

    prefill   a request's prompt goes in chunks, under a per-step token budget, so that a long new
              prompt never stalls the running ones for more than one chunk;
    decode    every request whose prompt is in feeds the token it sampled last: one token each, all
              in the same pass, so each weight is read once for all of them;
    sample    each request whose prompt is complete samples its next token from its own logits,
              with its own sampler and random stream (results do not depend on the batch).

Requests join between steps (up to max_sequences run at once; the others wait) and leave when they
end: at an end-of-sequence token, after max_new_tokens, at the end of the context, or when the
caller ends them (finish: a stop string, a disconnected client). A request that shares a prefix
with a finished one reuses that prefix's KV cache (the prefix cache; reported as cached_tokens).
When the model's KV cache pool runs out, the scheduler drops prefix-cache entries, then puts the
newest running request back in the queue (its cache freed; it is prefilled again later).

gpt-fast's prefill / decode_one_token and mlx-lm's generate_step are the single-sequence shape of
this; llama.cpp's server slots and vLLM's scheduler the many-sequence one.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Optional, Sequence

import numpy as np

from . import _core, sampling
from .options import GenerationParams


@dataclasses.dataclass
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives."""
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclasses.dataclass
class TokenEvent:
    """What one step did for a request: a new token, and whether the request ended."""
    request: "Request"
    token: Optional[int]                 # None when the request ended without a new token
    logprob: Optional[TokenLogprob] = None
    finish_reason: Optional[str] = None  # "stop" (end-of-sequence token), "length", or None: more to come


class Request:
    """One sequence being generated: its prompt, options, sampler, session and progress. Before
    each sample, all of prompt + generated must be in the session's cache; `tokens` is the part
    that is, so the next pass feeds the rest (a prompt chunk, or the token sampled last)."""

    def __init__(self, rid: int, prompt: list[int], params: GenerationParams, vocab_size: int, session=None,
                 session_tokens: Optional[list[int]] = None):
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.sampler = sampling.Sampler(params.sampling, vocab_size, params.seed, prompt)
        self.session = session            # given (a conversation's) or assigned on admission
        self.own_session = session is None
        self.tokens: list[int] = list(session_tokens or []) if session is not None else []
        self.generated: list[int] = []
        self.cached_tokens: Optional[int] = None  # set at the first admission
        self.prefilled = 0
        self.finish_reason: Optional[str] = None
        self.context_full = False         # it ended because its session could hold no more tokens
        self.error: Optional[str] = None  # why a request ended early, where it did
        self.progress = None              # progress(done, total) after each chunk of a long prompt
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = self.t_last = 0.0

    @property
    def context(self) -> list[int]:
        """The tokens the cache must hold before the next sample."""
        return self.prompt + self.generated

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens after those in the cache: a prompt chunk, or the token sampled last."""
        start, p = len(self.tokens), len(self.prompt)
        if start >= p:
            return self.generated[start - p:start - p + n]
        chunk = self.prompt[start:start + n]
        return chunk + self.generated[:n - len(chunk)] if len(chunk) < n else chunk

    @property
    def to_feed(self) -> int:
        return len(self.prompt) + len(self.generated) - len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def usage(self) -> dict:
        return dict(prompt_tokens=len(self.prompt), completion_tokens=len(self.generated),
                    total_tokens=len(self.prompt) + len(self.generated), cached_tokens=self.cached_tokens or 0)

    def timings(self) -> dict:
        """ttft_s (submission to first token), prefill_tok_s (prompt tokens computed per second from
        admission to the first token), decode_tok_s (tokens per second after the first)."""
        n = len(self.generated)
        prefill_s, decode_s = self.t_first - self.t_admit, self.t_last - self.t_first
        return dict(ttft_s=self.t_first - self.t_submit if n else 0.0,
                    prefill_tok_s=self.prefilled / prefill_s if n and prefill_s > 0 else 0.0,
                    decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """Sessions of finished requests, kept for the prompts that start the same way (a system prompt,
    a chat's history), least recently used first out."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[int, tuple[list[int], object]] = collections.OrderedDict()
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]):
        """(entry's session, tokens shared with prompt) of the entry sharing the most, or (None, 0)."""
        best, best_n = None, 0
        for key, (tokens, _) in self._entries.items():
            n = common_prefix(tokens, prompt)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        return self._entries[best][1], best_n

    def insert(self, tokens: list[int], session) -> None:
        if self.max_entries <= 0 or not tokens:
            return
        for key, (held, _) in list(self._entries.items()):  # an entry this one extends is of no more use
            if len(held) <= len(tokens) and common_prefix(held, tokens) == len(held):
                del self._entries[key]
        self._entries[next(self._ids)] = (list(tokens), session)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def evict(self) -> bool:
        """Drops the least recently used entry (its KV cache goes back to the pool, unless shared)."""
        if not self._entries:
            return False
        self._entries.popitem(last=False)
        return True

    def clear(self) -> None:
        self._entries.clear()


class Scheduler:
    """Requests advanced together, one forward pass per step (see the module doc).

    model: a gally.Model (anything with session(), config, max_context, and runner(max_tokens), whose
    runner has max_tokens, gemm_min_tokens and forward_checked).
    max_sequences: requests running at once; more wait. max_batch_tokens: tokens per pass (decode
    steps plus prompt chunks). prefix_cache: finished sessions kept for reuse (0: none)."""

    def __init__(self, model, max_sequences: int = 8, max_batch_tokens: int = 512, prefix_cache: int = 0):
        if max_batch_tokens < max_sequences:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be at least max_sequences ({max_sequences})")
        self.model = model
        self.max_sequences = max_sequences
        self.runner = model.runner(max_batch_tokens)
        self.cache = PrefixCache(prefix_cache)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._ended: list[TokenEvent] = []  # requests that end before running (max_new_tokens 0)
        self._ids = itertools.count()
        self.eos = eos_ids(model)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._ended)

    def add(self, prompt: list[int], params: GenerationParams, session=None,
            session_tokens: Optional[list[int]] = None) -> Request:
        """Queues a prompt (checked token ids). session: a session to continue (a conversation's),
        which holds session_tokens; the part they share with the prompt is not computed again."""
        from .model import check_context

        check_context(0, len(prompt), session.max_context if session is not None else self.model.max_context, "prompt")
        r = Request(next(self._ids), prompt, params, self.model.config.vocab_size, session, session_tokens)
        if params.max_new_tokens == 0:
            r.finish_reason = "length"
            self._ended.append(TokenEvent(r, None, finish_reason="length"))
        else:
            self.waiting.append(r)
        return r

    def finish(self, r: Request, reason: str = "stop") -> None:
        """Ends a request now (reason "stop": a stop string; "cancelled": a client gone). Its KV
        cache goes to the prefix cache, or back to the pool at once when it was cancelled."""
        if r.finished:
            return
        r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        if r.session is not None and r.own_session:
            if reason != "cancelled":
                self.cache.insert(r.tokens, r.session)
            r.session = None

    def step(self) -> list[TokenEvent]:
        """One forward pass over the running requests; returns each one's new token (or its end)."""
        events, self._ended = self._ended, []
        self._admit()
        while True:
            members, sessions, tokens = self._batch()
            if not members:
                return events
            try:
                logits = self.runner.forward_checked(sessions, [t for ts in tokens for t in ts],
                                                     [len(ts) for ts in tokens])
            except _core.KvCacheFull as e:
                ended = self._make_room(str(e))
                if ended is not None:
                    events.append(TokenEvent(ended, None, finish_reason=ended.finish_reason))
                continue
            return events + self._after(members, tokens, logits)

    # ---- the parts of a step ----

    def _admit(self) -> None:
        """Waiting requests start, while fewer than max_sequences run: each gets a session, reusing
        what it can of a cached prefix (or of its own session's tokens)."""
        while self.waiting and len(self.running) < self.max_sequences:
            r = self.waiting.popleft()
            context = r.context
            if r.session is None:  # a fork of the prefix cache's best match, or a new session
                cached, shared = self.cache.lookup(context)
                reuse = min(shared, len(context) - 1)
                r.session = cached.fork(reuse) if cached is not None and reuse > 0 else self.model.session()
                r.tokens = context[:reuse] if cached is not None and reuse > 0 else []
            else:  # its own session: keep the prefix it shares with the context
                reuse = min(common_prefix(r.tokens, context), len(context) - 1)
                r.session.truncate(reuse)
                r.tokens = context[:reuse]
            if r.cached_tokens is None:
                r.cached_tokens = len(r.tokens)
                r.t_admit = time.perf_counter()
            self.running.append(r)

    def _batch(self):
        """This pass's tokens: one for each request that is decoding, then prompt chunks while the token
        budget lasts. Chunks of at least the runner's gemm_min_tokens take the GEMM, as the whole prompt
        would alone: a shorter chunk that is not the prompt's end waits for the next step, and a chunk
        that would leave a shorter end is cut shorter itself where it can be. Where the decode steps leave
        prompts less than that limit in every pass (a small budget), a chunk takes what it can, rather than
        waiting for the decoding requests to finish."""
        budget = self.runner.max_tokens
        members, sessions, tokens = [], [], []
        running = self.running if len(self.running) == 1 else sorted(self.running, key=lambda r: r.to_feed > 1)
        decoding = sum(r.to_feed == 1 for r in running)
        min_chunk = max(1, min(self.runner.gemm_min_tokens, budget - decoding))
        for r in running:  # decode steps first (the sort is stable)
            n = r.to_feed
            take = _core.chunk_tokens(n, budget, min_chunk)  # cut as Runner::forward cuts a prompt
            if take == 0 or (take < n and take < min_chunk):
                continue
            members.append(r), sessions.append(r.session), tokens.append(r.next_tokens(take))
            budget -= take
        return members, sessions, tokens

    def _after(self, members: list[Request], tokens: list[list[int]], logits: np.ndarray) -> list[TokenEvent]:
        """Records what the pass fed; each request whose context is now complete samples a token."""
        events = []
        now = time.perf_counter()
        for r, fed, row in zip(members, tokens, logits):
            if len(fed) > 1 or len(r.tokens) < len(r.prompt):
                r.prefilled += len(fed)
            r.tokens += fed
            if r.progress is not None and len(r.tokens) <= len(r.prompt):
                r.progress(len(r.tokens), len(r.prompt))
            if r.to_feed:  # more of the prompt to come
                continue
            token = r.sampler(row)
            lp = None
            if r.params.logprobs is not None:
                chosen, top = sampling.logprobs(row, token, r.params.logprobs)
                lp = TokenLogprob(token, chosen, top)
            r.generated.append(token)
            r.t_first = r.t_first or now
            r.t_last = now
            reason = None
            if token in self.eos and not r.params.ignore_eos:
                reason = "stop"
            elif r.params.max_new_tokens is not None and len(r.generated) >= r.params.max_new_tokens:
                reason = "length"
            elif r.session.position >= r.session.max_context:
                reason, r.context_full = "length", True
            if reason is not None:
                self.finish(r, reason)
            events.append(TokenEvent(r, token, lp, reason))
        return events

    def _make_room(self, message: str) -> Optional[Request]:
        """After a full KV cache pool: drops a prefix-cache entry, else puts the newest running
        request back in the queue (its cache freed, prefilled again later). A request running
        alone that still does not fit ends ("length", with the pool's message as its error) and is
        returned."""
        if self.cache.evict():
            return None
        r = self.running.pop()
        if self.running:
            if r.own_session:
                r.session = None
            else:
                r.session.truncate(0)
            r.tokens = []
            self.waiting.appendleft(r)
            return None
        r.error = message
        self.running.append(r)
        self.finish(r, "length")
        return r


def eos_ids(model) -> frozenset[int]:
    """config.json's eos_token_id, generation_config.json's, and the tokenizer's end-of-turn tokens."""
    gen = model.generation_config.get("eos_token_id")
    ids = list(model.config.eos_token_id) + (gen if isinstance(gen, list) else [gen])
    if model.tokenizer is not None:
        ids += list(model.tokenizer.eos_token_ids)
    return frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
