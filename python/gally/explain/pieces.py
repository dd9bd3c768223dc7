"""Each token's text as a reader should see it: the bytes it stands for, decoded.

Vocabularies store tokens in their own spelling. Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2)
writes each byte as one printable character, so a space is "Ġ" and a newline "Ċ"; SentencePiece
(Llama 2, Mistral) writes a space as "▁" and a byte it has no piece for as "<0x0A>". Both are
undone here. A token that holds only part of a character's UTF-8 bytes (emoji and CJK are often
split) is shown as its bytes, "\\xf0\\x9f".
"""

from __future__ import annotations

import re
from typing import Optional


def byte_level_alphabet() -> dict[str, int]:
    """Character → byte of byte-level BPE. Printable Latin-1 bytes (33-126, 161-172, 174-255) stand
    for themselves; the other 68 bytes, in order, take the characters 256, 257, ... (so the space,
    byte 32, becomes chr(256 + 32) = "Ġ")."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in set(printable)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


BYTE_OF = byte_level_alphabet()
SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SENTENCEPIECE_SPACE = "\u2581"  # "▁"


def is_byte_level(tokenizer) -> bool:
    """A byte-level vocabulary has a token for the lone space byte, spelled "Ġ"."""
    return tokenizer.token_to_id("\u0120") is not None


def special_ids(tokenizer) -> set[int]:
    """Ids of the added tokens marked special (<|im_start|>, <s>, ...)."""
    added = getattr(tokenizer.backend, "get_added_tokens_decoder", dict)()
    return {int(i) for i, t in added.items() if getattr(t, "special", False)}


def token_bytes(spelling: str, byte_level: bool) -> bytes:
    if byte_level and all(c in BYTE_OF for c in spelling):
        return bytes(BYTE_OF[c] for c in spelling)
    m = SENTENCEPIECE_BYTE.fullmatch(spelling)
    if m:
        return bytes([int(m.group(1), 16)])
    return spelling.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")


def piece(tokenizer, token_id: int, byte_level: Optional[bool] = None, special: frozenset = frozenset()) -> str:
    """The text of one token: spaces and newlines as themselves, special tokens as spelled, ids
    without text (no tokenizer, or padding rows of the embedding matrix past its vocabulary) as
    "⟨50001⟩"."""
    if tokenizer is None:
        return f"⟨{token_id}⟩"
    spelling = tokenizer.id_to_token(int(token_id))
    if spelling is None:
        return f"⟨{token_id}⟩"
    if int(token_id) in special:
        return spelling
    if byte_level is None:
        byte_level = is_byte_level(tokenizer)
    return token_bytes(spelling, byte_level).decode("utf-8", errors="backslashreplace")


class Pieces:
    """piece() for one tokenizer, with its byte-level test and special ids worked out once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = tokenizer is not None and is_byte_level(tokenizer)
        self.special = frozenset(special_ids(tokenizer)) if tokenizer is not None else frozenset()

    def __call__(self, token_id: int) -> str:
        return piece(self.tokenizer, token_id, self.byte_level, self.special)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self.special
