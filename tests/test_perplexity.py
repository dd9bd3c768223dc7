"""Perplexity: llama.cpp's windowed protocol against a direct float64 NumPy computation on a random
checkpoint, the CLI, bad input, and the protocol check on the real model (transformers: 18.155)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import gally
from conftest import make_checkpoint
from gally import cli
from gally.perplexity import perplexity
from generation_helpers import CORPUS, make_text_checkpoint
from reference_numpy import forward

DATA = os.path.join(os.path.dirname(__file__), "data")


def reference_perplexity(folder: str, ids: np.ndarray, ctx: int) -> dict:
    """Each complete window of ctx tokens run from scratch in float64; the tokens of its second
    half, t[ctx/2] … t[ctx-1], scored from the logits one position before each."""
    nll = []
    for start in range(0, len(ids) - ctx + 1, ctx):
        window = [int(t) for t in ids[start: start + ctx]]
        logits = forward(folder, window)
        for i in range(ctx // 2, ctx):
            row = logits[i - 1]
            nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[window[i]])
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return {"ppl": ppl, "stderr": ppl * nll.std(ddof=1) / math.sqrt(len(nll)), "tokens_scored": len(nll)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, _ = make_checkpoint(tmp_path_factory.mktemp("ppl"), vocab_size=97)
    return folder


@pytest.mark.parametrize("n_tokens, ctx", [(70, 16), (64, 16), (50, 8), (33, 32)])
def test_matches_numpy_reference(tiny, n_tokens, ctx):
    model = gally.load(tiny, threads=1)
    ids = np.random.default_rng(n_tokens).integers(0, 97, n_tokens)
    got = perplexity(model, ids, ctx=ctx)
    want = reference_perplexity(tiny, ids, ctx)
    assert got["tokens_scored"] == want["tokens_scored"] == (n_tokens // ctx) * ctx // 2
    assert got["windows"] == n_tokens // ctx and got["ctx"] == ctx
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert got["stderr"] == pytest.approx(want["stderr"], rel=1e-4)


def test_windows_are_independent_and_the_tail_is_dropped(tiny):
    """Swapping windows, or changing the dropped tail, leaves the result as it was."""
    model = gally.load(tiny, threads=1)
    ids = np.random.default_rng(1).integers(0, 97, 48)
    base = perplexity(model, ids, ctx=16)
    swapped = np.concatenate([ids[32:48], ids[0:32]])
    assert perplexity(model, swapped, ctx=16)["ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    assert perplexity(model, np.concatenate([ids, [5, 6, 7]]), ctx=16) == base


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random model with a BPE tokenizer whose post-processor adds BOS when special tokens are
    asked for, so that a test can see that perplexity asks for none."""
    from tokenizers import Tokenizer, processors

    folder = str(make_text_checkpoint(tmp_path_factory.mktemp("ppl_text")))
    path = os.path.join(folder, "tokenizer.json")
    backend = Tokenizer.from_file(path)
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    backend.save(path)
    return folder


def test_text_is_tokenized_without_bos(text_model):
    model = gally.load(text_model, threads=1)
    text = " ".join(CORPUS[:4])
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert model.tokenizer.encode(text, add_special_tokens=True)[0] == 1 != ids[0]
    assert perplexity(model, text, ctx=16) == perplexity(model, ids, ctx=16)


def test_cli_json_and_text(capsys, text_model, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(CORPUS[:6]), encoding="utf-8")
    want = perplexity(gally.load(text_model, threads=1), path.read_text(encoding="utf-8"), ctx=32)
    assert cli.main(["perplexity", "-m", text_model, "-f", str(path), "--ctx", "32", "--json", "-t", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert out.count("\n") == 1
    assert result["ppl"] == pytest.approx(want["ppl"], rel=1e-12)
    assert result["stderr"] == pytest.approx(want["stderr"], rel=1e-12)
    assert result["tokens_scored"] == want["tokens_scored"]
    assert cli.main(["perplexity", "-m", text_model, "-f", str(path), "--ctx", "32", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert f"perplexity {want['ppl']:.4f} ± {want['stderr']:.4f}" in out
    assert f"({want['tokens_scored']} tokens scored in {want['windows']} windows of 32" in out


@pytest.mark.parametrize("argv, message", [
    (["-f", "MISSING"], "no such text file"),
    (["-f", "TEXT", "--ctx", "15"], "ctx must be an even integer >= 2, got 15"),
    (["-f", "TEXT", "--ctx", "4096", "--force-context"], "fewer than one window of ctx=4096"),
    (["-f", "TEXT", "--ctx", "4096"], "past the 256 positions"),
])
def test_cli_bad_arguments(capsys, text_model, tmp_path, argv, message):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS[:6]), encoding="utf-8")
    argv = [str(text) if a == "TEXT" else str(tmp_path / "missing.txt") if a == "MISSING" else a for a in argv]
    assert cli.main(["perplexity", "-m", text_model, "-t", "1", *argv]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (dict(text_or_token_ids=list(range(10)), ctx=7), "ctx must be an even integer >= 2, got 7"),
    (dict(text_or_token_ids=list(range(10)), ctx=0), "ctx must be an even integer >= 2, got 0"),
    (dict(text_or_token_ids=list(range(10)), ctx=True), "ctx must be an even integer"),
    (dict(text_or_token_ids=list(range(10)), ctx=512), "ctx 512 exceeds the model's max_context 256"),
    (dict(text_or_token_ids=list(range(10)), ctx=16), "the text has 10 tokens, fewer than one window of ctx=16"),
    (dict(text_or_token_ids=np.zeros((2, 16), dtype=int), ctx=16), "flat sequence of token ids"),
    (dict(text_or_token_ids=np.zeros(16), ctx=16), "flat sequence of token ids"),
    (dict(text_or_token_ids=[1] * 15 + [97], ctx=16), "token id 97 at index 15 is outside the vocabulary"),
    (dict(text_or_token_ids="some text", ctx=16), "has no tokenizer.json; pass token ids"),
])
def test_bad_input(tiny, args, message):
    model = gally.load(tiny, threads=1)
    with pytest.raises(ValueError, match=message):
        perplexity(model, **args)


# ---- the real model: the protocol check against transformers ----

@pytest.fixture(scope="module")
def smollm():
    from gally import sources

    try:
        return gally.load(max_context=512)
    except sources.DownloadError as e:
        pytest.skip(f"the default model could not be fetched: {e}")


def test_protocol_matches_transformers_on_gpl(smollm):
    """transformers (float32) on the same weights: 18.155 over 3584 scored tokens."""
    with open(os.path.join(DATA, "gpl-3.0.txt"), encoding="utf-8") as f:
        result = perplexity(smollm, f.read(), ctx=512)
    assert result["tokens_scored"] == 3584 and result["windows"] == 14
    assert result["ppl"] == pytest.approx(18.155, rel=1e-3)
    assert 0.5 < result["stderr"] < 1.5


def test_progress_bar_draws_and_clears_its_line():
    import io

    from gally.cli.perplexity import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    bar(1, 4, 20.5)
    assert out.getvalue().startswith("\r[##--------] 1/4 windows  ppl 20.5000")
    bar(4, 4, 18.25)
    assert "[##########] 4/4 windows  ppl 18.2500" in out.getvalue()
    assert out.getvalue().endswith(" " * 70 + "\r")
