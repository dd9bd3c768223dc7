"""The CTranslate2 peer of gally bench: reported, not faked, when absent; its engine's calls and
timings against a stand-in module; and, where ctranslate2, torch and transformers are installed, a
small checkpoint converted by CTranslate2's converter and measured beside gally int8."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types

import numpy as np
import pytest

import gally
from conftest import make_checkpoint
from gally import cli
from gally.bench import derived, peer_ct2
from gally.bench.engine_ctranslate2 import CTranslate2Engine

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)
REAL = all(importlib.util.find_spec(m) for m in ("ctranslate2", "torch", "transformers", "tokenizers"))


def _bench_json(argv, capsys) -> dict:
    assert cli.main(["bench", "--bandwidth-mib", "8", "--json", "-q", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_absent_ctranslate2_is_reported_not_measured(tmp_path, monkeypatch, capsys):
    folder = make_checkpoint(tmp_path / "m", **SMALL)[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else real(name, *a))
    monkeypatch.setenv("GALLY_HOME", str(tmp_path / "home"))
    data = _bench_json(["-m", folder, "--dtype", "int8", "-p", "4", "-n", "2", "-r", "1", "-t", "1",
                        "--peers", "ctranslate2", "--no-generate"], capsys)
    assert data["peers"]["ctranslate2"]["int8"] == "not installed (pip install ctranslate2==4.8.5 (converting needs " \
                                                   "torch and transformers as well))"
    assert {s["engine"] for s in data["setups"]} == {"gally"}
    assert {r["engine"] for r in data["rows"]} == {"gally"}


def test_ctranslate2_pairs_with_int8_only(tmp_path):
    folder = make_checkpoint(tmp_path / "m", **SMALL)[0]
    for dtype in ("f32", "bf16", "int4"):
        with pytest.raises(derived.PeerUnavailable, match=f"CTranslate2 int8 with gally's int8 only, not {dtype}"):
            peer_ct2.ct2_folder(folder, dtype, cache_dir=str(tmp_path / "c"))


def test_converting_without_torch_says_what_is_missing(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path / "m", **SMALL)[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(derived.PeerUnavailable, match="no CTranslate2 model cached at .*-ct2-int8, and its converter "
                                                      "needs torch"):
        peer_ct2.ct2_folder(folder, "int8", cache_dir=str(tmp_path / "c"))
    assert not os.path.exists(peer_ct2.cached_folder(folder, "int8", str(tmp_path / "c")))


class _FakeGenerator:
    """Records what the engine asks of ctranslate2.Generator; each step takes `step_s`."""

    step_s = 0.002
    calls: list = []

    def __init__(self, path, **options):
        time.sleep(self.step_s)  # loading takes time, which load() reports
        self.init = (path, options)
        self.compute_type = options["compute_type"]

    def generate_batch(self, start_tokens, callback=None, **options):
        _FakeGenerator.calls.append((start_tokens, options))
        for step in range(options["max_length"]):
            time.sleep(self.step_s)
            if callback is not None and callback(step):
                break


@pytest.fixture
def fake_ct2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", types.SimpleNamespace(Generator=_FakeGenerator, __version__="0"))
    (tmp_path / "vocabulary.json").write_text(json.dumps([f"t{i}" for i in range(10)]))
    (tmp_path / "model.bin").write_bytes(b"\0" * 123)
    _FakeGenerator.calls = []
    return str(tmp_path)


def test_engine_asks_one_generation_on_t_threads_and_times_n_steps(fake_ct2):
    e = CTranslate2Engine(folder=fake_ct2, compute_type="int8", threads=3)
    assert _FakeGenerator.step_s <= e.load() < 1
    assert e.generator.init == (fake_ct2, {"device": "cpu", "compute_type": "int8", "intra_threads": 3,
                                           "inter_threads": 1})
    info = e.info()
    assert info["file_bytes"] == 123 and info["weights"] == "int8" and info["threads"] == 3

    r = e.prefill([], [4, 5, 6])
    (tokens, options), = _FakeGenerator.calls
    assert tokens == [["t4", "t5", "t6"]]
    assert options == {"include_prompt_in_result": False, "sampling_topk": 1, "static_prompt": None, "max_length": 1}
    assert r["seconds"] >= _FakeGenerator.step_s and r["ttft"] == r["seconds"]

    # tg4 after a 2-token context: one start token, 5 steps; the clock runs from the first to the last
    r = e.decode([7, 8], [1, 2, 3, 9])
    tokens, options = _FakeGenerator.calls[-1]
    assert tokens == [["t1"]] and options["static_prompt"] == ["t7", "t8"]
    assert options["max_length"] == options["min_length"] == 5 and options["include_prompt_in_result"] is False
    assert 4 * _FakeGenerator.step_s <= r["seconds"] < 5 * _FakeGenerator.step_s + 0.05
    assert e.prefill([7], [1])["ttft"] is None  # time to first token at depth 0 only


def test_engine_fails_when_generation_stops_early(fake_ct2, monkeypatch):
    e = CTranslate2Engine(folder=fake_ct2, compute_type="int8", threads=1)
    e.load()
    monkeypatch.setattr(_FakeGenerator, "generate_batch", lambda self, start, callback=None, **o: callback(0))
    with pytest.raises(RuntimeError, match="made 1 steps, not the 4 asked for"):
        e.decode([], [1, 2, 3])


def test_engine_names_a_missing_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="vocabulary.json: cannot read the CTranslate2 vocabulary"):
        CTranslate2Engine(folder=str(tmp_path), compute_type="int8", threads=1)


def _with_tokenizer(folder):
    """A word-level tokenizer over the checkpoint's vocabulary: what the converter reads its vocabulary from."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SMALL["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "bos_token": "t1",
                   "eos_token": "t2"}, f)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not REAL:
        pytest.skip("needs ctranslate2, torch, transformers and tokenizers")
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("gally_home")
        mp.setenv("GALLY_HOME", str(home))
        folder = _with_tokenizer(make_checkpoint(tmp_path_factory.mktemp("m"), **SMALL)[0])
        yield folder, peer_ct2.ct2_folder(folder, "int8")


def test_converted_model_computes_the_same_function(converted):
    import ctranslate2

    folder, out = converted
    assert out == peer_ct2.cached_folder(folder, "int8") and sorted(os.listdir(out)) == [
        "config.json", "model.bin", "vocabulary.json"]
    vocab = json.load(open(os.path.join(out, "vocabulary.json")))
    ids = np.random.default_rng(0).integers(0, SMALL["vocab_size"], 20)
    ours = gally.load(folder, threads=1).session(32).forward(ids.astype(np.int32), all_logits=True)
    theirs = np.array(ctranslate2.Generator(out, compute_type="int8", intra_threads=1)
                      .forward_batch([[vocab[i] for i in ids]]))[0]
    # int8 weights and activations against f32; a wrong mapping (q/k row order, a swapped matrix) scores far lower
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999


def test_bench_measures_ctranslate2_beside_gally_int8(converted, capsys):
    folder, out = converted
    data = _bench_json(["-m", folder, "--dtype", "int8", "-p", "8", "-n", "4", "-d", "0,5", "-r", "1", "-t", "1",
                        "--peers", "ctranslate2", "--no-generate"], capsys)
    assert data["peers"]["ctranslate2"] == {"int8": "measured"}
    setup = next(s for s in data["setups"] if s["engine"] == "ctranslate2")
    assert setup["error"] == "" and setup["info"]["path"] == out
    assert setup["weights"] == "int8_float32"  # as CTranslate2 names int8 weights with float32 elsewhere
    rows = {r["test"]["label"]: r for r in data["rows"] if r["engine"] == "ctranslate2"}
    assert set(rows) == {"pp8", "tg4", "pp8 @ d5", "tg4 @ d5"}
    assert all(r["tok_s"]["mean"] > 0 for r in rows.values())
