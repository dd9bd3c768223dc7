"""One engine per process, driven over a pipe: engines never share a process, its OpenMP thread
pool or its peak RSS, and the parent interleaves their repetitions.

Protocol: one JSON object per line each way. Request {"op": ..., **args}; reply the op's result or
{"error": "..."}. Ops: start (engine name + spec), load (times), info, prefill, decode, generate,
batched, peak_rss, quit. The engine's own output goes to stderr so that stdout carries the protocol alone.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile


def _engine(name: str, spec: dict):
    if name == "gally":
        from .engine_gally import GallyEngine as cls
    elif name == "llama.cpp":
        from .engine_llamacpp import LlamaCppEngine as cls
    elif name == "transformers":
        from .engine_transformers import TransformersEngine as cls
    elif name == "ctranslate2":
        from .engine_ctranslate2 import CTranslate2Engine as cls
    else:
        raise ValueError(f"unknown engine {name!r}")
    return cls(**spec)


def peak_rss_bytes() -> int:
    """The process's peak resident set, file-backed mapped weights included. Linux: VmHWM, since
    ru_maxrss carries over the parent's peak through fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def serve() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    engine = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            if op == "quit":
                break
            if op == "start":
                engine = _engine(req["engine"], req["spec"])
                reply = {}
            elif op == "load":
                reply = {"seconds": [engine.load() for _ in range(req["times"])]}
            elif op == "peak_rss":
                reply = {"bytes": peak_rss_bytes()}
            elif op in ("info", "prefill", "prepare_decode", "decode", "generate", "batched"):
                reply = getattr(engine, op)(**req)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # reported to the parent, which records the engine as failed
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")


def launch_environment() -> dict:
    """The environment this process was started with, before any import changed os.environ
    (Linux: /proc/self/environ; elsewhere os.environ as it is now)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return dict(os.environ)
    env = {}
    for item in items:
        key, sep, value = item.partition(b"=")
        if sep:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return env


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's handle on one engine process."""

    def __init__(self, engine: str, spec: dict):
        import gally

        self.engine = engine
        # A peer runs in the environment the benchmark was started with: settings gally makes for
        # itself at import (GOMP_SPINCOUNT) must not change how llama.cpp or torch behave
        env = dict(os.environ) if engine == "gally" else launch_environment()
        root = os.path.dirname(os.path.dirname(os.path.abspath(gally.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "gally.bench.worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        try:
            self.call("start", engine=engine, spec=spec)
        except WorkerError:
            self.close()
            raise

    def call(self, op: str, **args) -> dict:
        try:
            self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self._proc.wait()
            raise WorkerError(f"{self.engine} process died (exit {self._proc.returncode}): {self._stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.engine}: {reply['error']}")
        return reply

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return " | ".join(self._stderr.read().strip().splitlines()[-8:])

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write('{"op": "quit"}\n')
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


if __name__ == "__main__":
    serve()
