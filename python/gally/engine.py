"""Continuous batching in a thread of its own, for servers and for programs that generate for
many callers at once.

    engine = gally.Engine(model, max_sequences=8)
    stream = engine.submit("Hello", max_new_tokens=64)      # from any thread
    for chunk in stream: print(chunk.text, end="")             # or: async for chunk in stream
    stream.cancel()                                           # at any time: its KV cache is freed
    engine.close()

One engine thread runs the scheduler (scheduler.py): requests join and leave between steps, a long
prompt is prefilled in chunks under the per-step token budget, a prompt that starts like a
finished request reuses its KV cache (cached_tokens). The GIL is released during each forward
pass, so the threads that submit and read are not held up. Requests beyond max_sequences wait in a
queue; beyond max_queue waiting, submit() raises QueueFull (a server answers 503).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from typing import Optional, Sequence, Union

from .generate import prompt_ids, render_chat, resolve_options
from .scheduler import Request, Scheduler, eos_ids
from .text import Chunk, Completion, TextStream

# Seconds: time-to-first-token and inter-token latency histogram buckets (Prometheus style).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's max_queue: try again later."""


class EngineClosed(RuntimeError):
    """The engine was closed: it takes no more requests."""


_END = object()  # marks the end of a stream


class Stream:
    """One request's output, chunk by chunk, as the engine produces it: iterate it (blocking) or
    async-iterate it (from the event loop it was submitted on). The last chunk carries the finish
    reason ("stop", "length" or "cancelled"), usage and timings."""

    def __init__(self, engine: "Engine", prompt: list[int], params, loop: Optional[asyncio.AbstractEventLoop]):
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.request: Optional[Request] = None  # set by the engine thread once it is scheduled
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._loop = loop
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._async: Optional[asyncio.Queue] = asyncio.Queue() if loop is not None else None
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self._t_last = 0.0  # when its last token came (inter-token latency)

    # ---- the engine thread's side ----

    def _put(self, item) -> None:
        if self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody reads any more
                pass
        else:
            self._sync.put(item)

    # ---- the reader's side ----

    def cancel(self) -> None:
        """Ends the request: the engine frees its sequence before its next step."""
        self.engine._cancel(self)

    def __iter__(self):
        if self._async is not None:
            raise RuntimeError("this stream was submitted with an event loop: use `async for`")
        while True:
            item = self._sync.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self._async is None:
            raise RuntimeError("this stream was submitted without an event loop: iterate it with `for`")
        while True:
            item = await self._async.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> Completion:
        """The whole completion (blocks until the request ends)."""
        texts, ids, lps, last = [], [], [], None
        for c in self:
            texts.append(c.text)
            ids += c.token_ids
            lps += c.logprobs or []
            last = c if c.finish_reason is not None else last
        return Completion("".join(texts), ids, last.finish_reason, last.usage, last.timings,
                          lps if self.params.logprobs is not None else None)


@dataclasses.dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = None
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1


@dataclasses.dataclass
class Metrics:
    """Totals since the engine started, and the latency histograms (for a /metrics endpoint)."""
    requests_finished: dict = dataclasses.field(default_factory=lambda: collections.Counter())
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    ttft: Histogram = dataclasses.field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    inter_token: Histogram = dataclasses.field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


class Engine:
    """A model's continuous-batching loop, running in a thread (see the module doc).

    max_sequences: requests decoded together; max_batch_tokens: tokens per forward pass (decode
    steps plus prompt chunks; a long prompt is split into chunks of this size); max_queue:
    requests allowed to wait beyond the max_sequences running (None: no limit); prefix_cache:
    finished requests whose KV cache is kept for prompts that start the same way."""

    def __init__(self, model, max_sequences: int = 8, max_batch_tokens: int = 512, max_queue: Optional[int] = None,
                 prefix_cache: int = 16):
        for name, value in (("max_sequences", max_sequences), ("max_batch_tokens", max_batch_tokens),
                            ("prefix_cache", prefix_cache + 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise ValueError(f"max_queue must be None or an integer >= 0, got {max_queue!r}")
        self.model = model
        self.max_queue = max_queue
        self.scheduler = Scheduler(model, max_sequences, max_batch_tokens, prefix_cache)
        self.metrics = Metrics()
        self._eos = eos_ids(model)
        self._lock = threading.Condition()
        self._inbox: list[Stream] = []
        self._cancelled: list[Stream] = []
        self._streams: dict[int, tuple[Stream, TextStream]] = {}  # request id → its stream and text
        self._closing = False
        self._abort = False
        self._thread = threading.Thread(target=self._loop, name="gally-engine", daemon=True)
        self._thread.start()

    # ---- submitting ----

    def submit(self, prompt: Union[str, Sequence[int]], *, loop: Optional[asyncio.AbstractEventLoop] = None,
               **options) -> Stream:
        """Queues a prompt (text or token ids) with generate()'s options; returns its Stream. With
        loop (an asyncio event loop), the stream is read with `async for` on that loop. Raises
        ValueError for a bad prompt or option, QueueFull when max_queue requests wait."""
        params = resolve_options(self.model, **options)
        return self._submit(prompt_ids(self.model, prompt), params, loop)

    def submit_chat(self, messages: Sequence[dict], *, loop: Optional[asyncio.AbstractEventLoop] = None,
                    **options) -> Stream:
        """submit() for a conversation rendered with the model's chat template (as Model.chat)."""
        params = resolve_options(self.model, **options)
        return self._submit(render_chat(self.model, messages), params, loop)

    def _submit(self, ids: list[int], params, loop) -> Stream:
        from .model import check_context

        check_context(0, len(ids), self.model.max_context, "prompt")
        stream = Stream(self, ids, params, loop)
        with self._lock:
            if self._closing:
                raise EngineClosed("the engine is closed")
            busy = len(self._inbox) + len(self.scheduler.waiting) + len(self.scheduler.running)
            if self.max_queue is not None and busy >= self.scheduler.max_sequences + self.max_queue:
                raise QueueFull(f"{self.scheduler.max_sequences} requests are running and {self.max_queue} "
                                f"waiting, the most this server takes; try again later")
            self._inbox.append(stream)
            self._lock.notify()
        return stream

    def _cancel(self, stream: Stream) -> None:
        with self._lock:
            if stream.finish_reason is None and not stream.cancelled:
                stream.cancelled = True
                self._cancelled.append(stream)
                self._lock.notify()

    # ---- state ----

    def stats(self) -> dict:
        """Requests running and waiting now, and the KV cache pool's use."""
        with self._lock:
            waiting = len(self._inbox) + len(self.scheduler.waiting)
            running = len(self.scheduler.running)
        return dict(running=running, waiting=waiting, kv_cache=self.model.kv_cache_usage(),
                    prefix_cache_entries=len(self.scheduler.cache))

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stops taking requests; with drain, lets the running and queued ones finish, else
        cancels them. Returns when the engine thread has ended (or after timeout seconds)."""
        with self._lock:
            self._closing = True
            self._abort = self._abort or not drain
            self._lock.notify()
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(drain=False)

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._inbox and not self._cancelled and self.scheduler.idle and not self._closing:
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                cancelled, self._cancelled = self._cancelled, []
                if self._abort:  # closing without draining: everything still open ends now
                    cancelled += [s for s in inbox + [s for s, _ in self._streams.values()] if not s.cancelled]
                    for s in cancelled:
                        s.cancelled = True
                if self._closing and not inbox and self.scheduler.idle and not cancelled:
                    return
            for s in inbox:
                if s.cancelled:
                    self._end(s, "cancelled", None)
                    continue
                s.request = self.scheduler.add(s.prompt, s.params)
                self._streams[s.request.id] = (s, TextStream(self.model.tokenizer, s.params.stop, self._eos))
            for s in cancelled:
                if s.request is not None and s.request.id in self._streams:
                    self.scheduler.finish(s.request, "cancelled")
                    self._streams.pop(s.request.id)
                    self._end(s, "cancelled", s.request)
            try:
                events = self.scheduler.step()
            except Exception as e:  # a fault of the engine, not of one request: end them all with it
                self._fail_all(e)
                continue
            self.metrics.steps += 1
            self._deliver(events)

    def _deliver(self, events) -> None:
        now = time.perf_counter()
        for ev in events:
            entry = self._streams.get(ev.request.id)
            if entry is None:
                continue
            stream, text = entry
            r, reason = ev.request, ev.finish_reason
            if ev.token is not None:
                if len(r.generated) == 1:
                    self.metrics.ttft.observe(now - stream.t_submit)
                else:
                    self.metrics.inter_token.observe(now - stream._t_last)
                stream._t_last = now
                self.metrics.generated_tokens += 1
                piece, stopped = text.feed(ev.token)
                if stopped and reason is None:
                    self.scheduler.finish(r, "stop")
                    reason = "stop"
                stream._put(Chunk(piece, [ev.token], logprobs=[ev.logprob] if ev.logprob else None))
            if reason is not None:
                tail, stopped = text.close()
                self._streams.pop(r.id, None)
                stream._put(Chunk(tail, [], finish_reason="stop" if stopped else reason, usage=r.usage(),
                                  timings=r.timings()))
                self._end(stream, "stop" if stopped else reason, r)

    def _end(self, stream: Stream, reason: str, r: Optional[Request]) -> None:
        if reason == "cancelled":
            stream._put(Chunk("", [], finish_reason="cancelled", usage=r.usage() if r else None,
                              timings=r.timings() if r else None))
        stream.finish_reason = reason
        self.metrics.requests_finished[reason] += 1
        if r is not None:
            self.metrics.prompt_tokens += len(r.prompt)
            self.metrics.cached_tokens += r.cached_tokens or 0
        stream._put(_END)

    def _fail_all(self, error: Exception) -> None:
        for stream, _ in list(self._streams.values()):
            if stream.request is not None:
                self.scheduler.finish(stream.request, "error")
            stream.error = error
            stream._put(RuntimeError(f"the engine failed: {error}"))
            stream.finish_reason = "error"
            self.metrics.requests_finished["error"] += 1
            stream._put(_END)
        self._streams.clear()
