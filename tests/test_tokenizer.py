"""The default model's tokenizer against transformers' (built from the same GGUF file): ids for
the reference cases and for many other texts, decoding, streaming, chat templates, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gally import sources
from gally.chat_template import ChatTemplateError
from gally.tokenizer import Tokenizer
from real_model_helpers import CASES, case_ids, reference

TEXTS = [
    "Gally is a smart dog", " leading space", "double  space", "trailing space ", "\n\nnew\nlines\r\n\ttab",
    "numbers 0 12 345 6789 3.14159 1,000,000", "I'm sure you're right, they'll see; don't WON'T it's",
    "Café naïve — 東京 🐕 «woof»", "emoji 👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽", "Ελληνικά русский עברית العربية हिन्दी 한국어",
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_end|><|im_end|>", " <|im_start|> spaced ", "<|im_", "<|endoftext|>x",
    "<repo_name>gally<file_sep>", "def f(x):\n    return {'a': [1, 2]}  # ok\n", "    indented\n        more",
    "a\u00a0b\u2009c\u3000d", "\u200bzero width", "mixed123abc456", "URL https://example.com/a?b=c&d=e#f",
    "!!!???...,,,", "$100 + 50% = €150", "", " ", "\n", "x" * 300, "😀" * 20,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(sources.resolve(None))


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    path = sources.fetch_alias(sources.DEFAULT_MODEL)
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def fuzz_texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pieces = ["the", "The", " dog", "  ", " ", "\n", "\t", "\r\n", "123", "4", "'s", "'RE", "n't", "é", "東京", "🐕",
              "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<jupyter_code>", "<", "|", ">", "-", "—", "\u00a0",
              "ü", "ß", "ŉ", "𝔘", "\u0301", ".", ",", "!", "?", "(", ")", "```", "#", "$", "%"]
    return ["".join(rng.choice(pieces, rng.integers(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("name", case_ids())
def test_reference_tokenization(tok, name):
    ref, case = reference(name), CASES[name]
    if "chat" in case:
        prompt = tok.apply_chat_template(case["chat"])
        assert prompt == ref["prompt_text"]
        assert tok.encode_chat(case["chat"]) == ref["input_ids"]
        assert tok.apply_chat_template(case["chat"], tokenize=True) == ref["input_ids"]
    else:
        assert ref["prompt_text"] == case["text"]
    assert tok.encode(ref["prompt_text"]) == ref["input_ids"]
    assert tok.decode(ref["greedy_ids"]) == ref["greedy_text"]


def test_texts_match_transformers(tok, hf_tok):
    for text in TEXTS + fuzz_texts():
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), repr(text)
        assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True), repr(text)
        assert tok.decode(ids) == hf_tok.decode(ids) == text, repr(text)


def test_decode_matches_transformers(tok, hf_tok):
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 7, 40):
        for _ in range(40):
            ids = rng.integers(0, tok.vocab_size, n).tolist()
            ids[0] = int(rng.choice([ids[0], 1, 2, 0]))  # special tokens now and then
            for skip in (False, True):
                assert tok.decode(ids, skip) == hf_tok.decode(ids, skip_special_tokens=skip), ids


def test_chat_templates_match_transformers(tok, hf_tok):
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
        [{"role": "user", "content": "multi\nline «ü» <|im_end|>"}, {"role": "assistant", "content": "ok"}],
    ]
    for chat in chats:
        for add in (True, False):
            want = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add)
            assert tok.apply_chat_template(chat, add_generation_prompt=add) == want
            hf_ids = hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=add, return_dict=True)
            assert tok.encode_chat(chat, add) == hf_ids["input_ids"]


def test_special_tokens(tok):
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2] and tok.eos_token_id == 2
    assert tok.encode("<|im_end|>") == [2] and tok.encode("<|im_start|>") == [1]
    ids = tok.encode("<|im_start|>assistant\nHello<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHello"
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")  # the GGUF says: no BOS
    chat_ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert chat_ids[0] == 1 and chat_ids[1] != 1  # the template's <|im_start|>, not a second BOS


def stream_pieces(tok, ids, skip=False) -> list[str]:
    stream = tok.stream(skip)
    return [stream.step(i) for i in ids] + [stream.flush()]


def test_stream_never_splits_a_character(tok):
    for name in case_ids():
        ref = reference(name)
        for ids in (ref["input_ids"], ref["greedy_ids"]):
            pieces = stream_pieces(tok, ids)
            assert "".join(pieces) == tok.decode(ids)
            assert not any("\ufffd" in p for p in pieces)
    ids = tok.encode("dog 🐕 東京")
    pieces = stream_pieces(tok, ids)
    assert "🐕" in pieces[:-1] or " 🐕" in pieces[:-1]  # emitted whole, once its last byte arrived
    assert "" in pieces  # while its bytes were arriving


def test_stream_equals_decode_on_any_ids(tok):
    rng = np.random.default_rng(2)
    byte_tokens = [i for i in range(tok.vocab_size) if len(tok.id_to_token(i)) == 1][:256]
    for _ in range(60):
        ids = rng.choice(byte_tokens if rng.random() < 0.5 else tok.vocab_size, rng.integers(1, 30)).tolist()
        for skip in (False, True):
            assert "".join(stream_pieces(tok, ids, skip)) == tok.decode(ids, skip)


def test_stream_continues_after_flush(tok):
    stream = tok.stream()
    first = "".join(stream.step(i) for i in tok.encode("Hello")) + stream.flush()
    second = "".join(stream.step(i) for i in tok.encode(" world")) + stream.flush()
    assert first + second == "Hello world"


def test_chat_template_errors():
    from tokenizers import Tokenizer as Backend, models

    backend = Backend(models.BPE(vocab={"a": 0}, merges=[]))
    strict = Tokenizer(backend, chat_template="{% if messages[0]['role'] != 'user' %}"
                                              "{{ raise_exception('Conversations must start with a user turn') }}"
                                              "{% endif %}{{ messages[0]['content'] }}")
    assert strict.apply_chat_template([{"role": "user", "content": "a"}]) == "a"
    with pytest.raises(ChatTemplateError, match="must start with a user turn"):
        strict.apply_chat_template([{"role": "assistant", "content": "a"}])
    escape = Tokenizer(backend, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="chat template"):
        escape.apply_chat_template([{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="not valid Jinja"):
        Tokenizer(backend, chat_template="{% for %}").apply_chat_template([{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(backend).apply_chat_template([{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        strict.apply_chat_template(["hello"])
    with pytest.raises(ValueError, match="messages must be a list"):
        strict.apply_chat_template("hello")
    tools = Tokenizer(backend,
                      chat_template="{{ tools is none }}|{{ strftime_now('%Y') | length }}|{{ {'é': 1} | tojson }}")
    assert tools.apply_chat_template([]) == 'True|4|{"é": 1}'


def test_bad_ids_and_text(tok):
    for bad in ([-1], [tok.vocab_size], ["a"], [1.5]):
        with pytest.raises(ValueError, match="token id"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="token id"):
        tok.stream().step(10**6)
    with pytest.raises(ValueError, match="must be a str"):
        tok.encode(b"bytes")


def test_bad_folders(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_folder(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_folder(str(tmp_path))
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_folder(str(tmp_path))
    # the Hugging Face spellings: {"content": ...} special tokens, chat_template.jinja, eos lists
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"},
                                                                "bos_token": "<|im_start|>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}<|eot_id|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    t = Tokenizer.from_folder(str(tmp_path))
    assert t.eos_token_ids == [0, 2] and t.bos_token_id == 1
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|eot_id|>"
