"""`gally bench --serve URL`: C concurrent streaming clients (the official openai client) against any
OpenAI-compatible server — gally serve, llama-server, vLLM — so that they are measured by one tool.

Each request is a /v1/completions call whose prompt is -p random token ids (the same ids for every
server; llama-server and gally serve take token-id prompts) and asks for -n tokens with
ignore_eos, temperature 0 and stream_options.include_usage. Reported: requests completed and
failed (by HTTP status), aggregate generated tok/s (completion tokens of all requests / wall
time), time to first token and inter-token latency (p50, p99), and each request's own decode rate.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class RequestResult:
    ok: bool
    status: Optional[int] = None     # HTTP status of a failure
    error: str = ""
    ttft: Optional[float] = None
    gaps: list = field(default_factory=list)  # seconds between consecutive streamed chunks
    tokens: int = 0
    finish_reason: Optional[str] = None
    seconds: float = 0.0
    decode_s: float = 0.0  # from the first streamed chunk to the last


def _one(client, model: str, prompt: list[int], gen: int) -> RequestResult:
    import openai

    t0 = time.perf_counter()
    last, r = None, RequestResult(ok=True)
    try:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=gen, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and (chunk.choices[0].text or chunk.choices[0].finish_reason):
                if r.ttft is None:
                    r.ttft = now - t0
                elif last is not None:
                    r.gaps.append(now - last)
                last = now
                r.finish_reason = chunk.choices[0].finish_reason or r.finish_reason
            if chunk.usage is not None:
                r.tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as e:
        return RequestResult(ok=False, status=e.status_code, error=str(e)[:200], seconds=time.perf_counter() - t0)
    except openai.APIError as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}", seconds=time.perf_counter() - t0)
    r.seconds = time.perf_counter() - t0
    r.decode_s = (last - t0 - r.ttft) if last is not None and r.ttft is not None else 0.0
    return r


def run_load(url: str, concurrency: int, requests: int, prompt: int, gen: int, vocab: int, seed: int = 0,
             model: str = "", api_key: str = "none", log=lambda s: None) -> dict:
    """Runs `requests` requests, `concurrency` at a time; returns the figures (see the module doc)."""
    import openai

    if concurrency < 1 or requests < 1:
        raise ValueError("concurrency and requests must be positive")
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, vocab, prompt).tolist() for _ in range(requests)]
    client = openai.OpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=600)
    if not model:
        model = client.models.list().data[0].id
    results: list[Optional[RequestResult]] = [None] * requests
    next_index = iter(range(requests))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = _one(client, model, prompts[i], gen)

    log(f"{requests} requests, {concurrency} at a time, to {base} ({model})")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    per_request = [(r.tokens - 1) / r.decode_s for r in ok if r.tokens > 1 and r.decode_s > 0]

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {"url": base, "model": model, "concurrency": concurrency, "requests": requests, "prompt": prompt,
            "gen": gen, "completed": len(ok), "failed": len(failed),
            "failed_by_status": {str(k): sum(1 for r in failed if r.status == k) for k in {r.status for r in failed}},
            "finish_reasons": {k: sum(1 for r in ok if r.finish_reason == k) for k in {r.finish_reason for r in ok}},
            "wall_s": wall, "completion_tokens": sum(r.tokens for r in ok),
            "aggregate_tok_s": sum(r.tokens for r in ok) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "request_tok_s_mean": float(np.mean(per_request)) if per_request else None,
            "errors": sorted({r.error for r in failed})[:5]}


def markdown(rows: list[dict], title: str = "gally bench --serve") -> str:
    lines = [f"# {title}", "",
             "| server | C | requests ok / failed | tokens | aggregate tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
             "| per request tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x, scale=1.0, digits=3):
        return "—" if x is None else f"{x * scale:.{digits}f}"

    for r in rows:
        lines.append(f"| {r['url']} ({r['model']}) | {r['concurrency']} | {r['completed']} / {r['failed']} | "
                     f"{r['completion_tokens']} | {r['aggregate_tok_s']:.1f} | "
                     f"{f(r['ttft_p50'])} / {f(r['ttft_p99'])} | "
                     f"{f(r['itl_p50'], 1e3, 1)} / {f(r['itl_p99'], 1e3, 1)} | {f(r['request_tok_s_mean'], 1, 1)} |")
    return "\n".join(lines) + "\n"


def dumps(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
