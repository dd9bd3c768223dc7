"""The read passes that `gally bench` holds each timed decode against: _core.ReadProbe, the order
of calls around a decode, and what a failed probe leaves."""

from __future__ import annotations

import importlib
import types

import pytest

import gally
from gally.bench.engine_llamacpp import LlamaCppEngine
from gally.bench.run import PROBE_PASSES, Options, Setup, Test as BenchTest

bench_run = importlib.import_module("gally.bench.run")  # the module: gally.bench.run is also its run()


def test_read_probe_reads_its_buffer_as_often_as_asked():
    probe = gally._core.ReadProbe(3 << 20)
    assert probe.bytes == 4 << 20  # whole 2 MiB pages
    for threads in (1, 2):
        passes = probe.passes(threads, 3)
        assert len(passes) == 3 and all(0.5 < p < 10_000 for p in passes)
    assert 0.5 < gally._core.read_bandwidth(4 << 20, 1, 2) < 10_000  # the best of a probe's passes


@pytest.mark.parametrize("call, match", [
    (lambda: gally._core.ReadProbe(0), "at least 1 byte"),
    (lambda: gally._core.ReadProbe(1 << 20).passes(1, 0), "repeats"),
    (lambda: gally._core.ReadProbe(1 << 20).passes(0, 1), "threads"),
    (lambda: gally._core.read_bandwidth(1 << 20, 1, 0), "repeats"),  # no passes: no best to give
    (lambda: gally._core.read_bandwidth(1 << 20, 0, 1), "threads"),
])
def test_read_probe_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class FakeWorker:
    """A worker that logs its calls in `events` and times every decode at 0.5 s."""

    def __init__(self, name, events):
        self.name, self.events = name, events

    def call(self, op, **args):
        self.events.append((self.name, op, None if args.get("depth_ids") is None else len(args["depth_ids"])))
        return {"seconds": 0.5} if op in ("decode", "prefill") else {}

    def close(self):
        pass


def _interleave(monkeypatch, events, fail=None):
    """bench_run._interleave over fake workers (gally, llama.cpp, ctranslate2) and a fake probe."""

    class Probe:
        def __init__(self, size):
            if fail == "make":
                raise MemoryError("std::bad_alloc")
            events.append(("probe", "made", size))

        def passes(self, threads, repeats):
            if fail == "read":
                raise RuntimeError("cannot start threads")
            events.append(("probe", "passes", threads))
            return [10.0 + i for i in range(repeats)]

    monkeypatch.setattr(gally._core, "ReadProbe", Probe)
    tg, pp = BenchTest("tg", 4, 5), BenchTest("pp", 8)
    inputs = {tg: ([1] * 5, [2] * 4), pp: ([], [3] * 8)}
    names = ("gally", "llama.cpp", "ctranslate2")
    workers = {n: FakeWorker(n, events) for n in names}
    setups = {n: Setup(n, "bf16", 2) for n in names}
    probes, logged = {}, []
    opts = Options(reps=2, bandwidth_bytes=8 << 20)
    seconds = bench_run._interleave(opts, 2, [pp, tg], inputs, workers, setups, "[t]", logged.append, probes)
    return tg, seconds, probes, logged


def test_each_timed_decode_comes_between_read_passes_after_its_context(monkeypatch):
    events = []
    tg, seconds, probes, _ = _interleave(monkeypatch, events)
    assert sum(e[:2] == ("probe", "made") for e in events) == 1  # one buffer for the block
    events = [e for e in events if e[:2] != ("probe", "made")]
    decodes = [i for i, e in enumerate(events) if e[1] == "decode"]
    assert len(decodes) == 3 * 3  # a warm-up and 2 repetitions of each engine
    warm, timed = decodes[:3], decodes[3:]
    for i in warm:  # the warm-up goes the same way, without passes
        name = events[i][0]
        assert events[i - 1] == ((name, "prepare_decode", 5) if name != "ctranslate2" else (name, "prefill", 0))
    for i in timed:
        name = events[i][0]
        assert events[i + 1] == ("probe", "passes", 2)
        if name == "ctranslate2":  # no prepare_decode: the passes come before its whole call
            assert events[i - 1] == ("probe", "passes", 2) and events[i][2] == 5
        else:
            assert events[i - 2:i] == [(name, "prepare_decode", 5), ("probe", "passes", 2)] and events[i][2] is None
    for name in ("gally", "llama.cpp", "ctranslate2"):
        assert seconds[name, tg] == [0.5, 0.5]
        assert probes[name, tg] == [[10.0, 11.0, 12.0] * 2] * 2 and len(probes[name, tg][0]) == 2 * PROBE_PASSES


@pytest.mark.parametrize("fail", ["make", "read"])
def test_a_failed_probe_leaves_the_fractions_out_not_the_run(monkeypatch, fail):
    events = []
    tg, seconds, probes, logged = _interleave(monkeypatch, events, fail)
    assert seconds["gally", tg] == [0.5, 0.5] and probes["gally", tg] == [None, None]
    assert any("read passes failed" in line for line in logged)
    setups = {"gally": Setup("gally", "bf16", 2, info={"weight_bytes": 1000, "kv_bytes_per_token": 10})}
    results = types.SimpleNamespace(rows=[])
    bench_run._rows(Options(reps=2), "bf16", 2, [tg], setups, seconds, probes, results)
    (row,) = results.rows
    assert row.tok_s.mean == 8.0 and row.gb_s is not None
    assert row.bw_fraction is None and row.bw_fraction_best is None


def test_llama_cpp_decodes_in_the_context_prepare_decode_made():
    engine = LlamaCppEngine("model.gguf", "BF16", threads=1, max_context=64)
    calls = []
    engine.llm = types.SimpleNamespace(reset=lambda: calls.append("reset"), eval=lambda ids: calls.append(list(ids)))
    with pytest.raises(ValueError, match="prepare_decode"):
        engine.decode(None, [1])
    engine.prepare_decode([3, 4])
    assert calls == ["reset", [3, 4]]
    engine.decode(None, [1, 2])
    assert calls == ["reset", [3, 4], [1], [2]]  # the prepared context, not a new one
    with pytest.raises(ValueError, match="prepare_decode"):  # one decode per prepare
        engine.decode(None, [1])


def test_transformers_decodes_in_the_cache_prepare_decode_made(monkeypatch):
    """The engine's bookkeeping with torch stubbed (the live engine needs torch, which CI may lack)."""
    import contextlib
    import sys

    from gally.bench.engine_transformers import TransformersEngine

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(
        inference_mode=contextlib.nullcontext, long="long", tensor=lambda data, dtype: data))
    engine = TransformersEngine("folder", "bf16", threads=1)
    caches, calls = [], []
    monkeypatch.setattr(engine, "_fresh", lambda ids: caches.append(list(ids)) or f"cache {len(caches)}")
    monkeypatch.setattr(engine, "_forward", lambda ids, cache: calls.append((ids, cache)))
    with pytest.raises(ValueError, match="prepare_decode"):
        engine.decode(None, [1])
    engine.prepare_decode([3, 4])
    engine.decode(None, [1, 2])
    assert caches == [[3, 4]] and calls == [([[1]], "cache 1"), ([[2]], "cache 1")]
    with pytest.raises(ValueError, match="prepare_decode"):  # one decode per prepare
        engine.decode(None, [1])
    engine.decode([5], [6])  # with its own context, as before
    assert caches == [[3, 4], [5]] and calls[-1] == ([[6]], "cache 2")
