"""Results as markdown (a header on the machine and run, then throughput, ratios, start-up) or JSON."""

from __future__ import annotations

import dataclasses
import json

from .engine_llamacpp import build_features
from .run import PROBE_PASSES, Results, Test
from .stats import Stat

PEER_ORDER = ("llama.cpp", "llama-bench", "ctranslate2", "transformers")
# Target for quantized weights, read off the start-up table: peak RSS ≤ weight file + KV cache + this
RSS_OVERHEAD_TARGET = 60 << 20


def _stat(s, digits=2, scale=1.0) -> str:
    return s.scaled(scale).format(digits) if s is not None else "—"


def _table(header: list, rows: list) -> list:
    right = [i for i, h in enumerate(header) if h not in ("engine", "weights", "test", "gally", "note")]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def machine_lines(res: Results) -> list:
    m, cpu, g = res.machine, res.machine["cpu"], res.machine["gally"]
    bw = ", ".join(f"{t} thread{'s' * (t > 1)}: {v:.1f} GB/s" for t, v in sorted(res.bandwidth.items()))
    if res.block_bandwidth:
        bw += "; per block: " + ", ".join(f"{k}: {v:.1f}" for k, v in res.block_bandwidth.items())
    weights = sorted({(s.weights, s.info["weight_bytes"]) for s in res.setups
                      if s.engine == "gally" and "weight_bytes" in s.info})
    peers = []
    for peer, by_dtype in res.peers.items():
        for dtype, status in by_dtype.items():
            peers.append(f"{peer} at {dtype}: {status}")
    versions = sorted({f"{s.engine}: {s.info['version']}" for s in res.setups if s.info.get("version")})
    files = {engine: sorted({f"{s.info['weights']} = {s.info['path']}" for s in res.setups
                             if s.engine == engine and s.info}) for engine in ("llama.cpp", "ctranslate2")}
    ggufs, ct2 = files["llama.cpp"], files["ctranslate2"]
    kv = list(dict.fromkeys(f"{s.engine} at {s.dtype}: {s.info['kv_dtype']}" for s in res.setups
                            if "kv_dtype" in s.info))
    builds = sorted({f"{s.info['library']}: {' '.join(build_features(s.info['system_info'])) or '?'}"
                     for s in res.setups if s.engine == "llama.cpp" and "system_info" in s.info})
    lines = ["| | |", "|---|---|",
             f"| date | {res.date} |",
             f"| gally commit | {m['commit']} (gally {g['version']}) |",
             f"| command | `{res.command}` |",
             f"| CPU | {cpu['model']}{' (' + cpu['family_model'] + ')' if cpu.get('family_model') else ''}, "
             f"{g['threads']} physical cores, {cpu['logical_cpus']} logical CPUs, {m['memory_gib']} GiB |",
             f"| ISA | {' '.join(cpu['flags']) or '?'}; gally kernels: {g['isa']} (of {', '.join(g['isas'])}) |",
             "| system load | 1-min load average before → after each block: "
             + "; ".join(f"{k}: {a} → {b}" for k, (a, b) in res.load.items())
             + f" ({cpu['logical_cpus']} logical CPUs; above 0 means other work shared the CPUs) |",
             f"| read bandwidth | {bw} (gally._core.read_bandwidth: the best of 5 passes over "
             f"{res.options.bandwidth_bytes >> 20} MiB, probed before each block; the first figure is the best of "
             f"the run. \"of read bw\" divides each timed decode's GB/s by the mean of {2 * PROBE_PASSES} passes, "
             f"{PROBE_PASSES} just before it and {PROBE_PASSES} just after; \"of best pass\" by the best of them) |",
             f"| model | {res.options.model or 'default model'}: "
             + "; ".join(f"{d}: {f}" for d, f in res.model.items()) + " |"]
    if res.quantized:
        lines.append("| gally int8/int4 | " + "; ".join(f"{d}: {f}" for d, f in res.quantized.items())
                     + " (`gally quantize` of the folder above, made once; loaded zero-copy) |")
    if weights:
        lines.append("| weights read per token | " + ", ".join(f"{w}: {b / 1e6:.1f} MB" for w, b in weights) + " |")
    if kv:
        chosen = f"--kv-dtype {res.options.kv_dtype}" if res.options.kv_dtype else "each engine's default"
        lines.append(f"| KV cache | {'; '.join(kv)} ({chosen}) |")
    if versions:
        lines.append("| peers | " + "; ".join(versions) + " |")
    if builds:
        lines.append("| llama.cpp build | " + "; ".join(builds) + " (the library loaded, and the features its "
                     "llama_print_system_info() reports: what it was compiled for) |")
    if res.options.llama_cpp_bin and any(r.engine == "llama-bench" for r in res.rows):
        lines.append(f"| llama-bench | {res.options.llama_cpp_bin} |")
    if ggufs:
        lines.append("| peer GGUFs | " + "; ".join(ggufs) + " |")
    if ct2:
        lines.append("| CTranslate2 models | " + "; ".join(ct2) + " |")
    for p in peers:
        lines.append(f"| peer status | {p} |")
    return lines


def throughput_lines(res: Results) -> list:
    rows = []
    for r in res.rows:
        label = r.test.label + (" (Model.generate)" if r.engine == "gally generate" else "")
        if r.tok_s is None:
            rows.append([r.engine, r.weights, r.threads, label, "—", "—", "—", "—", r.note])
            continue
        rows.append([r.engine, r.weights, r.threads, label, _stat(r.tok_s), _stat(r.gb_s),
                     _stat(r.bw_fraction, 0, 100.0) + ("%" if r.bw_fraction else ""),
                     _stat(r.bw_fraction_best, 0, 100.0) + ("%" if r.bw_fraction_best else ""), r.note])
    return _table(["engine", "weights", "threads", "test", "tok/s", "GB/s", "of read bw", "of best pass", "note"],
                  rows)


def ratio_lines(res: Results) -> list:
    peers = [p for p in PEER_ORDER if any(r.engine == p and r.tok_s for r in res.rows)]
    if not peers:
        return []
    by_key = {(r.engine, r.dtype, r.threads, r.test): r for r in res.rows if r.tok_s is not None}
    header = ["gally", "threads", "test", "gally tok/s"]
    for p in peers:
        header += [f"{p} tok/s", f"gally/{p}"]
    rows = []
    for r in res.rows:
        if r.engine != "gally" or r.tok_s is None:
            continue
        row = [r.weights, r.threads, r.test.label, f"{r.tok_s.mean:.1f}"]
        for p in peers:
            other = by_key.get((p, r.dtype, r.threads, r.test))
            row += [f"{other.tok_s.mean:.1f}", f"**{r.tok_s.mean / other.tok_s.mean:.2f}×**"] if other else ["—", "—"]
        rows.append(row)
    return _table(header, rows)


def scaling_lines(res: Results) -> list:
    """gally by thread count, each figure also as a multiple of the fewest threads' figure."""
    rows = [r for r in res.rows if r.engine == "gally" and r.tok_s is not None]
    threads = sorted({r.threads for r in rows})
    if len(threads) < 2:
        return []
    by_key = {(r.dtype, r.test, r.threads): r for r in rows}
    out_rows = []
    for r in rows:
        base = by_key.get((r.dtype, r.test, threads[0]))
        speedup = f"{r.tok_s.mean / base.tok_s.mean:.2f}×" if base else "—"
        bw = f"{r.bw_fraction.mean * 100:.0f}%" if r.bw_fraction else "—"
        out_rows.append([r.weights, r.test.label, r.threads, f"{r.tok_s.mean:.1f}", speedup, bw])
    out_rows.sort(key=lambda c: (c[0], c[1], c[2]))
    return _table(["weights", "test", "threads", "tok/s", f"vs {threads[0]} thread{'s' * (threads[0] > 1)}",
                   "of read bw"], out_rows)


def rss_beyond_weights(s) -> int | None:
    """Peak RSS less the weight file and the KV cache: what the engine costs beyond them. Known
    where both are and every weight is a view into the file (nothing copied at load)."""
    i = s.info
    if not s.peak_rss or "file_bytes" not in i or "kv_bytes" not in i or i.get("copied_bytes", 0):
        return None
    return s.peak_rss - i["file_bytes"] - i["kv_bytes"]


def _mb(b) -> str:
    return f"{b / 2**20:.0f}" if b is not None else "—"


def setup_lines(res: Results) -> list:
    prompts = sorted({p for s in res.setups for p in s.ttft_s})
    header = (["engine", "weights", "threads", "load s"] + [f"TTFT ms (p{p})" for p in prompts]
              + ["file MB", "KV cache MB", "peak RSS MB", "RSS − file − KV MB", "note"])
    rows = []
    for s in res.setups:
        rows.append([s.engine, s.weights, s.threads, _stat(s.load_s, 3)]
                    + [_stat(s.ttft_s.get(p), 1, 1000.0) for p in prompts]
                    + [_mb(s.info.get("file_bytes")), _mb(s.info.get("kv_bytes")), _mb(s.peak_rss or None),
                       _mb(rss_beyond_weights(s)), s.error])
    return _table(header, rows)


def markdown(res: Results, title: str = "gally bench") -> str:
    o = res.options
    out = [f"# {title}", ""] + machine_lines(res) + [""]
    out += [f"Mean ± sample standard deviation over {o.reps} repetitions after one warm-up. Token ids are random; "
            "tokenization and sampling are excluded (gally: Session.append; llama.cpp: Llama.eval; transformers: "
            "model forward with KV cache, last-position logits; ctranslate2: Generator.generate_batch, greedy, its "
            "argmax included), except in the Model.generate row. "
            "ppN: an N-token prompt at once; tgN: N single-token steps; @ dD: after D tokens already in the context. "
            "GB/s: bytes read per token (the weights, and the KV cache of the context attended to) × decode rate. "
            "Peak RSS is each engine's own process, interpreter included.",
            "", "## Throughput", ""] + throughput_lines(res)
    ratios = ratio_lines(res)
    if ratios:
        out += ["", "## gally / peers (same run)", ""] + ratios
    scaling = scaling_lines(res)
    if scaling:
        out += ["", "## Thread scaling (gally)", ""] + scaling
    out += ["", "## Start-up and memory", "", "Load: the engine's load call on a cached model, page cache warm, timed "
            "in a process of its own; peak RSS is the measured process's, which loaded once. TTFT: a fresh context, "
            "the prompt, and the argmax of its last logits. File: the weight file(s) the engine maps or reads. "
            "KV cache: what one benchmark session allocates (gally: of the header's KV cache type, at the run's "
            "context). RSS − file − KV: what the process holds beyond them, where every weight is a view into the "
            f"file; the target for int8/int4 is ≤ {RSS_OVERHEAD_TARGET >> 20} MB. MB: 2^20 bytes.", ""]
    out += setup_lines(res)
    return "\n".join(out) + "\n"


def to_json(res: Results) -> dict:
    def conv(x):
        if isinstance(x, Stat):
            return x.to_json()
        if isinstance(x, Test):
            return {"kind": x.kind, "tokens": x.tokens, "depth": x.depth, "label": x.label}
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, dict):
            return {str(k): conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return conv(res)


def dumps(res: Results) -> str:
    return json.dumps(to_json(res), indent=1)
