"""The OpenAI-compatible request and response shapes `gally serve` speaks: request bodies as pydantic
models (unknown fields ignored, as OpenAI's server does), responses and stream chunks as plain dicts.

Field names and meanings follow OpenAI's API and vLLM's OpenAI server (entrypoints/openai/
protocol.py): max_tokens / max_completion_tokens, n, seed, stop, logprobs + top_logprobs,
stream + stream_options.include_usage, and the extra sampling fields top_k, min_p and
repetition_penalty.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16             # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=-1)
    temperature: Optional[float] = Field(None, ge=0, le=100)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's and llama-server's extra: generate max_tokens whatever comes

    def options(self) -> dict:
        """generate()'s options; None takes the model's default."""
        stop = self.stop
        if isinstance(stop, list):
            stop = [s for s in stop if s] or None
        elif stop == "":
            stop = None
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, stop=stop,
                    ignore_eos=self.ignore_eos or None)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a content list."""
        if isinstance(self.content, list):
            parts = []
            for i, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content[{i}]: only text parts are supported, got type {part.get('type')!r}")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=-1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def options(self) -> dict:
        out = super().options()
        if self.max_completion_tokens is not None:
            out["max_new_tokens"] = self.max_completion_tokens
        out["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return out


class CompletionRequest(Sampling):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False

    def options(self) -> dict:
        out = super().options()
        out["logprobs"] = self.logprobs
        return out


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_logprobs(tokenizer, items) -> Optional[dict]:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    if items is None:
        return None
    return {"content": [_chat_entry(tokenizer, lp) for lp in items]}


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None and token_id < tokenizer.vocab_size else ""


def _chat_entry(tokenizer, lp) -> dict:
    text = _piece(tokenizer, lp.token_id)
    return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := _piece(tokenizer, i)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                             for i, v in lp.top_logprobs]}


def completion_logprobs(tokenizer, items, offset: int = 0) -> Optional[dict]:
    """OpenAI (legacy) completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    if items is None:
        return None
    tokens, offsets, pos = [], [], offset
    for lp in items:
        t = _piece(tokenizer, lp.token_id)
        tokens.append(t)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{_piece(tokenizer, i): v for i, v in lp.top_logprobs} for lp in items],
            "text_offset": offsets}
