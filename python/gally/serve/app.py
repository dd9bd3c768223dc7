"""`gally serve`'s HTTP application: OpenAI-compatible endpoints over the continuous-batching
Engine (engine.py), on Starlette/FastAPI with pydantic request validation.

    POST /v1/chat/completions   the chat template applied to `messages`; streamed as server-sent events or not
    POST /v1/completions        a raw prompt (text or token ids)
    GET  /v1/models             the one model served
    GET  /health                503 while the model loads, then 200
    GET  /metrics               Prometheus text: requests, tokens, latencies, KV cache
    POST /tokenize, /detokenize llama-server's shapes

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}. A client that
disconnects — while queued, during its prompt or during decoding — has its sequence freed within
one engine step.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics as metrics_mod
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    usage,
)

RETRY_AFTER_S = 2  # what a 503 for a full queue suggests


class ServerState:
    """What the routes share: the model and engine once loaded, or why loading failed."""

    def __init__(self, model_name: str, api_key: Optional[str]):
        self.model_name = model_name
        self.api_key = api_key
        self.model = None
        self.engine = None
        self.error: Optional[str] = None
        self.started = now()


def error(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
          code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def create_app(load: Callable[[], tuple], model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = 8 << 20, on_load_error: Optional[Callable[[str], None]] = None) -> FastAPI:
    """The application. load() returns (model, engine); it runs in a thread started with the app,
    so that /health answers 503 while it runs."""
    state = ServerState(model_name, api_key)

    async def lifespan(app):
        def loader():
            try:
                state.model, state.engine = load()
            except Exception as e:  # reported by /health, and to the caller
                state.error = f"{type(e).__name__}: {e}"
                if on_load_error is not None:
                    on_load_error(state.error)

        thread = threading.Thread(target=loader, name="gally-load", daemon=True)
        thread.start()
        yield
        thread.join()
        if state.engine is not None:  # SIGTERM: uvicorn has drained the requests; let the engine end
            state.engine.close(drain=True, timeout=60)

    app = FastAPI(title="gally", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gally = state
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if state.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            if header != f"Bearer {state.api_key}" and request.headers.get("x-api-key") != state.api_key:
                return error(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                             code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        param = ".".join(loc) or None
        return error(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error(404, f"no such endpoint: {request.method} {request.url.path}", "not_found_error",
                         code="not_found")
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    def ready() -> Optional[JSONResponse]:
        if state.error:
            return error(500, f"the model failed to load: {state.error}", "server_error", code="load_failed")
        if state.engine is None:
            return error(503, "the model is loading", "unavailable_error", code="loading",
                         headers={"Retry-After": str(RETRY_AFTER_S)})
        return None

    def check_model(name: Optional[str]) -> Optional[JSONResponse]:
        if name and name != state.model_name:
            return error(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                         param="model", code="model_not_found")
        return None

    @app.get("/health")
    async def health():
        return ready() or JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                         "created": state.started, "owned_by": "gally"}]})

    @app.get("/metrics")
    async def metrics():
        if state.engine is None:
            return ready()
        return PlainTextResponse(metrics_mod.render(state.engine), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (r := ready()) is not None:
            return r
        tok = state.model.tokenizer
        ids = tok.encode(body.content, add_special_tokens=body.add_special)
        if body.with_pieces:
            return JSONResponse({"tokens": [{"id": i, "piece": tok.decode([i])} for i in ids]})
        return JSONResponse({"tokens": ids})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if (r := ready()) is not None:
            return r
        try:
            return JSONResponse({"content": state.model.tokenizer.decode(body.tokens)})
        except ValueError as e:
            return error(400, str(e), param="tokens")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if (r := ready() or check_model(body.model)) is not None:
            return r
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
        except ValueError as e:
            return error(400, f"messages: {e}", param="messages")
        if state.model.tokenizer is None or state.model.tokenizer.chat_template is None:
            return error(400, "this model has no chat template; use /v1/completions", param="messages")
        return await _respond(state, request, body, "chat", lambda loop, **o: state.engine.submit_chat(
            messages, loop=loop, **o))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (r := ready() or check_model(body.model)) is not None:
            return r
        return await _respond(state, request, body, "text", lambda loop, **o: state.engine.submit(
            body.prompt, loop=loop, **o))

    return app


async def _respond(state: ServerState, request: Request, body, kind: str, submit):
    """Submits the request's n choices, then streams them as server-sent events or returns the
    whole response. The choices are cancelled if the client goes away first."""
    from ..engine import EngineClosed, QueueFull

    loop = asyncio.get_running_loop()
    options = body.options()
    streams = []
    try:
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            streams.append(submit(loop, seed=seed, **options))
    except QueueFull as e:
        for s in streams:
            s.cancel()
        return error(503, str(e), "unavailable_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    except EngineClosed as e:
        return error(503, str(e), "unavailable_error", code="shutting_down")
    except (ValueError, TypeError) as e:
        for s in streams:
            s.cancel()
        message = str(e)
        code = "context_length_exceeded" if "longer than the context" in message else "invalid_value"
        param = next((p for p in ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "logprobs",
                                  "max_new_tokens", "repetition_penalty", "prompt") if message.startswith(p)), None)
        param = {"max_new_tokens": "max_tokens"}.get(param, param) or ("messages" if kind == "chat" else "prompt")
        return error(400, message.replace("max_new_tokens", "max_tokens"), param=param, code=code)
    rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, streams, rid, created, kind, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _whole(state, request, streams, rid, created, kind)


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


async def _merged(streams) -> AsyncIterator[tuple[int, object]]:
    """(choice index, chunk) from n streams as they come."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for chunk in s:
                await queue.put((i, chunk))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_ = len(streams)
        while open_:
            i, chunk = await queue.get()
            if chunk is None:
                open_ -= 1
            else:
                yield i, chunk
    finally:
        for t in tasks:
            t.cancel()


async def _sse(state, streams, rid, created, kind, include_usage):
    tok = state.model.tokenizer
    name = state.model_name
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    usages = {}  # choice index → its usage

    def event(choices, **extra):
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                      "choices": choices, **extra}) + "\n\n"

    try:
        if kind == "chat":
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(streams))])
        async for i, chunk in _merged(streams):
            done = chunk.finish_reason is not None
            if chunk.text or chunk.token_ids or done:
                if kind == "chat":
                    choice = {"index": i, "delta": {"content": chunk.text} if chunk.text else {},
                              "logprobs": chat_logprobs(tok, chunk.logprobs) if chunk.logprobs else None,
                              "finish_reason": _finish(chunk.finish_reason) if done else None}
                else:
                    choice = {"index": i, "text": chunk.text,
                              "logprobs": completion_logprobs(tok, chunk.logprobs) if chunk.logprobs else None,
                              "finish_reason": _finish(chunk.finish_reason) if done else None}
                if chunk.text or done or chunk.logprobs:
                    yield event([choice])
            if done and chunk.usage:
                usages[i] = chunk.usage
        if include_usage and usages:
            first = usages[min(usages)]
            yield event([], usage=usage(first["prompt_tokens"], sum(u["completion_tokens"] for u in usages.values()),
                                        first["cached_tokens"]))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): free whatever still runs
        for s in streams:
            s.cancel()


async def _whole(state, request: Request, streams, rid, created, kind):
    tok = state.model.tokenizer
    texts = [[] for _ in streams]
    lps = [[] for _ in streams]
    last = [None] * len(streams)

    async def collect():
        async for i, chunk in _merged(streams):
            texts[i].append(chunk.text)
            lps[i] += chunk.logprobs or []
            if chunk.finish_reason is not None:
                last[i] = chunk

    async def watch():  # a client that disconnects while its request waits or runs
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    collecting, watching = asyncio.create_task(collect()), asyncio.create_task(watch())
    done, _ = await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    if collecting not in done:
        collecting.cancel()
        for s in streams:
            s.cancel()
        return error(499, "the client closed the request", code="client_closed")
    watching.cancel()
    collecting.result()
    choices = []
    for i, s in enumerate(streams):
        reason = _finish(last[i].finish_reason)
        want = s.params.logprobs is not None
        if kind == "chat":
            choices.append({"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                            "logprobs": chat_logprobs(tok, lps[i]) if want else None, "finish_reason": reason})
        else:
            choices.append({"index": i, "text": "".join(texts[i]),
                            "logprobs": completion_logprobs(tok, lps[i]) if want else None, "finish_reason": reason})
    u = [c.usage for c in last]
    return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                         "created": created, "model": state.model_name, "choices": choices,
                         "usage": usage(u[0]["prompt_tokens"], sum(x["completion_tokens"] for x in u),
                                        u[0]["cached_tokens"])})


class _BodyLimit:
    """413 for a request body over `limit` bytes, whether it says its length or streams it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error(413, f"the request body is over {self.limit} bytes", code="body_too_large")(
                scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await error(413, f"the request body is over {self.limit} bytes", code="body_too_large")(
                scope, receive, send)


class _TooLarge(Exception):
    pass
