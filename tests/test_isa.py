"""Run-time choice of the kernel set: which sets a CPU with given features may run, with features
masked one by one and in every combination, so that no set is ever picked on a CPU without its flag."""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import sys

import pytest

from gally import _core
from kernel_backends import QEMU_CPUS, Aarch64Core, Runner

# Every flag each kernel set needs (the CPU's and the OS's), by architecture, in the order of preference.
REQUIRES = {
    "x86": {
        "avx2": {"os_ymm", "avx2", "fma", "f16c"},
        "avx2vnni": {"os_ymm", "avx2", "fma", "f16c", "avx_vnni"},
        "avx512": {"os_ymm", "avx2", "fma", "f16c", "os_zmm", "avx512f", "avx512dq", "avx512bw", "avx512vl"},
        "avx512vnni": {"os_ymm", "avx2", "fma", "f16c", "os_zmm", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                       "avx512_vnni"},
        "avx512bf16fma": {"os_ymm", "avx2", "fma", "f16c", "os_zmm", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                          "avx512_vnni", "avx512_bf16"},
        "avx512bf16": {"os_ymm", "avx2", "fma", "f16c", "os_zmm", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                       "avx512_vnni", "avx512_bf16"},
    },
    "aarch64": {"neon": {"asimd"}, "neondot": {"asimd", "asimddp"}, "neonbf16": {"asimd", "asimddp", "bf16"},
                "neoni8mm": {"asimd", "asimddp", "bf16", "i8mm"}},
}
ARCH = "x86" if "avx2" in _core.cpu_flags() else "aarch64" if "asimd" in _core.cpu_flags() else None
needs_arch = pytest.mark.skipif(ARCH is None, reason=f"no SIMD kernel sets on {platform.machine()}")


# Flags that need no set but order them: on Intel, avx512bf16fma (FMAs for a bf16 prompt's GEMM) comes after
# avx512bf16 (vdpbf16ps, a quarter of the FMA's rate on Intel's cores), and so is the one selected.
ORDER_FLAGS = {"x86": {"intel"}, "aarch64": set()}


def expected_sets(flags: dict, arch: str = ARCH) -> list:
    on = {f for f, v in flags.items() if v}
    sets = ["generic"] + [s for s, need in REQUIRES[arch].items() if need <= on]
    if "intel" in on and "avx512bf16" in sets:
        sets.remove("avx512bf16fma")
        sets.append("avx512bf16fma")
    return sets


@needs_arch
def test_flag_names_are_the_architectures():
    assert set(_core.cpu_flags()) == set().union(*REQUIRES[ARCH].values(), ORDER_FLAGS[ARCH])


@needs_arch
def test_every_combination_of_flags():
    names = sorted(set().union(*REQUIRES[ARCH].values(), ORDER_FLAGS[ARCH]))
    for bits in itertools.product((False, True), repeat=len(names)):
        flags = dict(zip(names, bits))
        assert _core.kernel_sets_for(flags) == expected_sets(flags), flags


@needs_arch
def test_this_cpu_and_each_flag_masked():
    flags = _core.cpu_flags()
    assert list(_core.available_isas()) == expected_sets(flags) == _core.kernel_sets_for(flags)
    for name in flags:
        masked = dict(flags, **{name: False})
        sets = _core.kernel_sets_for(masked)
        assert not any(name in REQUIRES[ARCH][s] for s in sets[1:]), (name, sets)
        assert sets == expected_sets(masked)


def test_missing_flags_count_as_absent_and_unknown_ones_are_errors():
    assert _core.kernel_sets_for({}) == ["generic"]
    with pytest.raises(ValueError, match="unknown CPU flag 'sse9'"):
        _core.kernel_sets_for({"sse9": True})


def test_gally_isa_forces_a_set_and_names_the_available_ones():
    code = "from gally import _core; print(_core.selected_isa())"
    for isa in _core.available_isas():
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GALLY_ISA=isa), capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == isa
    best = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in os.environ.items() if k != "GALLY_ISA"},
                          capture_output=True, text=True, check=True)
    assert best.stdout.strip() == _core.available_isas()[-1]
    bad = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GALLY_ISA="sse9"), capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "GALLY_ISA=sse9 is not available" in bad.stderr
    assert "available: " + ", ".join(_core.available_isas()) in bad.stderr


@pytest.mark.parametrize("cpu", sorted(QEMU_CPUS))
def test_aarch64_sets_follow_the_hardware_capabilities(aarch64_runner, cpu):
    """The cross-compiled kernels under qemu-aarch64 emulating CPUs with and without dotprod, bf16 and i8mm:
    getauxval's flags as the emulated CPU reports them, only the sets they allow, the best selected."""
    runner = Runner(aarch64_runner, cpu)
    try:
        core = Aarch64Core(runner)
        flags, sets, selected = core.info()
        assert flags == QEMU_CPUS[cpu]
        assert sets == expected_sets(flags, "aarch64") and selected == sets[-1]
        for name in REQUIRES["aarch64"]:
            if name not in sets:
                with pytest.raises(ValueError, match="not available"):
                    core.select_isa(name)
    finally:
        runner.close()
