"""/metrics: the engine's state and totals in Prometheus' text format (names prefixed gally_)."""

from __future__ import annotations


def _histogram(name: str, help_text: str, h) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for edge, count in zip(h.buckets, h.counts):
        lines.append(f'{name}_bucket{{le="{edge}"}} {count}')
    lines += [f'{name}_bucket{{le="+Inf"}} {h.n}', f"{name}_sum {h.total:.6f}", f"{name}_count {h.n}"]
    return lines


def render(engine) -> str:
    m, s = engine.metrics, engine.stats()
    kv = s["kv_cache"]
    lines = [
        "# HELP gally_requests_running Requests decoding now.", "# TYPE gally_requests_running gauge",
        f"gally_requests_running {s['running']}",
        "# HELP gally_requests_waiting Requests queued for a free sequence.", "# TYPE gally_requests_waiting gauge",
        f"gally_requests_waiting {s['waiting']}",
        "# HELP gally_requests_total Requests finished, by finish reason.", "# TYPE gally_requests_total counter",
    ]
    lines += [f'gally_requests_total{{finish_reason="{reason}"}} {n}'
              for reason, n in sorted(m.requests_finished.items())]
    lines += [
        "# HELP gally_prompt_tokens_total Prompt tokens of finished requests.",
        "# TYPE gally_prompt_tokens_total counter",
        f"gally_prompt_tokens_total {m.prompt_tokens}",
        "# HELP gally_prompt_tokens_cached_total Prompt tokens reused from the prefix cache.",
        "# TYPE gally_prompt_tokens_cached_total counter", f"gally_prompt_tokens_cached_total {m.cached_tokens}",
        "# HELP gally_generation_tokens_total Tokens generated.", "# TYPE gally_generation_tokens_total counter",
        f"gally_generation_tokens_total {m.generated_tokens}",
        "# HELP gally_engine_steps_total Forward passes run.", "# TYPE gally_engine_steps_total counter",
        f"gally_engine_steps_total {m.steps}",
    ]
    lines += _histogram("gally_time_to_first_token_seconds", "From submission to the first token.", m.ttft)
    lines += _histogram("gally_inter_token_latency_seconds", "Between consecutive tokens of a request.", m.inter_token)
    lines += ["# HELP gally_kv_cache_bytes The KV cache pool: held by sequences, mapped, and its cap.",
              "# TYPE gally_kv_cache_bytes gauge",
              f'gally_kv_cache_bytes{{state="in_use"}} {kv["in_use"]}',
              f'gally_kv_cache_bytes{{state="allocated"}} {kv["allocated"]}',
              f'gally_kv_cache_bytes{{state="capacity"}} {kv["capacity"]}',
              "# HELP gally_prefix_cache_entries Finished sequences kept for prompt reuse.",
              "# TYPE gally_prefix_cache_entries gauge", f"gally_prefix_cache_entries {s['prefix_cache_entries']}"]
    return "\n".join(lines) + "\n"
