"""The whole extension compiles for Linux aarch64: every C++ source, with CMakeLists.txt's flags
for it, through Debian's cross compiler (warnings are errors). The kernels themselves also run
under qemu in the kernel tests (kernel_backends.py); this checks that nothing outside them
(bindings, forward pass, loaders) uses anything x86-only, with OpenMP and without. Syntax and
semantics only: the host's Python headers stand in for the target's, which share their LP64 layout."""

from __future__ import annotations

import glob
import os
import subprocess
import sysconfig

import pytest

from kernel_backends import ROOT, missing_tools

# CMakeLists.txt's per-file flags for the aarch64 kernel sets
FLAGS = {"kernels_neondot.cpp": ["-march=armv8.2-a+dotprod"], "kernels_neonbf16.cpp": ["-march=armv8.2-a+dotprod+bf16"],
         "kernels_neoni8mm.cpp": ["-march=armv8.2-a+dotprod+bf16+i8mm"]}


def test_every_source_compiles_for_aarch64():
    missing = missing_tools()
    if missing:
        why = f"needs {', '.join(missing)}"
        if os.environ.get("GALLY_REQUIRE_AARCH64") == "1":
            pytest.fail(why)
        pytest.skip(why)
    import pybind11

    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        cmake = f.read()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += [os.path.join(ROOT, "csrc", "kernels", n) for n in ("kernels_generic.cpp", "kernels_neon.cpp",
                                                                   "kernels_neondot.cpp", "kernels_neonbf16.cpp",
                                                                   "kernels_neoni8mm.cpp")]
    for name, flags in FLAGS.items():  # the flags above are CMakeLists.txt's
        assert f'csrc/kernels/{name} PROPERTIES\n    COMPILE_OPTIONS "{";".join(flags)}"' in cmake, name
    base = ["aarch64-linux-gnu-g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-fopenmp",
            "-DGALLY_AARCH64=1", "-I", os.path.join(ROOT, "csrc"), "-I", sysconfig.get_paths()["include"],
            "-I", pybind11.get_include()]
    # and the thread pool that stands in for OpenMP (macOS's clang), with the code that uses it
    no_openmp = [os.path.join(ROOT, "csrc", n) for n in ("thread_pool.cpp", "forward.cpp", "parallel_matmul.cpp")]
    jobs = [(src, subprocess.Popen(base + FLAGS.get(os.path.basename(src), []) + [src], stderr=subprocess.PIPE,
                                   text=True)) for src in sources]
    jobs += [(src + " (no OpenMP)", subprocess.Popen([a for a in base if a != "-fopenmp"] + [src],
                                                     stderr=subprocess.PIPE, text=True)) for src in no_openmp]
    for src, p in jobs:
        err = p.communicate()[1]
        assert p.returncode == 0, f"{os.path.relpath(src, ROOT)}:\n{err[-3000:]}"
