"""Text ↔ token ids for a model folder: a `tokenizers.Tokenizer` (tokenizer.json) with the model's
special tokens, end-of-sequence ids, chat template and a streaming decoder.

    tok = Tokenizer.from_folder(folder)
    ids = tok.encode("Hello")                               # no BOS unless add_special_tokens=True
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)                                # the template wrote any BOS itself
    stream = tok.stream(); text = "".join(stream.step(i) for i in ids) + stream.flush()
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

from . import chat_template

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Texts of tokens that end a turn in the chat templates of common models; llama.cpp stops on them too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>", "<end_of_utterance>")


class Tokenizer:
    def __init__(self, backend, special_tokens: Optional[dict[str, str]] = None, eos_token_ids: Sequence[int] = (),
                 chat_template: Any = None, clean_up_tokenization_spaces: bool = False,
                 chat_template_file: Optional[str] = None):
        """backend: a tokenizers.Tokenizer. special_tokens: {"bos_token": text, "eos_token": ..., ...}.
        eos_token_ids: ids that end generation. chat_template: Jinja source, or a list of
        {"name", "template"} of which "default" is used. chat_template_file: where it was read,
        named in its errors."""
        self.backend = backend
        self.chat_template_file = chat_template_file
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.path: Optional[str] = None  # the tokenizer.json read, named in errors
        # A file may leave gaps in its ids: its largest id, not its count of tokens, bounds them.
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True),
                              1 + max(backend.get_vocab(with_added_tokens=True).values(), default=-1))
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id = self.token_to_id(bos) if bos is not None else None

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """Reads tokenizer.json, tokenizer_config.json (special tokens, chat_template), a
        chat_template.jinja beside them, and the eos ids of generation_config.json and config.json."""
        from tokenizers import Tokenizer as Backend

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no tokenizer.json in the model folder")
        try:
            backend = Backend.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        template = config.get("chat_template")
        template_file = os.path.join(folder, "tokenizer_config.json")
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja):
            template_file = jinja
            try:
                with open(jinja, encoding="utf-8") as f:
                    template = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{jinja}: not UTF-8 text ({e})") from None
        elif template is None:
            template_file = os.path.join(folder, "chat_template.json")
            template = _read_json(template_file).get("chat_template")

        eos: list[Any] = []
        for source in (_read_json(os.path.join(folder, "generation_config.json")),
                       _read_json(os.path.join(folder, "config.json"))):
            value = source.get("eos_token_id")
            eos += value if isinstance(value, list) else [value]
        eos.append(backend.token_to_id(special["eos_token"]) if special["eos_token"] else None)
        texts = template if isinstance(template, str) else " ".join(
            t.get("template", "") for t in template or [] if isinstance(t, dict))
        eos += [backend.token_to_id(t) for t in END_OF_TURN_TOKENS if t in texts]
        size = backend.get_vocab_size(with_added_tokens=True)
        eos_ids = [i for i in eos if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size]
        tok = cls(backend, special, eos_ids, template, bool(config.get("clean_up_tokenization_spaces", False)),
                  template_file)
        tok.path = path
        return tok

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(int(token_id))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token texts in it ("<|im_end|>") become their single ids.
        add_special_tokens adds what the tokenizer's post-processor adds (BOS for Llama 2 files)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # tokenizers' own Exception: the file's model cannot handle the text
            raise ValueError(f"{self.path or 'the tokenizer'}: cannot encode the text ({e})") from None

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self._decode(self._check_ids(token_ids), skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A decoder fed one id at a time that only ever returns whole characters."""
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template_name: Optional[str] = None, tokenize: bool = False, **variables: Any):
        """The conversation rendered with the model's chat template, as transformers renders it;
        add_generation_prompt ends it with the header of an assistant turn. Encode the result with
        encode(text) (no add_special_tokens): the template writes BOS itself where the model wants
        one. tokenize=True returns those ids instead of the text."""
        source = self._template(template_name or ("tool_use" if variables.get("tools") else None))
        try:
            text = chat_template.render(source, messages, add_generation_prompt,
                                        **{**self.special_tokens, **variables})
        except chat_template.ChatTemplateError as e:
            if self.chat_template_file is None:
                raise
            raise chat_template.ChatTemplateError(f"{self.chat_template_file}: {e}") from None
        return self.encode(text) if tokenize else text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> list[int]:
        """apply_chat_template then encode, without a second BOS."""
        return self.apply_chat_template(messages, add_generation_prompt, tokenize=True, **variables)

    def _template(self, name: Optional[str]) -> str:
        t = self.chat_template
        if isinstance(t, list):
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get(name) if name in named else named.get("default")
        if not isinstance(t, str):
            raise ValueError("this model has no chat template (tokenizer_config.json has no chat_template); "
                             "give it a plain text prompt instead")
        return t

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        try:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except Exception as e:  # tokenizers' own Exception
            raise ValueError(f"{self.path or 'the tokenizer'}: cannot decode token ids ({e})") from None

    def _check_ids(self, token_ids: Iterable[int]) -> list[int]:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        out = []
        for i, t in enumerate(ids):
            try:
                v = int(t)
            except (TypeError, ValueError):
                raise ValueError(f"token id at index {i} is not an integer: {t!r}") from None
            if v != t or not 0 <= v < self.vocab_size:
                raise ValueError(f"token id {t!r} at index {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(v)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids})"


class StreamDecoder:
    """Text of a growing sequence of ids, piece by piece. step(id) returns the text that id
    completes ("" while a character's UTF-8 bytes are still arriving); flush() returns what is
    left at the end. "".join(steps) + flush() == tokenizer.decode(all ids).

    Each step decodes a short window (the ids since the previous emission plus the ones before
    that, for context: SentencePiece drops the space of a window's first word) and returns what
    the window gained beyond the text it already gave."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # first id of the window
        self._read = 0   # ids before this one have been emitted
        self._prefix = ""  # decode(ids[start:read])

    def step(self, token_id: int) -> str:
        self._ids += self._tok._check_ids([token_id])
        text = self._decode()
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return ""  # an incomplete character, or a token with no text of its own yet
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is pending (an incomplete character becomes U+FFFD); the stream can go on after."""
        text = self._decode()
        out = self._emit(text) if len(text) > len(self._prefix) else ""
        self._start = self._read = len(self._ids)
        self._prefix = ""
        return out

    def _decode(self) -> str:
        return self._tok._decode(self._ids[self._start:], self._skip)

    def _emit(self, text: str) -> str:
        new = text[len(self._prefix):]
        self._start, self._read = self._read, len(self._ids)
        self._prefix = self._tok._decode(self._ids[self._start:], self._skip)
        return new


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
