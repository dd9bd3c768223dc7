"""gally bench names the llama.cpp build it measured: --llama-cpp-lib chooses the libllama the
llama.cpp peer loads (e.g. a build for AVX2 only), and the result's header names the library and
the CPU features llama_print_system_info() reports for it."""

from __future__ import annotations

import os
import types

import pytest

from gally import cli
from gally.bench import report
from gally.bench.cli import command_of, options
from gally.bench.engine_llamacpp import LlamaCppEngine, build_features, build_info
from gally.bench.run import Options, Results, Setup

AVX2_ONLY = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 0 | "
             "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


@pytest.fixture
def lib_dir(tmp_path):
    (tmp_path / "libllama.so").write_bytes(b"")
    return str(tmp_path)


def test_option_round_trips_through_the_command_line(lib_dir, monkeypatch):
    monkeypatch.delenv("GALLY_LLAMA_CPP_LIB", raising=False)
    opts = options(cli.build_parser().parse_args(["bench", "--peers", "llama.cpp", "--llama-cpp-lib", lib_dir]))
    assert opts.llama_cpp_lib == lib_dir
    opts.validate()
    assert ["--llama-cpp-lib", lib_dir] == command_of(opts).split()[-2:]
    assert options(cli.build_parser().parse_args(command_of(opts).split()[1:])) == opts
    monkeypatch.setenv("GALLY_LLAMA_CPP_LIB", lib_dir)
    assert options(cli.build_parser().parse_args(["bench"])).llama_cpp_lib == lib_dir


def test_a_folder_without_libllama_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--llama-cpp-lib .*no such folder"):
        Options(llama_cpp_lib=str(tmp_path / "missing")).validate()
    with pytest.raises(ValueError, match="--llama-cpp-lib .*holds no libllama.so or libllama.dylib"):
        Options(llama_cpp_lib=str(tmp_path)).validate()


def test_the_peer_loads_the_library_from_that_folder(lib_dir, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)
    LlamaCppEngine(gguf="m.gguf", gguf_type="Q8_0", threads=1, max_context=64)
    assert "LLAMA_CPP_LIB_PATH" not in os.environ  # without the option: llama-cpp-python's own library
    engine = LlamaCppEngine(gguf="m.gguf", gguf_type="Q8_0", threads=1, max_context=64, lib=lib_dir)
    assert os.environ["LLAMA_CPP_LIB_PATH"] == os.path.abspath(lib_dir)
    assert all(callable(getattr(engine, op, None)) for op in ("load", "info", "prefill", "decode"))  # the worker's ops


def test_build_info_names_the_library_and_its_features():
    fake = types.SimpleNamespace(llama_cpp=types.SimpleNamespace(_lib=types.SimpleNamespace(_name="/x/libllama.so")),
                                 llama_print_system_info=lambda: AVX2_ONLY.encode())
    info = build_info(fake)
    assert info == {"library": "/x/libllama.so", "system_info": " ".join(AVX2_ONLY.split())}
    assert build_features(info["system_info"]) == ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE",
                                                   "OPENMP", "REPACK"]


def test_header_says_which_build_was_measured():
    machine = {"commit": "abc", "memory_gib": 1,
               "cpu": {"model": "x", "logical_cpus": 2, "flags": ["avx2"]},
               "gally": {"version": "0", "threads": 2, "isa": "avx2", "isas": ["generic", "avx2"]}}
    llama = Setup("llama.cpp", "int8", 2, weights="Q8_0",
                  info={"weights": "Q8_0", "path": "/m.gguf", "library": "/b/libllama.so", "system_info": AVX2_ONLY})
    res = Results(Options(peers=["llama.cpp"]), "gally bench", "today", machine, {}, {}, {"llama.cpp": {}}, [],
                  [llama])
    lines = [line for line in report.machine_lines(res) if line.startswith("| llama.cpp build |")]
    assert lines == ["| llama.cpp build | /b/libllama.so: SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 LLAMAFILE OPENMP REPACK "
                     "(the library loaded, and the features its llama_print_system_info() reports: what it was "
                     "compiled for) |"]
