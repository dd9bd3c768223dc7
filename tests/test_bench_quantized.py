"""gally bench at int8/int4: gally loads a stored `gally quantize` folder, made once and cached with
the other derived models, and the start-up table shows the memory the issue's target is read from."""

from __future__ import annotations

import os

import pytest

from conftest import make_checkpoint
from gally import quantize
from gally.bench import derived, report
from gally.bench.run import Options, run

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("gally_home")
        mp.setenv("GALLY_HOME", str(path))
        yield str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench_model"), **SMALL)[0]


@pytest.fixture(scope="module")
def result(home, folder):
    opts = Options(model=folder, dtypes=["int8", "int4"], prompts=[8], gens=[4], threads=[1], reps=1,
                   generate=False, bandwidth_bytes=16 << 20)
    return run(opts, command="gally bench (test)")


def test_gally_loads_the_stored_quantized_folder_zero_copy(result, home, folder):
    assert set(result.quantized) == {"int8", "int4"}
    for s in (s for s in result.setups if s.engine == "gally"):
        path = result.quantized[s.dtype]
        assert path == derived.quantized_folder(folder, s.dtype)  # cached: the same folder again
        # int4 names its format's version (a cache from before version 2 holds version 1's int4) and
        # its calibration (a real model: calibrated; --shape's random weights are not)
        assert path.startswith(os.path.join(home, "bench", ""))
        assert path.endswith({"int8": "-gally-int8", "int4": "-gally-int4-v2-ends2-calibrated"}[s.dtype])
        if s.dtype == "int4":
            assert quantize.read_checkpoint(path).metadata[quantize.METADATA_CALIBRATION].startswith("self-sampled")
        assert quantize.read_checkpoint(path).quant_type == s.dtype
        assert s.info["path"] == path and s.info["copied_bytes"] == 0 and s.weights == s.dtype
        assert s.info["file_bytes"] == os.path.getsize(os.path.join(path, "model.safetensors"))
        assert s.error == ""
    assert result.model == {"int8": folder, "int4": folder}  # the peers' source


def test_quantized_folder_is_made_once(result, folder):
    path = os.path.join(derived.quantized_folder(folder, "int4"), "model.safetensors")
    before = os.stat(path).st_mtime_ns
    assert derived.quantized_folder(folder, "int4") == os.path.dirname(path)
    assert os.stat(path).st_mtime_ns == before
    plain = derived.quantized_folder(folder, "int4", calibrate=False)  # as for random weights: another entry
    assert plain.endswith("-gally-int4-v2-ends2")
    assert quantize.read_checkpoint(plain).metadata[quantize.METADATA_CALIBRATION] == "none"


def test_start_up_table_reads_off_rss_beyond_file_and_kv(result):
    md = report.markdown(result)
    assert "| gally int8/int4 | int8: " in md and "`gally quantize` of the folder above" in md
    lines = md.split("## Start-up and memory\n", 1)[1].strip().splitlines()
    assert "the target for int8/int4 is ≤ 60 MB" in lines[0]
    rows = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in lines if line.startswith("| gally |")]
    assert len(rows) == 2
    for cells, s in zip(rows, [s for s in result.setups if s.engine == "gally"]):
        beyond = report.rss_beyond_weights(s)
        assert beyond == s.peak_rss - s.info["file_bytes"] - s.info["kv_bytes"]
        assert cells[-2] == f"{beyond / 2**20:.0f}" and cells[-1] == ""  # then the note


def test_a_quantized_source_is_used_as_it_is(tmp_path):
    src = make_checkpoint(tmp_path / "m", **SMALL)[0]
    q = str(tmp_path / "q4")
    quantize.quantize_folder(src, q, "int4")
    assert derived.quantized_folder(q, "int4", cache_dir=str(tmp_path / "c")) == q
    with pytest.raises(ValueError, match="quantized to int4; it cannot be benchmarked as int8"):
        derived.quantized_folder(q, "int8", cache_dir=str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c")
