"""gally bench: its statistics, its tables and JSON, its peers' bookkeeping, on a small random checkpoint."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest

import gally
import gguf_helpers
from conftest import make_checkpoint, write_safetensors
from gally import _core, cli
from gally.bench import peer_gguf, report
from gally.bench.llama_bench import parse as parse_llama_bench
from gally.bench.run import PROBE_PASSES, Options, Test as BenchTest, run
from gally.bench.stats import Stat, rates
from gally.bench.worker import Worker, WorkerError
from gally.dtypes import bf16_bits

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench_model"), **SMALL)[0]


@pytest.fixture(scope="module")
def result(folder):
    """One small run without peers: 2 dtypes × (pp8, tg4, each also at depth 5), 3 repetitions."""
    opts = Options(model=folder, dtypes=["f32", "bf16"], prompts=[8], gens=[4], threads=[1], depths=[0, 5],
                   reps=3, bandwidth_bytes=16 << 20)
    return run(opts, command="gally bench (test)")


def test_stat_is_mean_and_sample_std():
    s = Stat.of([1, 2, 3, 4])
    assert s.mean == 2.5
    assert math.isclose(s.std, math.sqrt(5 / 3))  # (1.5² + 0.5² + 0.5² + 1.5²) / (4 - 1)
    assert Stat.of([7.0]).std == 0.0
    assert s.format(1) == "2.5 ± 1.3"
    assert s.scaled(-2).mean == -5 and math.isclose(s.scaled(-2).std, 2 * s.std)


def test_rates_average_per_repetition_rates_like_llama_bench():
    # 100 tokens in 1 s and in 4 s: rates 100 and 25, mean 62.5 (not 200 tokens / 5 s = 40)
    r = rates(100, [1.0, 4.0])
    assert r.samples == (100.0, 25.0)
    assert r.mean == 62.5
    assert math.isclose(r.std, math.sqrt(2 * 37.5 ** 2))


@pytest.mark.parametrize("bad", [[], [0.0, 1.0], [-1.0]])
def test_stats_reject_empty_or_non_positive_timings(bad):
    with pytest.raises(ValueError, match="sample|positive"):
        rates(10, bad) if bad else Stat.of(bad)


def test_rows_cover_every_test_and_dtype(result):
    gally_rows = [r for r in result.rows if r.engine == "gally"]
    got = {(r.dtype, r.test.label) for r in gally_rows}
    assert got == {(d, t) for d in ("f32", "bf16") for t in ("pp8", "tg4", "pp8 @ d5", "tg4 @ d5")}
    for r in gally_rows:
        assert len(r.tok_s.samples) == 3 and all(x > 0 for x in r.tok_s.samples)
        assert math.isclose(r.tok_s.mean, sum(r.tok_s.samples) / 3)


def test_generate_row_is_paired_with_raw_decode(result):
    # Model.generate's row carries the raw decode rate measured alternately with it and their ratio
    rows = [r for r in result.rows if r.engine == "gally generate"]
    assert {r.dtype for r in rows} == {"f32", "bf16"}
    for r in rows:
        assert len(r.tok_s.samples) == 3
        m = re.search(r"raw Session.append decode alternated with it: ([0-9.]+) tok/s, generate / raw ([0-9.]+)",
                      r.note)
        assert m, r.note
        assert float(m.group(1)) > 0 and math.isclose(float(m.group(2)), r.tok_s.mean / float(m.group(1)), rel_tol=0.01)


def test_decode_bandwidth_is_bytes_read_times_rate(result, folder):
    """GB/s counts the weights and the KV cache a step attends to: tg4 @ d5 reads the keys and values
    of 6, 7, 8 and 9 positions."""
    for dtype in ("f32", "bf16"):
        m = gally.load(folder, dtype=dtype, threads=1)
        setup = next(s for s in result.setups if s.engine == "gally" and s.dtype == dtype)
        assert setup.info["weight_bytes"] == m.weight_bytes and setup.weights == dtype
        for r in result.rows:
            if r.engine == "gally" and r.dtype == dtype:
                if r.test.kind == "tg":
                    positions = np.mean([r.test.depth + i + 1 for i in range(r.test.tokens)])
                    read = m.weight_bytes + m.kv_bytes_per_token * positions
                    assert np.allclose(r.gb_s.samples, np.array(r.tok_s.samples) * read / 1e9)
                    # against the read passes just before and after each repetition, not a probe minutes away
                    assert 0 < result.block_bandwidth[f"{dtype} t1"] <= result.bandwidth[1]
                    passes = np.array(r.read_passes)
                    assert passes.shape == (len(r.gb_s.samples), 2 * PROBE_PASSES) and (passes > 0).all()
                    assert np.allclose(r.bw_fraction.samples, np.array(r.gb_s.samples) / passes.mean(axis=1))
                    assert np.allclose(r.bw_fraction_best.samples, np.array(r.gb_s.samples) / passes.max(axis=1))
                else:
                    assert r.gb_s is None


def test_setup_has_load_ttft_and_own_peak_rss(result, folder):
    for s in result.setups:
        assert s.error == ""
        assert s.info["file_bytes"] == os.path.getsize(os.path.join(folder, "model.safetensors"))
        # keys and values: layers × (k, v) × KV heads × head_dim × context (pp8 @ d5 → 256) × 4 bytes for
        # f32 weights' f32 cache, 2 for the other weights' f16 cache
        element = 4 if s.dtype == "f32" else 2
        assert s.info["max_context"] == 256 and s.info["kv_bytes"] == 2 * 2 * 2 * 16 * 256 * element
        assert len(s.load_s.samples) == 3 and s.load_s.mean > 0
        assert set(s.ttft_s) == {8} and s.ttft_s[8].mean > 0  # TTFT at depth 0 only
        # the worker's own peak: a Python process with NumPy, not the parent's bandwidth buffer
        assert 10 << 20 < s.peak_rss < 400 << 20


def _table(md: str, heading: str) -> list:
    lines = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    return [line for line in lines if line.startswith("|")]


def test_markdown_tables_are_well_formed(result):
    md = report.markdown(result)
    assert md.startswith("# gally bench\n")
    assert "| command | `gally bench (test)` |" in md
    assert "| ISA |" in md and "| read bandwidth | 1 thread: " in md
    assert "| system load | 1-min load average before → after each block: f32 t1: " in md
    rows = _table(md, "Throughput")
    assert rows[0].startswith("| engine | weights | threads | test | tok/s |")
    assert all(line.count("|") == rows[0].count("|") for line in rows)
    body = [line.split(" | ") for line in rows[2:]]
    gally_body = [c for c in body if c[0] == "| gally"]
    assert len(gally_body) == 8
    for cells in gally_body:
        mean, std = cells[4].split(" ± ")
        row = next(r for r in result.rows if r.engine == "gally" and r.weights == cells[1] and r.test.label == cells[3])
        assert float(mean) == pytest.approx(row.tok_s.mean, abs=0.006) and float(std) >= 0
        assert (cells[5] == "—") == (row.test.kind == "pp")
        if row.test.kind == "tg":  # the shares of the read passes' mean and of their best
            assert cells[6] == f"{row.bw_fraction.mean * 100:.0f} ± {row.bw_fraction.std * 100:.0f}%"
            assert cells[7] == f"{row.bw_fraction_best.mean * 100:.0f} ± {row.bw_fraction_best.std * 100:.0f}%"
    assert rows[0].startswith("| engine | weights | threads | test | tok/s | GB/s | of read bw | of best pass |")
    assert "## gally / peers" not in md  # no peer measured, no ratio table
    setup = _table(md, "Start-up and memory")
    assert setup[0] == ("| engine | weights | threads | load s | TTFT ms (p8) | file MB | KV cache MB | peak RSS MB "
                        "| RSS − file − KV MB | note |")
    assert len(setup) == 2 + 2
    for line, s in zip(setup[2:], result.setups):
        cells = [c.strip() for c in line.strip()[1:-1].split("|")]
        assert cells[5] == f"{s.info['file_bytes'] / 2**20:.0f}" and cells[6] == f"{s.info['kv_bytes'] / 2**20:.0f}"
        # f32 maps the file; bf16 converts it at load, so its RSS says nothing about the file
        beyond = (s.peak_rss - s.info["file_bytes"] - s.info["kv_bytes"]) / 2**20
        assert cells[8] == (f"{beyond:.0f}" if s.dtype == "f32" else "—")


def test_json_round_trips_every_figure(result):
    data = json.loads(report.dumps(result))
    assert data["options"]["reps"] == 3 and data["bandwidth"]["1"] > 0
    assert data["machine"]["gally"]["isa"] == gally.info()["isa"]
    rows = [r for r in data["rows"] if r["engine"] == "gally"]
    assert len(rows) == 8
    for r, orig in zip(rows, [r for r in result.rows if r.engine == "gally"]):
        assert r["test"]["label"] == orig.test.label
        assert r["tok_s"]["samples"] == list(orig.tok_s.samples)
        assert r["tok_s"]["mean"] == orig.tok_s.mean and r["tok_s"]["std"] == orig.tok_s.std


def test_ratio_table_divides_gally_by_the_peer(result):
    peer = [type(r)(**{**r.__dict__, "engine": "llama.cpp", "tok_s": r.tok_s.scaled(0.5)})
            for r in result.rows if r.engine == "gally"]
    res = type(result)(**{**result.__dict__, "rows": result.rows + peer})
    rows = _table(report.markdown(res), "gally / peers (same run)")
    assert rows[0] == "| gally | threads | test | gally tok/s | llama.cpp tok/s | gally/llama.cpp |"
    assert len(rows) == 2 + 8 and all(line.endswith("| **2.00×** |") for line in rows[2:])


@pytest.mark.parametrize("absent, message", [
    (("torch",), "not installed: no torch (pip install torch==2.13.0 transformers)"),
    (("torch", "transformers"), "not installed: no torch and transformers (pip install torch==2.13.0 transformers)"),
])
def test_absent_peers_are_reported_not_measured(folder, monkeypatch, tmp_path, capsys, absent, message):
    real = importlib.util.find_spec
    # llama_cpp "installed" but no GGUF can be made; the `absent` modules missing and the others
    # "installed", whatever this machine has
    fake = {"llama_cpp": object(), "torch": object(), "transformers": object(), **dict.fromkeys(absent)}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake[name] if name in fake else real(name, *a))
    monkeypatch.setenv("GALLY_HOME", str(tmp_path))
    monkeypatch.delenv("GALLY_LLAMA_CPP", raising=False)
    monkeypatch.delenv("GALLY_LLAMA_CPP_BIN", raising=False)
    code = cli.main(["bench", "-m", folder, "--dtype", "bf16", "-p", "4", "-n", "2", "-r", "1", "-t", "1",
                     "--peers", "llama.cpp,transformers", "--bandwidth-mib", "8", "--json", "-q",
                     "--out", str(tmp_path / "r.md")])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peers"]["transformers"]["bf16"] == message
    assert "no BF16 GGUF cached" in data["peers"]["llama.cpp"]["bf16"]
    assert "--llama-cpp DIR" in data["peers"]["llama.cpp"]["bf16"]
    assert {r["engine"] for r in data["rows"]} == {"gally", "gally generate"}
    assert {s["engine"] for s in data["setups"]} == {"gally"}
    md = (tmp_path / "r.md").read_text()
    assert f"| peer status | transformers at bf16: {message}" in md


def test_cli_lists_accept_commas_and_repeats():
    from gally.bench.cli import command_of, options

    args = cli.build_parser().parse_args(["bench", "-p", "16,32", "-p", "64", "-t", "1", "-t", "2,4",
                                          "--dtype", "bf16", "--peers", "llama.cpp", "--gguf", "bf16=/x.gguf"])
    opts = options(args)
    assert opts.prompts == [16, 32, 64] and opts.threads == [1, 2, 4] and opts.gens == [128]
    assert opts.dtypes == ["bf16"] and opts.peers == ["llama.cpp"] and opts.ggufs == {"bf16": "/x.gguf"}
    assert opts.reps == 5 and opts.depths == [0] and opts.model is None
    again = options(cli.build_parser().parse_args(command_of(opts).split()[1:]))
    assert again == opts


@pytest.mark.parametrize("argv, message", [
    (["-p", "-3"], "prompts \\(-p\\)"),
    (["-t", "0"], "threads \\(-t\\)"),
    (["-r", "0"], "reps \\(-r\\)"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["--dtype", "f64"], "dtype 'f64'"),
    (["--peers", "vllm"], "peer 'vllm'"),
    (["--gguf", "bf16=/no/such.gguf"], "no such file"),
])
def test_bad_arguments_are_named(folder, argv, message, capsys):
    assert cli.main(["bench", "-m", folder, "-q", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gally: error: ")
    assert __import__("re").search(message, err), err


def test_bad_model_is_an_error_not_a_crash(tmp_path, capsys):
    assert cli.main(["bench", "-m", str(tmp_path / "missing"), "-q"]) == 1
    assert "missing" in capsys.readouterr().err


def test_non_integer_list_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "-p", "512,abc"])
    assert e.value.code == 2


def test_peers_get_the_launch_environment_not_gallys_import_settings(tmp_path):
    import os
    import subprocess
    import sys

    # a process whose environment gally's import may change (GOMP_SPINCOUNT) reports what a peer would get
    code = ("import os, json; os.environ['GALLY_BENCH_TEST_ADDED'] = '1'; "
            "from gally.bench.worker import launch_environment as l; e = l(); "
            "print(json.dumps([e.get('GALLY_BENCH_TEST_ADDED'), e.get('GALLY_BENCH_TEST_KEPT'), "
            "'GOMP_SPINCOUNT' in e]))")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["GALLY_BENCH_TEST_KEPT"] = "yes"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [None, "yes", False]


def test_worker_reports_a_failing_engine():
    with pytest.raises(WorkerError, match="unknown engine 'nonesuch'"):
        Worker("nonesuch", {})


def test_llama_bench_json_is_read_per_test():
    # the fields llama-bench -o json writes that the harness reads (build 0c1e570)
    text = json.dumps([
        {"build_commit": "0c1e570", "model_type": "llama 256M BF16", "n_prompt": 512, "n_gen": 0, "n_depth": 0,
         "avg_ns": 1e9, "avg_ts": 500.0, "stddev_ts": 10.0, "samples_ts": [490.0, 510.0]},
        {"build_commit": "0c1e570", "model_type": "llama 256M BF16", "n_prompt": 0, "n_gen": 128, "n_depth": 2048,
         "avg_ts": 60.0, "stddev_ts": 1.0},
    ])
    got, about = parse_llama_bench(text)
    assert about == "build 0c1e570, llama 256M BF16"
    assert got[("pp", 512, 0)] == Stat.of([490.0, 510.0])
    assert got[("tg", 128, 2048)].mean == 60.0 and got[("tg", 128, 2048)].std == 1.0
    assert BenchTest("tg", 128, 2048).label == "tg128 @ d2048"


def _write_peer_gguf(path, weights, cfg, dtype, tamper=None, permute=True):
    """A GGUF laid out as convert_hf_to_gguf.py writes a Llama: llama.cpp names, q/k rows permuted
    (by the tests' own name table and permutation, not the library's)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for name, a in weights.items():
        a = np.asarray(a, dtype=np.float32)
        if "q_proj" in name and permute:
            a = gguf_helpers.permute(a, cfg["num_attention_heads"])
        elif "k_proj" in name and permute:
            a = gguf_helpers.permute(a, cfg["num_key_value_heads"])
        if name == tamper:
            a = a.copy()
            a.flat[5] = np.nextafter(a.flat[5], np.float32(np.inf))
        if a.ndim == 2 and dtype == "bf16":
            w.add_tensor(gguf_helpers.gguf_name(name), bf16_bits(a), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(gguf_helpers.gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_peer_gguf_check_accepts_the_same_weights_only(tmp_path, dtype):
    folder, stored = make_checkpoint(tmp_path / "m", **SMALL)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    _write_peer_gguf(tmp_path / "good.gguf", stored, cfg, dtype)
    peer_gguf.check_same_weights(folder, str(tmp_path / "good.gguf"), dtype)
    # one value one ulp off (f32), or off in a row the q permutation moves
    tamper = "model.layers.1.self_attn.q_proj.weight" if dtype == "bf16" else "model.layers.0.mlp.up_proj.weight"
    _write_peer_gguf(tmp_path / "bad.gguf", {**stored, tamper: stored[tamper] * (1.01 if dtype == "bf16" else 1)},
                     cfg, dtype, tamper=None if dtype == "bf16" else tamper)
    with pytest.raises(peer_gguf.PeerUnavailable, match="differs from " + tamper.replace(".", r"\.")):
        peer_gguf.check_same_weights(folder, str(tmp_path / "bad.gguf"), dtype)
    # q/k rows left in Hugging Face order: the check sees that llama.cpp would compute something else
    _write_peer_gguf(tmp_path / "order.gguf", stored, cfg, dtype, permute=False)
    with pytest.raises(peer_gguf.PeerUnavailable, match="q_proj"):
        peer_gguf.check_same_weights(folder, str(tmp_path / "order.gguf"), dtype)


def test_peer_gguf_check_names_a_tensor_llama_cpp_has_no_name_for(tmp_path):
    folder, stored = make_checkpoint(tmp_path / "m", **SMALL)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    _write_peer_gguf(tmp_path / "good.gguf", stored, cfg, "f32")
    write_safetensors(os.path.join(folder, "model.safetensors"),
                      {**stored, "model.vision_tower.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(peer_gguf.PeerUnavailable, match="tensor 'model.vision_tower.weight' has no llama.cpp name"):
        peer_gguf.check_same_weights(folder, str(tmp_path / "good.gguf"), "f32")


def test_peer_gguf_check_refuses_a_quantized_folder(tmp_path):
    from gally import quantize

    folder, stored = make_checkpoint(tmp_path / "m", **SMALL)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    _write_peer_gguf(tmp_path / "good.gguf", stored, cfg, "f32")
    out = str(tmp_path / "q")
    quantize.quantize_folder(folder, out, "int8")
    with pytest.raises(peer_gguf.PeerUnavailable, match=r"q: tensor '.*qweight' has dtype I8, not F32/BF16/F16"):
        peer_gguf.check_same_weights(out, str(tmp_path / "good.gguf"), "f32")


def test_peer_gguf_cache_key(tmp_path):
    folder = make_checkpoint(tmp_path / "m", **SMALL)[0]
    a = peer_gguf.cached_path(folder, "bf16", str(tmp_path / "c"))
    assert a.endswith("-BF16.gguf") and a == peer_gguf.cached_path(folder, "bf16", str(tmp_path / "c"))
    make_checkpoint(tmp_path / "m", seed=1, **{**SMALL, "vocab_size": 301})  # new contents, new key
    assert peer_gguf.cached_path(folder, "bf16", str(tmp_path / "c")) != a
    with pytest.raises(peer_gguf.PeerUnavailable, match="no weight type matching"):
        peer_gguf.peer_gguf(folder, "f64", None, None, str(tmp_path / "c"))


# ---- --batch, --serve's report and the plots ----

def test_batch_mode_measures_batches_and_draws_them(folder, tmp_path, capsys):
    out = tmp_path / "batch.md"
    code = cli.main(["bench", "-m", folder, "--dtype", "bf16", "-p", "6", "-n", "3", "-r", "2", "-t", "1",
                     "--batch", "1,3", "--out", str(out), "--plot", str(tmp_path / "batch.png"), "-q"])
    assert code == 0
    md = out.read_text()
    assert "| 1 |" in md and "| 3 |" in md and "gally bench --batch" in md
    for line in (row for row in md.splitlines() if row.startswith("| 3 |")):
        agg, per = (float(c.split(" ± ")[0]) for c in line.split("|")[3:5])
        assert agg > 0 and abs(agg / 3 - per) <= 0.051  # aggregate = 3 × per sequence (to the printed 0.1)
    png, svg = tmp_path / "batch.png", tmp_path / "batch.svg"  # --plot, and the plot beside --out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg")) and svg.stat().st_size > 10_000


def test_plots_of_a_run_and_of_a_load_test(result, tmp_path):
    from gally.bench import load, plot

    path = plot.plot_results(result, str(tmp_path / "run.svg"))
    assert os.path.getsize(path) > 10_000 and "tokens/s" in open(path).read()
    rows = [{"url": "http://127.0.0.1:8000/v1", "model": "m", "concurrency": 8, "aggregate_tok_s": 120.0,
             "ttft_p50": 0.1, "ttft_p99": 0.3, "itl_p50": 0.02, "itl_p99": 0.05, "completed": 32, "failed": 0,
             "completion_tokens": 4096, "request_tok_s_mean": 15.0}]
    assert os.path.getsize(plot.plot_load(rows, str(tmp_path / "load.svg"))) > 5_000
    assert "| 8 | 32 / 0 | 4096 | 120.0 |" in load.markdown(rows)
    with pytest.raises(ValueError, match="must end in .svg, .png or .pdf"):
        plot.plot_load(rows, str(tmp_path / "load.txt"))


def test_random_shapes_and_sequential_engines(tmp_path, monkeypatch):
    """--shape writes random weights in a real model's shapes once into the cache (config as the real
    model's), and --sequential runs the engines one after another with the same rows."""
    from gally.bench import random_model

    cfg = random_model.SHAPES["llama-3.1-8b"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (4096, 14336, 32, 8, 128256, False)
    assert abs(random_model.file_bytes("llama-3.1-8b", "bf16") / 1e9 - 16.06) < 0.05  # 8.03 B parameters
    assert abs(random_model.file_bytes("llama-3.2-1b", "bf16") / 1e9 - 2.47) < 0.05   # tied: 1.24 B
    monkeypatch.setitem(random_model.SHAPES, "tiny", {**random_model.SHAPES["llama-3.2-1b"], "hidden_size": 64,
                        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300})
    monkeypatch.setenv("GALLY_HOME", str(tmp_path))
    opts = Options(shape="tiny", dtypes=["bf16"], prompts=[8], gens=[4], threads=[1], reps=2,
                   bandwidth_bytes=16 << 20, sequential=True)
    res = run(opts)
    assert {(r.engine, r.test.label) for r in res.rows} == {("gally", "pp8"), ("gally", "tg4"),
                                                            ("gally generate", "tg3")}  # steps after the first
    folder = res.model["bf16"]
    assert folder.endswith("random-tiny-bf16") and gally.load(folder).config.rope_scaling["rope_type"] == "llama3"
    with open(os.path.join(folder, "tokenizer.model"), "rb") as f:  # for llama.cpp's converter
        assert f.read() == random_model.sentencepiece_model()
    with pytest.raises(ValueError, match="either -m MODEL or --shape"):
        Options(model="x", shape="tiny").validate()


def _protobuf_fields(data: bytes) -> list:
    """(field number, value) of a protobuf message: varints as int, 32-bit fields as bytes,
    length-delimited fields as bytes."""
    def varint(i):
        n = shift = 0
        while True:
            b = data[i]
            n |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return n, i
    out, i = [], 0
    while i < len(data):
        key, i = varint(i)
        kind = key & 7
        if kind == 0:
            v, i = varint(i)
        elif kind == 5:
            v, i = data[i:i + 4], i + 4
        else:
            assert kind == 2, kind
            n, i = varint(i)
            v, i = data[i:i + n], i + n
        out.append((key >> 3, v))
    return out


def test_random_model_tokenizer_is_a_sentencepiece_model():
    """The random folders' tokenizer.model, which llama.cpp's convert_hf_to_gguf.py loads with
    SentencePiece: pieces <unk> (unknown), <s>, </s> (control), then normal pieces; a unigram
    trainer spec whose vocab_size counts them; the identity normaliser."""
    from gally.bench import random_model

    fields = _protobuf_fields(random_model.sentencepiece_model())
    pieces = []
    for number, v in fields:
        if number == 1:
            f = dict(_protobuf_fields(v))
            pieces.append((f[1].decode(), f[3]))
    assert pieces[:3] == [("<unk>", 2), ("<s>", 3), ("</s>", 3)]
    assert len(pieces) > 3 and all(kind == 1 and text.startswith("\u2581") for text, kind in pieces[3:])
    trainer = dict(_protobuf_fields(dict(fields)[2]))
    assert trainer == {3: 1, 4: len(pieces)}  # model_type UNIGRAM, vocab_size
    assert dict(_protobuf_fields(dict(fields)[3]))[1] == b"identity"


def test_a_given_peer_gguf_is_named_by_its_file_type(tmp_path):
    """--gguf int4=FILE labels the peer's weights by the file's general.file_type (a Q4_K_M is not
    the harness's Q4_0); a file without one, or not a GGUF, keeps the harness's name for the dtype."""
    import gguf

    from gally.bench import peer_gguf

    def write(name, file_type=None):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        if file_type is not None:
            w.add_file_type(file_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)

    assert peer_gguf.type_of(write("k.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M), "int4") == "Q4_K_M"
    assert peer_gguf.type_of(write("f.gguf", gguf.LlamaFileType.ALL_F32), "f32") == "F32"
    assert peer_gguf.type_of(write("none.gguf"), "int4") == "Q4_0"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    assert peer_gguf.type_of(str(tmp_path / "junk.gguf"), "int8") == "Q8_0"


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bandwidth_is_a_plausible_rate(threads):
    gbs = _core.read_bandwidth(64 << 20, threads, 2)
    assert math.isfinite(gbs) and 0.5 < gbs < 10_000


def test_read_bandwidth_rejects_bad_thread_counts():
    with pytest.raises(ValueError):
        _core.read_bandwidth(1 << 20, 0, 1)


def test_engine_decodes_in_the_session_prepare_decode_made(folder):
    """The bench times decode(None, …) in the context prepare_decode put in, with read passes in
    between; the session serves one decode, and a decode with no prepared session says so."""
    from gally.bench.engine_gally import GallyEngine

    engine = GallyEngine(folder, "f32", 1, 64)
    engine.load()
    with pytest.raises(ValueError, match="prepare_decode"):
        engine.decode(None, [1, 2])
    engine.prepare_decode([3, 4, 5])
    assert engine._prepared.position == 3
    assert engine.decode(None, [1, 2])["seconds"] > 0
    with pytest.raises(ValueError, match="prepare_decode"):
        engine.decode(None, [1, 2])
