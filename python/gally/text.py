"""The text layer: a request's tokens in, text out — incremental detokenization that never splits
a character, stop strings that are never partly released, and the chunks and completions that
generate() returns.

    stream = TextStream(tokenizer, stop=("\\n\\n",), eos=eos_ids)
    text, stopped = stream.feed(token)      # for each generated token
    tail = stream.close()                   # what was held back, at the end
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .scheduler import TokenLogprob

__all__ = ["Chunk", "Completion", "StopText", "TextStream", "TokenLogprob"]


@dataclasses.dataclass
class Chunk:
    """A piece of a streamed completion: the text its tokens completed (never half a character), the
    token ids, and on a prompt's last chunk its finish reason, usage and timings."""
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # the last chunk: "stop" or "length"
    usage: Optional[dict] = None         # the last chunk
    timings: Optional[dict] = None       # the last chunk
    logprobs: Optional[list[TokenLogprob]] = None
    index: int = 0                       # which prompt of a batch
    context_full: bool = False           # the last chunk: it ended because the context was full


@dataclasses.dataclass
class Completion:
    """A whole completion, as Model.generate, Model.chat and Conversation.send return it (fields
    below); with stream=True the same arrives as Chunks."""
    text: str                  # without the stop string or end-of-sequence token
    token_ids: list[int]       # every generated token, including the one that ended generation
    finish_reason: str         # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context)
    usage: dict                # prompt_tokens, completion_tokens, total_tokens, cached_tokens
    timings: dict              # ttft_s, prefill_tok_s, decode_tok_s
    logprobs: Optional[list[TokenLogprob]] = None
    context_full: bool = False  # finish_reason "length" because the context could hold no more


class StopText:
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


class TextStream:
    """One request's text: each token decoded as it comes (end-of-sequence tokens and ids past the
    tokenizer's vocabulary, padding rows of the embedding, have none), stop strings applied."""

    def __init__(self, tokenizer, stop: tuple[str, ...], eos: frozenset[int]):
        self.decoder = tokenizer.stream(skip_special_tokens=True) if tokenizer is not None else None
        self.text_vocab = tokenizer.vocab_size if tokenizer is not None else 0
        self.stop = StopText(stop)
        self.eos = eos
        self.stopped = False

    def feed(self, token: int) -> tuple[str, bool]:
        """(text released by this token, whether a stop string was reached)."""
        if self.decoder is None or token in self.eos or token >= self.text_vocab:
            return "", False
        text, self.stopped = self.stop.feed(self.decoder.step(token))
        return text, self.stopped

    def close(self) -> tuple[str, bool]:
        """(what was held back — an incomplete character, a stop string's possible start —, whether
        it completed a stop string)."""
        if self.stopped or self.decoder is None:
            return "", self.stopped
        tail, self.stopped = self.stop.feed(self.decoder.flush())
        return tail + ("" if self.stopped else self.stop.flush()), self.stopped
