"""`gally bench --batch 1,2,4,8,16`: many sequences decoded together, the way llama.cpp's
llama-batched-bench measures them, and llama-batched-bench itself on the same weights and threads in
the same run (--peers llama.cpp).

For each batch size B: B sequences, each a prompt of -p random tokens, prefilled in passes of up to
512 tokens across sequences; then -n decode steps, each feeding every sequence one (fixed, random)
token in one forward pass. Reported per B, as mean ± std over -r repetitions (after one warm-up):
prefill tok/s = B·p / prefill seconds (llama-batched-bench's S_PP), aggregate decode tok/s =
B·n / decode seconds (S_TG), and per-sequence decode tok/s = n / decode seconds. gally and
llama-batched-bench alternate repetition by repetition, so that background load hits both alike.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..model import QUANTIZED
from . import derived, machine, peer_gguf
from .stats import Stat
from .worker import Worker, WorkerError, launch_environment


@dataclass
class BatchRow:
    engine: str       # "gally" or "llama-batched-bench"
    dtype: str
    weights: str
    threads: int
    batch: int
    pp_tok_s: Optional[Stat]
    tg_tok_s: Optional[Stat]      # aggregate over the batch
    tg_per_seq: Optional[Stat] = None
    kv_dtype: str = "?"           # KV cache type, in the engine's own names (gally int8 ~ llama.cpp q8_0)


@dataclass
class BatchResults:
    command: str
    date: str
    machine: dict
    prompt: int
    gen: int
    batches: list
    reps: int
    rows: list = field(default_factory=list)
    peers: dict = field(default_factory=dict)  # dtype → llama-batched-bench status
    load: dict = field(default_factory=dict)   # "dtype tN" → load average before and after the block


def llama_batched_bench(tool: str, gguf: str, prompt: int, gen: int, batches: list, threads: int,
                        kv_type: str | None = None) -> dict:
    """{B: (speed_pp, speed_tg)} from one run of llama-batched-bench (its JSON lines); kv_type: llama.cpp's
    cache type (None: its default)."""
    context = max(batches) * (prompt + gen) + 64
    cmd = [tool, "-m", gguf, "-c", str(context), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen),
           "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl",
           *peer_gguf.cache_flags(kv_type)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_environment())
    if p.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed (exit {p.returncode}): {p.stderr.strip()[-800:]}")
    out = {}
    for line in (p.stdout + "\n" + p.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            r = json.loads(line)
            out[int(r["pl"])] = (float(r["speed_pp"]), float(r["speed_tg"]))
    if set(out) != set(batches):
        raise RuntimeError(f"llama-batched-bench reported batch sizes {sorted(out)}, not {batches}")
    return out


def run_batched(opts, batches: list, command: str = "", log: Callable[[str], None] = lambda s: None) -> BatchResults:
    import gally
    from gally import config, sources

    opts.validate()
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches) or not batches:
        raise ValueError(f"--batch must list positive integers, got {batches!r}")
    prompt, gen = max(opts.prompts), max(opts.gens)
    if gen < 1:
        raise ValueError("--batch needs a generation length: -n N with N >= 1")
    threads = opts.threads or [gally.physical_cores()]
    res = BatchResults(command, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       machine.describe(), prompt, gen, list(batches), opts.reps)
    for dtype in opts.dtypes:
        if opts.shape:
            folder = derived.random_folder(opts.shape, "f32" if dtype == "f32" else "bf16", log=log)
        else:
            folder = sources.resolve(opts.model, dtype if dtype in ("f32", "bf16", "f16") else None)
        vocab = config.read(folder).vocab_size
        rng = np.random.default_rng(opts.seed)
        inputs = {b: (rng.integers(0, vocab, (b, prompt)).tolist(), rng.integers(0, vocab, (b, gen)).tolist())
                  for b in batches}
        model = derived.quantized_folder(folder, dtype, log=log, calibrate=not opts.shape) if dtype in QUANTIZED else (
            folder if opts.shape else opts.model)
        tool, gguf = None, None
        if "llama.cpp" in opts.peers:
            tool = peer_gguf.find_tool("llama-batched-bench", opts.llama_cpp_bin, opts.llama_cpp)
            try:
                if not tool:
                    raise derived.PeerUnavailable("no llama-batched-bench binary (pass --llama-cpp-bin DIR)")
                gguf = opts.ggufs.get(dtype) or peer_gguf.peer_gguf(folder, dtype, opts.llama_cpp, opts.llama_cpp_bin,
                                                                   log=log)
                res.peers[dtype] = "measured"
            except derived.PeerUnavailable as e:
                res.peers[dtype] = str(e)
                tool = None
        for t in threads:
            before = _load_average()
            _block(opts, res, dtype, t, model, inputs, tool, gguf, log)
            res.load[f"{dtype} t{t}"] = (before, _load_average())
    return res


def _block(opts, res, dtype, threads, model, inputs, tool, gguf, log) -> None:
    tag = f"[{dtype} t{threads} batch]"
    batches, prompt, gen = res.batches, res.prompt, res.gen
    log(f"{tag} loading gally")
    try:
        worker = Worker("gally", {"model": model, "dtype": dtype, "kv_dtype": opts.kv_dtype, "threads": threads,
                                  "max_context": prompt + gen})
        worker.call("load", times=1)
        info = worker.call("info")
    except WorkerError as e:
        log(f"{tag} gally failed: {e}")
        return
    kv_type = peer_gguf.LLAMA_KV_TYPES[opts.kv_dtype] if opts.kv_dtype else None
    gally_s = {b: [] for b in batches}
    peer = {b: [] for b in batches}
    try:
        for rep in range(opts.reps + 1):  # the first is a warm-up
            keep = rep > 0
            log(f"{tag} {'warm-up' if not keep else f'repetition {rep}/{opts.reps}'}")
            order = ["gally", "llama"] if rep % 2 == 0 else ["llama", "gally"]
            for engine in order:
                if engine == "gally":
                    for b in batches:
                        r = worker.call("batched", prompt_ids=inputs[b][0], gen_ids=inputs[b][1])
                        if keep:
                            gally_s[b].append((r["pp_seconds"], r["tg_seconds"]))
                elif tool:
                    try:
                        got = llama_batched_bench(tool, gguf, prompt, gen, batches, threads, kv_type)
                    except RuntimeError as e:
                        res.peers[dtype] = f"failed: {e}"
                        tool = None
                        continue
                    if keep:
                        for b in batches:
                            peer[b].append(got[b])
    except WorkerError as e:
        log(f"{tag} gally failed: {e}")
    finally:
        worker.close()
    for b in batches:
        if len(gally_s[b]) == opts.reps:
            pp = Stat.of([b * prompt / s for s, _ in gally_s[b]])
            tg = Stat.of([b * gen / s for _, s in gally_s[b]])
            res.rows.append(BatchRow("gally", dtype, info["weights"], threads, b, pp, tg, tg.scaled(1 / b),
                                     info["kv_dtype"]))
        if len(peer[b]) == opts.reps:
            pp, tg = Stat.of([x for x, _ in peer[b]]), Stat.of([y for _, y in peer[b]])
            res.rows.append(BatchRow("llama-batched-bench", dtype, peer_gguf.type_of(gguf, dtype), threads, b, pp, tg,
                                     tg.scaled(1 / b), kv_type or peer_gguf.LLAMA_KV_DEFAULT))


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def markdown(res: BatchResults, title: str = "gally bench --batch") -> str:
    m, cpu, info = res.machine, res.machine["cpu"], res.machine["gally"]
    lines = [f"# {title}", "", f"`{res.command}`", "",
             f"{res.date} · {cpu['model']} ({cpu.get('family_model', '?')}), {info['threads']} physical cores, "
             f"{' '.join(cpu['flags'])} · gally {info['version']} at {m.get('commit', '?')}, kernels {info['isa']}",
             "",
             f"Each sequence: a prompt of {res.prompt} tokens, then {res.gen} decode steps; mean ± std over "
             f"{res.reps} repetitions after one warm-up, gally and llama-batched-bench alternating.", ""]
    for key, status in res.peers.items():
        lines.append(f"- llama-batched-bench at {key}: {status}")
    if res.peers:
        lines.append("")
    blocks = list(dict.fromkeys((r.dtype, r.threads) for r in res.rows))  # in the order measured
    for dtype, threads in blocks:
        rows = [r for r in res.rows if (r.dtype, r.threads) == (dtype, threads)]
        gally = {r.batch: r for r in rows if r.engine == "gally"}
        peer = {r.batch: r for r in rows if r.engine != "gally"}
        one = gally.get(1)
        first = next(iter(gally.values()), None)
        weights, kv = (first.weights, first.kv_dtype) if first else (dtype, "?")
        other = next(iter(peer.values()), None)
        peer_w, peer_kv = (" vs " + other.weights, " vs " + other.kv_dtype) if other else ("", "")
        lines += [f"## {dtype} ({weights}{peer_w}; KV cache {kv}{peer_kv}), {threads} threads "
                  f"(load {res.load.get(f'{dtype} t{threads}')})", "",
                  "| B | gally prefill tok/s | gally decode tok/s (all) | per sequence | × gally B=1 "
                  "| llama.cpp S_PP | llama.cpp S_TG | decode × llama.cpp |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in res.batches:
            g, p = gally.get(b), peer.get(b)
            cells = [str(b)]
            cells += [g.pp_tok_s.format(1), g.tg_tok_s.format(1), g.tg_per_seq.format(1),
                      f"{g.tg_tok_s.mean / one.tg_tok_s.mean:.2f}×" if one else "—"] if g else ["—"] * 4
            cells += [p.pp_tok_s.format(1), p.tg_tok_s.format(1)] if p else ["—", "—"]
            cells.append(f"{g.tg_tok_s.mean / p.tg_tok_s.mean:.2f}×" if g and p else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def dumps(res: BatchResults) -> str:
    def stat(s):
        return None if s is None else s.to_json()

    return json.dumps({"command": res.command, "date": res.date, "machine": res.machine, "prompt": res.prompt,
                       "gen": res.gen, "batches": res.batches, "reps": res.reps, "peers": res.peers, "load": res.load,
                       "rows": [{"engine": r.engine, "dtype": r.dtype, "weights": r.weights, "threads": r.threads,
                                 "batch": r.batch, "pp_tok_s": stat(r.pp_tok_s), "tg_tok_s": stat(r.tg_tok_s),
                                 "tg_per_seq": stat(r.tg_per_seq), "kv_dtype": r.kv_dtype} for r in res.rows]},
                      indent=1)
