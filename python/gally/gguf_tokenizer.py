"""tokenizer.json and tokenizer_config.json from a GGUF file's `tokenizer.*` metadata.

A GGUF stores the vocabulary, merges, token types and the name of the pre-tokenizer, not a
tokenizer.json. We rebuild the tokenizer with the `tokenizers` library the way transformers does
when it loads the same file (`from_pretrained(..., gguf_file=...)`), so that both cut every text
into the same ids:
- "gpt2" (byte-level BPE: SmolLM2, Llama 3, Qwen2): vocabulary in GPT-2's byte alphabet, the
  file's merges, a split regex chosen by `tokenizer.ggml.pre` (GPT-2's own when the name is not
  listed), ByteLevel decoding;
- "llama" (SentencePiece BPE: Llama 2, Mistral 7B): pieces with U+2581 for spaces, merges from
  the file or recovered from the piece scores, byte fallback, a space prepended to the first word.
Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so the
text "<|im_end|>" is one token, as in llama.cpp.
"""

from __future__ import annotations

from typing import Any, Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .tokenizer import END_OF_TURN_TOKENS

# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL = 3
USER_DEFINED = 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre → the regex that splits text into words before BPE. Names not listed here
# (e.g. "smollm", "gpt2", "default") get GPT-2's regex, built into the ByteLevel pre-tokenizer;
# the table is the one transformers 5 uses, so that gally and transformers agree on every text.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

TOKENIZER_MODELS = ("gpt2", "llama")

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte maps to a printable character; printable ASCII and most of
    Latin-1 map to themselves, the rest (space, control bytes) to U+0100 and up ("Ġ" is the space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build(meta: dict[str, Any], path: str) -> tuple[Tokenizer, dict[str, Any], list[int]]:
    """(tokenizer, tokenizer_config, end-of-sequence ids) for the GGUF metadata `meta` of file `path`."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(f"{path}: the file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if kind not in TOKENIZER_MODELS:
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; gally builds "
                         f"{', '.join(TOKENIZER_MODELS)} tokenizers from GGUF files")
    tokens = list(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    if types and len(types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    merges = meta.get("tokenizer.ggml.merges")
    merges = _split_merges(merges, path) if merges is not None else None

    special = _special_tokens(meta, tokens, path)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if kind == "gpt2":
        if merges is None:
            raise ValueError(f"{path}: a byte-level BPE vocabulary needs tokenizer.ggml.merges, which is missing")
        tok = byte_level_tokenizer(tokens, merges, meta.get("tokenizer.ggml.pre"))
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if merges is None and scores is None:
            raise ValueError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.merges or tokenizer.ggml.scores")
        tok = sentencepiece_tokenizer(tokens, merges if merges is not None else merges_from_scores(tokens, scores))
    _add_typed_tokens(tok, tokens, types, byte_level=kind == "gpt2")
    # transformers registers the bos/eos/unk/pad strings as special tokens even when untyped
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special.values()
                            if t is not None and tok.token_to_id(t) is not None])
    tok.post_processor = _post_processor(special, add_bos, add_eos, tok)

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{name: value for name, value in special.items() if value is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    template = chat_template(meta)
    if template is not None:
        tokenizer_config["chat_template"] = template
    return tok, tokenizer_config, _eos_ids(meta, tokens, template)


def byte_level_tokenizer(tokens: list[str], merges: list[tuple[str, str]], pre: Optional[str]) -> Tokenizer:
    alphabet = bytes_to_unicode()
    spelled = set(alphabet.values())
    # A token with characters outside the byte alphabet (a user-defined "<think>" with a real space,
    # say) is respelled byte by byte, as the BPE model only ever produces alphabet characters.
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_tokenizer(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # "Hello world" → "▁Hello▁world": a space before the first word only, never splitting on spaces
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a piece into two pieces of the
    vocabulary, best piece score first (ties: shorter left, then shorter right part, then the order
    transformers' generate_merges gives, so that both pick the same merge)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    piece_scores = dict(zip(tokens, scores))
    found = []
    for piece, score in piece_scores.items():
        splits = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        found.extend(sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def chat_template(meta: dict[str, Any]) -> Any:
    """tokenizer.chat_template, or with named variants (tokenizer.chat_template.tool_use) the list
    form of tokenizer_config.json: [{"name": "default", "template": ...}, ...]."""
    default = meta.get("tokenizer.chat_template")
    named = {key[len("tokenizer.chat_template."):]: value for key, value in meta.items()
             if key.startswith("tokenizer.chat_template.") and isinstance(value, str)}
    if not named:
        return default if isinstance(default, str) else None
    templates = [{"name": "default", "template": default}] if isinstance(default, str) else []
    return templates + [{"name": name, "template": text} for name, text in named.items()]


def _split_merges(merges, path: str) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _special_tokens(meta: dict[str, Any], tokens: list[str], path: str) -> dict[str, Optional[str]]:
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary of "
                             f"{len(tokens)} tokens")
        special[name] = tokens[token_id] if token_id is not None else None
    return special


def _add_typed_tokens(tok: Tokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    spelled = set(bytes_to_unicode().values())
    # In a byte-level vocabulary a CONTROL token outside the byte alphabet is a mislabel of
    # llama.cpp's; transformers leaves those out, and so do we.
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == CONTROL and (not byte_level or set(t) <= spelled)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
            if kind == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def _post_processor(special: dict[str, Optional[str]], add_bos: bool, add_eos: bool, tok: Tokenizer):
    """What encode(text, add_special_tokens=True) adds around the text: BOS and/or EOS, as the file says."""
    bos, eos = special["bos_token"], special["eos_token"]
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    ids = [(bos, tok.token_to_id(bos))] if add_bos else []
    ids += [(eos, tok.token_to_id(eos))] if add_eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)


def _eos_ids(meta: dict[str, Any], tokens: list[str], template: Any) -> list[int]:
    """The ids that end generation: the file's eos, end-of-turn and end-of-message tokens, and the
    known end-of-turn tokens its chat template writes (<|im_end|> for ChatML templates)."""
    ids = [meta.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    texts = template if isinstance(template, str) else " ".join(t["template"] for t in template or [])
    index = {t: i for i, t in enumerate(tokens)}
    ids += [index.get(t) for t in END_OF_TURN_TOKENS if t in texts]
    out: list[int] = []
    for i in ids:
        if i is not None and 0 <= i < len(tokens) and i not in out:
            out.append(int(i))
    return out
