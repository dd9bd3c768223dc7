"""llama-bench itself as a cross-check of the llama-cpp-python peer: same GGUF, threads, lengths,
depths, repetitions and KV cache type, run after the interleaved block (it cannot be interleaved)."""

from __future__ import annotations

import json
import subprocess

from .peer_gguf import cache_flags
from .stats import Stat
from .worker import launch_environment


def run_llama_bench(tool: str, gguf: str, prompts, gens, depths, threads: int, reps: int,
                    kv_type: str | None = None) -> tuple:
    """({(kind, tokens, depth): tokens/s Stat over llama-bench's repetitions}, llama-bench's build, model type and
    KV cache types). kv_type: llama.cpp's cache type (None: its default)."""
    cmd = [tool, "-m", gguf, "-t", str(threads), "-r", str(reps), "-o", "json",
           "-p", ",".join(map(str, prompts or [0])), "-n", ",".join(map(str, gens or [0])),
           "-d", ",".join(map(str, depths)), *cache_flags(kv_type)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_environment())
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {p.returncode}): {p.stderr.strip()[-800:]}")
    return parse(p.stdout)


def parse(text: str) -> tuple:
    out, about = {}, ""
    for test in json.loads(text):
        about = f"build {test.get('build_commit', '?')}, {test.get('model_type', '?')}"
        if "type_k" in test:
            about += f", -ctk {test['type_k']} -ctv {test.get('type_v', '?')}"
        if test["n_prompt"] and test["n_gen"]:
            continue  # a combined pp+tg test; the harness asks for none
        kind, n = ("pp", test["n_prompt"]) if test["n_prompt"] else ("tg", test["n_gen"])
        samples = test.get("samples_ts")
        stat = Stat.of(samples) if samples else Stat(float(test["avg_ts"]), float(test["stddev_ts"]), ())
        out[(kind, int(n), int(test.get("n_depth", 0)))] = stat
    return out, about
