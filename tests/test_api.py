"""The public API as an editor or help() shows it: documented, keyword signatures, typed, and the
submodules the README names importable as written."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import gally
from gally.generate import Conversation
from gally.text import Chunk, Completion

PUBLIC = [gally.load, gally.Model.generate, gally.Model.chat, gally.Model.start_chat, gally.Model.session,
          gally.Model.logits, gally.Model.runner, gally.Model.unembed, Conversation.send, gally.Session.append,
          gally.Session.forward, gally.Session.truncate, gally.Session.fork, gally.info, Completion, Chunk]


def test_public_functions_are_documented_with_their_parameters():
    for f in PUBLIC:
        assert f.__doc__ and len(f.__doc__.split()) >= 8, f.__qualname__
    load = inspect.signature(gally.load)
    for name in ("source", "dtype", "threads", "max_context", "kv_cache_bytes", "kv_dtype", "force_context"):
        assert name in load.parameters and name in gally.load.__doc__
    for name in ("prompt", "max_new_tokens", "temperature", "stop", "logprobs", "stream", "batch_size"):
        assert name in gally.Model.generate.__doc__, name


def test_the_package_is_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(gally.__file__), "py.typed"))
    hints = inspect.signature(gally.load)
    assert hints.return_annotation in ("Model", gally.Model)


def test_submodules_named_in_the_readme_need_no_import():
    code = ("import gally; "
            "print(gally.perplexity.perplexity.__name__, gally.Engine.__name__, gally.options.OPTIONS[0].name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["perplexity", "Engine", "max_new_tokens"]


def test_max_tokens_is_an_alias_and_unknown_options_name_the_options(tmp_path):
    import pytest

    from conftest import make_checkpoint

    model = gally.load(make_checkpoint(tmp_path)[0], threads=1)
    assert len(model.generate([1, 2, 3], max_tokens=3, temperature=0).token_ids) == 3
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lenght'"):
        model.generate([1, 2, 3], max_lenght=3)


def test_public_functions_are_fully_annotated():
    for f in PUBLIC:
        if inspect.isclass(f):
            continue
        sig = inspect.signature(f)
        bare = [n for n, p in sig.parameters.items()
                if n != "self" and p.kind is not p.VAR_KEYWORD and p.annotation is inspect.Parameter.empty]
        assert not bare, f"{f.__qualname__}: {bare} not annotated"
        assert sig.return_annotation is not inspect.Signature.empty, f.__qualname__


def test_conversation_send_takes_the_options_by_name(tmp_path):
    import pytest

    from gally.options import ALIASES, OPTIONS
    from generation_helpers import make_text_checkpoint

    params = inspect.signature(Conversation.send).parameters
    assert set(params) - {"self", "text", "stream", "progress"} == {o.name for o in OPTIONS} | set(ALIASES)
    conv = gally.load(make_text_checkpoint(tmp_path / "m"), threads=1).start_chat()
    assert len(conv.send("Hi", max_tokens=2, temperature=0, ignore_eos=True).token_ids) == 2
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lenght'"):
        conv.send("Hi", max_lenght=2)
    with pytest.raises(ValueError, match="either max_new_tokens or its alias max_tokens"):
        conv.send("Hi", max_tokens=2, max_new_tokens=3)
