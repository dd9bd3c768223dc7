"""Where the kernel tests run their kernels: the extension on this CPU ("native"), and the aarch64
NEON kernels cross-compiled (Debian's g++-aarch64-linux-gnu) into tests/kernel_runner.cpp and run
under qemu-aarch64 -cpu max, which has every extension the NEON sets use. Both offer the
extension's kernel_* functions, so each kernel test checks every set of both against the same
NumPy references and scalar twins. The emulated run checks correctness only, never speed.

A machine without the cross compiler or qemu skips the aarch64 half, unless
GALLY_REQUIRE_AARCH64=1 (set by .ci/run, which installs them) makes that a failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import pytest

from gally import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_SETS = list(_core.available_isas())
# The sets of qemu-aarch64 -cpu max (asimd, asimddp, bf16 and i8mm all reported)
AARCH64_SETS = ["generic", "neon", "neondot", "neonbf16", "neoni8mm"]
# CPUs qemu-aarch64 emulates, with the flags their hardware capabilities report
QEMU_CPUS = {
    "cortex-a53": {"asimd": True, "asimddp": False, "bf16": False, "i8mm": False},
    "cortex-a76": {"asimd": True, "asimddp": True, "bf16": False, "i8mm": False},
    "max": {"asimd": True, "asimddp": True, "bf16": True, "i8mm": True},
}
KV_TYPES = {"f32": 0, "bf16": 1, "f16": 2, "int8": 3}
WTYPES = {"f32": 0, "bf16": 1, "f16": 2, "int8": 3, "int4-v1": 4, "int4": 5}
# the sets that round a batch's activations to bf16 (kernels.h)
BF16_PREFILL_SETS = ("avx512bf16", "neonbf16", "neoni8mm")


def pairs(simd_only: bool = False) -> list:
    """(backend, kernel set) for every set of both backends; simd_only leaves out "generic" (the scalar twins)."""
    out = [("native", s) for s in NATIVE_SETS] + [("aarch64", s) for s in AARCH64_SETS]
    return [p for p in out if not (simd_only and p[1] == "generic")]


def each_set(simd_only: bool = False):
    """Parametrizes a test over ("backend", "isa"); the `core` fixture gives the backend's kernel_* functions."""
    return pytest.mark.parametrize("backend, isa", pairs(simd_only), ids=[f"{b}-{s}" for b, s in pairs(simd_only)])


def missing_tools() -> list:
    return [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64", "cmake") if shutil.which(t) is None]


def build_runner(build_dir: str) -> str:
    """tests/kernel_runner cross-compiled for aarch64 by CMakeLists.txt (its per-file flags); its path."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", ROOT, "-B", build_dir, *gen, "-DGALLY_KERNEL_RUNNER=ON", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_TOOLCHAIN_FILE={os.path.join(ROOT, 'tests', 'aarch64-linux-gnu.cmake')}"]
    for cmd in (configure, ["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 1)]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return os.path.join(build_dir, "kernel_runner")


class Runner:
    """kernel_runner under qemu-aarch64 -cpu CPU, one case at a time over its pipes (tests/kernel_runner.cpp)."""

    def __init__(self, path: str, cpu: str = "max"):
        self.proc = subprocess.Popen(["qemu-aarch64", "-cpu", cpu, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise RuntimeError(f"kernel_runner stopped: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
        return data

    def call(self, op: str, isa: str = "", ints=(), floats=(), arrays=()) -> list:
        out = [struct.pack("<I", len(op)), op.encode(), struct.pack("<I", len(isa)), isa.encode(),
               struct.pack(f"<I{len(ints)}q", len(ints), *[int(v) for v in ints]),
               struct.pack(f"<I{len(floats)}d", len(floats), *[float(v) for v in floats]),
               struct.pack("<I", len(arrays))]
        for a in arrays:
            raw = b"" if a is None else np.ascontiguousarray(a).tobytes()
            out += [struct.pack("<Q", len(raw)), raw]
        self.proc.stdin.write(b"".join(out))
        self.proc.stdin.flush()
        (n,) = struct.unpack("<I", self._read(4))
        error = self._read(n).decode()
        (count,) = struct.unpack("<I", self._read(4))
        results = [self._read(struct.unpack("<Q", self._read(8))[0]) for _ in range(count)]
        if error:
            raise ValueError(error)
        return results


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class Aarch64Core:
    """The extension's kernel_* functions (bindings_testing.cpp), run by kernel_runner under qemu."""

    def __init__(self, runner: Runner):
        self.r = runner

    def available_isas(self) -> list:
        return self.info()[1]

    def info(self) -> tuple:
        flags, sets, selected = (b.decode() for b in self.r.call("info"))
        return ({k: v == "1" for k, v in (f.split("=") for f in flags.split(","))}, sets.split(","), selected)

    def selected_isa(self) -> str:
        return self.info()[2]

    def select_isa(self, name: str) -> None:
        try:
            self.r.call("select", name)
        except ValueError as e:
            raise ValueError(f"instruction set {name!r} is not available on this CPU ({e})") from None

    def kernel_matmul(self, isa, x, W, wtype, bias, y, accumulate, r0, r1, scales=None, mins=None, codes=None):
        x = f32(x)
        ints = [x.shape[0], x.shape[1], y.shape[1], WTYPES[wtype], r0, r1, accumulate, bias is not None]
        arrays = [x, W, scales, mins, None if bias is None else f32(bias), f32(y), codes]
        (out,) = self.r.call("matmul", isa, ints, (), arrays)
        y[...] = np.frombuffer(out, np.float32).reshape(y.shape)
        return y

    def kernel_matmul_many(self, isa, x, jobs):
        x = f32(x)
        ints, arrays = [x.shape[0], x.shape[1], len(jobs)], [x]
        for W, wtype, y, r0, r1, acc in jobs:
            ints += [W.shape[0], WTYPES[wtype], r0, r1, acc]
            arrays += [W, f32(y)]
        for job, out in zip(jobs, self.r.call("matmul_many", isa, ints, (), arrays)):
            job[2][...] = np.frombuffer(out, np.float32).reshape(job[2].shape)

    def kernel_quantize_rows(self, isa, x):
        x = f32(x)
        q, s, total = self.r.call("quantize_rows", isa, x.shape, (), [x])
        g = (x.shape[0], x.shape[1] // 32)
        return (np.frombuffer(q, np.int16).reshape(x.shape), np.frombuffer(s, np.float32).reshape(g),
                np.frombuffer(total, np.float32).reshape(g))

    def kernel_has_gemm_q(self, isa):
        return self.r.call("has_gemm_q", isa)[0] == b"1"

    def kernel_matmul_quantized(self, isa, xq, xs, xsum, Wq, Ws, Wm, y, r0, r1, codes=None, gemm=False, bias=None,
                                accumulate=False):
        kind = 2 if codes is not None else 1 if Wm is not None else 0  # int4, int4-v1, int8
        ints = [xq.shape[0], xq.shape[1], Wq.shape[0], kind, r0, r1, gemm, accumulate]
        arrays = [np.ascontiguousarray(xq, np.int16), f32(xs), f32(xsum), Wq, Ws, Wm, f32(y), codes,
                  None if bias is None else f32(bias)]
        (out,) = self.r.call("matmul_quantized", isa, ints, (), arrays)
        y[...] = np.frombuffer(out, np.float32).reshape(y.shape)
        return y

    def kernel_rmsnorm(self, isa, x, w, eps):
        return np.frombuffer(self.r.call("rmsnorm", isa, [x.size], [eps], [f32(x), f32(w)])[0], np.float32)

    def kernel_rope(self, isa, v, cos, sin):
        return np.frombuffer(self.r.call("rope", isa, [v.size], (), [f32(v), f32(cos), f32(sin)])[0], np.float32)

    def kernel_attention(self, isa, q, K, V, scale, block_rows=16, kv_dtype="f32", parts=1):
        g, heads, d = (1, 1, q.size) if q.ndim == 1 else (1, *q.shape) if q.ndim == 2 else q.shape
        n = K.shape[-2]
        ints = [heads, n, d, block_rows, KV_TYPES[kv_dtype], parts, g]
        out, probs = self.r.call("attention", isa, ints, [scale], [f32(q), f32(K), f32(V)])
        return (np.frombuffer(out, np.float32).reshape(q.shape),
                np.frombuffer(probs, np.float32).reshape(q.shape[:-1] + (n,)))

    def kernel_attention_causal(self, isa, Q, K, V, ctx0, scale, bf16=False, block_rows=16, kv_dtype="f32"):
        if bf16:
            raise ValueError(f"{isa} has no bf16 attention")
        nq, d = Q.shape
        ints = [nq, ctx0, d, block_rows, KV_TYPES[kv_dtype]]
        out, probs = self.r.call("attention_causal", isa, ints, [scale], [f32(Q), f32(K), f32(V)])
        return np.frombuffer(out, np.float32).reshape(nq, d), np.frombuffer(probs, np.float32).reshape(nq, -1)

    def kernel_convert_row(self, isa, x, to):
        x = f32(x)
        (out,) = self.r.call("convert_row", isa, [x.size, KV_TYPES[to]], (), [x])
        return np.frombuffer(out, np.float32 if to == "f32" else np.uint8 if to == "int8" else np.uint16)

    def kernel_silu_mul(self, isa, g, u):
        return np.frombuffer(self.r.call("silu_mul", isa, [g.size], (), [f32(g), f32(u)])[0], np.float32)


@pytest.fixture(scope="session")
def aarch64_runner(request):
    """The cross-compiled kernel_runner's path, built once per test session (in pytest's cache, so
    that a later session rebuilds only what changed)."""
    missing = missing_tools()
    if missing:
        why = (f"the aarch64 kernel tests need {', '.join(missing)} "
               "(Debian: g++-aarch64-linux-gnu qemu-user; pip: cmake)")
        if os.environ.get("GALLY_REQUIRE_AARCH64") == "1":
            pytest.fail(why)
        pytest.skip(why)
    key = hashlib.sha1(ROOT.encode()).hexdigest()[:12]
    name = f"gally-aarch64-runner-{key}"
    cache = getattr(request.config, "cache", None)  # none under -p no:cacheprovider (.ci/sanitize)
    return build_runner(str(cache.mkdir(name)) if cache is not None else os.path.join(tempfile.gettempdir(), name))


@pytest.fixture(scope="session")
def aarch64_core(aarch64_runner):
    runner = Runner(aarch64_runner, "max")
    core = Aarch64Core(runner)
    yield core
    runner.close()


class NativeCore:
    """The extension's kernel_* functions (gally._core.testing) and its kernel-set choice (gally._core)."""

    def __getattr__(self, name):
        return getattr(_core.testing if hasattr(_core.testing, name) else _core, name)


@pytest.fixture
def core(request, backend):
    """The kernel_* functions of the test's backend."""
    return NativeCore() if backend == "native" else request.getfixturevalue("aarch64_core")


def bf16_prefill(isa: str, wtype: str, n_tok: int) -> bool:
    """True where a set rounds a batch's activations (and weights) to bf16: 4 tokens or more with bf16, int8 or int4
    weights on avx512bf16, neonbf16 and neoni8mm (neonbf16's matmul)."""
    return isa in BF16_PREFILL_SETS and wtype in ("bf16", "int8", "int4", "int4-v1") and n_tok >= 4

