"""The forward pass's threads (csrc/parallel.h): OpenMP's where the build found it, gally's own
thread pool where it did not (Apple's clang without Homebrew's libomp). A build with
-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON must still run its regions on several threads at once,
with OpenMP's work-sharing rules, and give the OpenMP build's logits."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import gally
from conftest import make_checkpoint
from gally import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300)


def check_region(result, threads: int, n: int) -> None:
    members, met, distinct, statics, dynamics = result
    assert members == [(i, threads) for i in range(threads)]
    assert met and distinct == threads  # all inside the region at once, each on an OS thread of its own
    assert statics == sorted(statics) and set(statics) == set(range(threads))  # a contiguous run per thread
    assert all(hits == [1] * n for hits in dynamics)  # each loop ran each item once, counters reused


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_regions_of_this_build(threads):
    check_region(_core.testing.parallel_region(threads, 12), threads, 12)


def test_info_names_the_backend():
    info = gally.info()
    assert info["parallel"] == ("openmp" if info["openmp"] else "threads")


@pytest.fixture(scope="session")
def build_without_openmp(request, tmp_path_factory):
    """gally's package with an extension built by CMakeLists.txt without OpenMP (cached between runs
    in pytest's cache, rebuilt where the sources changed)."""
    import pybind11  # noqa: F401  (the [test] extra installs it, with cmake)

    if shutil.which("cmake") is None:
        pytest.fail("cmake is not installed: pip install '.[test]'")
    key = hashlib.sha1(ROOT.encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # none under -p no:cacheprovider
    name = f"gally-without-openmp-{key}"
    build = str(cache.mkdir(name)) if cache is not None else os.path.join(tempfile.gettempdir(), name)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    pybind11_dir = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True,
                                  check=True).stdout.strip()
    for cmd in (["cmake", "-S", ROOT, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release",
                 "-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON", f"-Dpybind11_DIR={pybind11_dir}",
                 f"-DPython_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", build, "-j", str(os.cpu_count() or 1)]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, f"{' '.join(cmd)}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    modules = [f for f in os.listdir(build) if f.startswith("_core.") and f.endswith((".so", ".pyd"))]
    assert len(modules) == 1, modules
    package = tmp_path_factory.mktemp("without-openmp")
    shutil.copytree(os.path.join(ROOT, "python", "gally"), package / "gally")
    shutil.copy(os.path.join(build, modules[0]), package / "gally")
    return str(package)


# Runs in a process whose gally is the package given first on its path, not this environment's install.
RUN = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "Redirect" not in type(f).__name__]  # an editable install's finder
sys.path.insert(0, sys.argv[1])
import json, numpy as np, gally
from gally import _core
assert gally.__file__.startswith(sys.argv[1]), gally.__file__
ids = np.arange(0, 300, 7, dtype=np.int32)[:40]
logits = {t: gally.load(sys.argv[2], threads=t).logits(ids) for t in (1, 2)}
np.save(sys.argv[3], logits[2])
print(json.dumps({"info": gally.info(), "region": _core.testing.parallel_region(2, 12),
                  "same": bool(np.array_equal(logits[1], logits[2]))}))
"""


def test_build_without_openmp_runs_two_threads_with_the_same_logits(build_without_openmp, tmp_path):
    folder = make_checkpoint(tmp_path / "model", **SMALL)[0]
    out = subprocess.run([sys.executable, "-c", RUN, build_without_openmp, folder, str(tmp_path / "logits.npy")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["info"]["openmp"] is False and got["info"]["parallel"] == "threads"
    check_region([[tuple(m) for m in got["region"][0]], *got["region"][1:]], 2, 12)
    assert got["same"]  # 1 and 2 threads
    ids = np.arange(0, 300, 7, dtype=np.int32)[:40]
    assert np.array_equal(np.load(tmp_path / "logits.npy"), gally.load(folder, threads=2).logits(ids))  # this build's
