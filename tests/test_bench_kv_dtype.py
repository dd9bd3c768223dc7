"""gally bench --kv-dtype: one KV cache type for gally and the llama.cpp peers of the same run (int8 ↔
llama.cpp's q8_0), named in the results; without it each engine keeps its default. llama-bench and
llama-batched-bench are stand-in scripts that log their command line, llama-cpp-python a stand-in module."""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest

import gally
from conftest import make_checkpoint
from gally import cli
from gally.bench import peer_gguf
from gally.bench.cli import command_of, options
from gally.bench.engine_llamacpp import LlamaCppEngine
from gally.bench.run import Options
from gally.model import KV_DTYPES

bench_run = importlib.import_module("gally.bench.run")  # the module: gally.bench.run is also its run()

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)
# ggml.h's enum ggml_type: what Llama(type_k=, type_v=) takes
GGML = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench_model"), **SMALL)[0]


@pytest.fixture
def tools(tmp_path):
    """A --llama-cpp-bin folder with llama-bench and llama-batched-bench stand-ins, each appending its
    arguments to argv.jsonl and printing the JSON the real tool prints (its cache type: -ctk's, else f16),
    and a GGUF to pass with --gguf (never read)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.jsonl"
    common = f"""#!{sys.executable}
import json, sys
argv = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps([sys.argv[0].rsplit("/", 1)[-1]] + argv) + "\\n")
def arg(flag, default):
    return argv[argv.index(flag) + 1] if flag in argv else default
"""
    bench = common + """
tests = [{"n_prompt": int(p), "n_gen": 0} for p in arg("-p", "0").split(",") if int(p)]
tests += [{"n_prompt": 0, "n_gen": int(n)} for n in arg("-n", "0").split(",") if int(n)]
print(json.dumps([{"build_commit": "fake", "model_type": "llama ?B BF16", "type_k": arg("-ctk", "f16"),
                   "type_v": arg("-ctv", "f16"), "n_depth": int(d), "avg_ts": 100.0, "stddev_ts": 1.0, **t}
                  for d in arg("-d", "0").split(",") for t in tests]))
"""
    batched = common + """
for b in arg("-npl", "1").split(","):
    print(json.dumps({"pl": int(b), "speed_pp": 100.0, "speed_tg": 10.0 * int(b)}))
"""
    for name, text in (("llama-bench", bench), ("llama-batched-bench", batched)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    gguf = tmp_path / "peer.gguf"
    gguf.write_bytes(b"GGUF")
    return types.SimpleNamespace(bin=str(bin_dir), gguf=str(gguf), log=log)


def _argv(tools, name):
    lines = tools.log.read_text().splitlines() if tools.log.exists() else []
    return [a[1:] for a in map(json.loads, lines) if a[0] == name]


def test_every_gally_kv_dtype_has_a_llama_cpp_cache_type():
    assert set(peer_gguf.LLAMA_KV_TYPES) == set(KV_DTYPES)
    assert peer_gguf.LLAMA_KV_TYPES["int8"] == "q8_0"
    assert peer_gguf.cache_flags("q8_0") == ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]
    assert peer_gguf.cache_flags(None) == []


def test_option_round_trips_through_the_command_line():
    opts = options(cli.build_parser().parse_args(["bench", "--dtype", "bf16", "--kv-dtype", "int8"]))
    assert opts.kv_dtype == "int8"
    opts.validate()
    assert "--kv-dtype int8" in command_of(opts)
    assert options(cli.build_parser().parse_args(command_of(opts).split()[1:])) == opts
    default = options(cli.build_parser().parse_args(["bench"]))
    assert default.kv_dtype is None and "--kv-dtype" not in command_of(default)


def test_bad_values_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--kv-dtype", "q8_0"])
    assert e.value.code == 2
    assert "--kv-dtype: invalid choice: 'q8_0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--kv-dtype 'int4' is not one of f32, bf16, f16, int8"):
        Options(kv_dtype="int4").validate()


def test_serve_mode_refuses_it(capsys):
    # the servers are already running with their own cache: nothing to pass it to
    assert cli.main(["bench", "--serve", "http://127.0.0.1:9/v1", "--kv-dtype", "int8", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gally: error: --kv-dtype sets the KV cache of the engines the bench loads")
    assert "gally serve --kv-dtype, llama-server -ctk/-ctv" in err


@pytest.mark.parametrize("kv, gally_kv, llama_kv", [(None, "f16", "f16"), ("int8", "int8", "q8_0"),
                                                    ("f32", "f32", "f32")])
def test_gally_and_llama_bench_run_with_the_same_cache(folder, tools, tmp_path, capsys, kv, gally_kv, llama_kv):
    out = tmp_path / "r.md"
    code = cli.main(["bench", "-m", folder, "--dtype", "bf16", "-p", "4", "-n", "2", "-r", "1", "-t", "1",
                     "--peers", "llama-bench", "--llama-cpp-bin", tools.bin, "--gguf", f"bf16={tools.gguf}",
                     "--bandwidth-mib", "8", "--no-generate", "-q", "--json", "--out", str(out)]
                    + (["--kv-dtype", kv] if kv else []))
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    (argv,) = _argv(tools, "llama-bench")
    if kv:
        assert argv[-6:] == ["-ctk", llama_kv, "-ctv", llama_kv, "-fa", "on"]
    else:  # today's command line: llama-bench's own defaults
        assert "-ctk" not in argv and "-ctv" not in argv and "-fa" not in argv
    assert data["peers"]["llama-bench"]["bf16"].endswith(f", -ctk {llama_kv} -ctv {llama_kv})")
    assert {(r["engine"], r["test"]["label"]) for r in data["rows"]} == {
        (e, t) for e in ("gally", "llama-bench") for t in ("pp4", "tg2")}
    (setup,) = data["setups"]
    # the KV bytes of the start-up table follow the type: 2 layers × (k, v) × 2 KV heads × a row of 16
    # elements, at the run's context (256); an int8 row is 16 codes and one bf16 scale
    per_token = gally.load(folder, dtype="bf16", threads=1, kv_dtype=gally_kv).kv_bytes_per_token
    assert per_token == 2 * 2 * 2 * {"f32": 64, "f16": 32, "int8": 18}[gally_kv]
    assert setup["info"]["kv_dtype"] == gally_kv and setup["info"]["kv_bytes"] == 256 * per_token
    chosen = f"--kv-dtype {kv}" if kv else "each engine's default"
    assert f"| KV cache | gally at bf16: {gally_kv} ({chosen}) |" in out.read_text()


@pytest.mark.parametrize("kv, gally_kv, llama_kv", [(None, "f16", "f16"), ("int8", "int8", "q8_0")])
def test_batch_mode_passes_it_to_llama_batched_bench(folder, tools, tmp_path, capsys, kv, gally_kv, llama_kv):
    out = tmp_path / "batch.json"
    code = cli.main(["bench", "-m", folder, "--dtype", "bf16", "-p", "4", "-n", "2", "-r", "1", "-t", "1",
                     "--batch", "1,2", "--peers", "llama.cpp", "--llama-cpp-bin", tools.bin,
                     "--gguf", f"bf16={tools.gguf}", "-q", "--out", str(out)] + (["--kv-dtype", kv] if kv else []))
    assert code == 0
    md = capsys.readouterr().out
    runs = _argv(tools, "llama-batched-bench")
    assert len(runs) == 2  # the warm-up and one repetition
    for argv in runs:
        if kv:
            assert argv[-6:] == ["-ctk", llama_kv, "-ctv", llama_kv, "-fa", "on"]
        else:
            assert "-ctk" not in argv and "-fa" not in argv
    assert f"## bf16 (bf16 vs BF16; KV cache {gally_kv} vs {llama_kv}), 1 threads" in md
    rows = json.loads(out.read_text())["rows"]
    assert {(r["engine"], r["batch"], r["kv_dtype"]) for r in rows} == {
        ("gally", b, gally_kv) for b in (1, 2)} | {("llama-batched-bench", b, llama_kv) for b in (1, 2)}


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    """llama_cpp as the engine uses it: Llama records its arguments; the context's cache type is
    type_k's, else llama.cpp's default (f16)."""
    made = []

    class Llama:
        def __init__(self, **kwargs):
            made.append(kwargs)
            self.context_params = types.SimpleNamespace(type_k=kwargs.get("type_k", GGML["f16"]),
                                                        type_v=kwargs.get("type_v", GGML["f16"]))

        def n_vocab(self):
            return 300

    module = types.SimpleNamespace(Llama=Llama, __version__="fake", llama_print_system_info=lambda: b"AVX2 = 1",
                                   llama_cpp=types.SimpleNamespace(_lib=types.SimpleNamespace(_name="libllama.so")))
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return made


@pytest.mark.parametrize("kv", [None, *KV_DTYPES])
def test_llama_cpp_python_peer_gets_the_matching_type(folder, tools, fake_llama_cpp, monkeypatch, kv):
    monkeypatch.setattr(bench_run, "installed", lambda peer: "")
    opts = Options(model=folder, dtypes=["bf16"], peers=["llama.cpp"], ggufs={"bf16": tools.gguf}, kv_dtype=kv)
    specs = bench_run._peer_specs(opts, "bf16", folder, {"llama.cpp": {}}, log=lambda s: None)
    assert specs["gally"]["kv_dtype"] == kv
    engine = LlamaCppEngine(**specs["llama.cpp"], threads=1, max_context=64)
    engine.load()
    (kwargs,) = fake_llama_cpp
    assert kwargs["flash_attn"] is True  # a quantized V cache needs it
    want = {"f32": "f32", "bf16": "bf16", "f16": "f16", "int8": "q8_0", None: "f16"}[kv]
    if kv:
        assert kwargs["type_k"] == kwargs["type_v"] == GGML[want]
    else:
        assert "type_k" not in kwargs and "type_v" not in kwargs
    assert engine.info()["kv_dtype"] == want
