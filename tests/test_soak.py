"""Long runs leave memory flat: many generate calls, many sessions made and dropped."""

from __future__ import annotations

import gc

import numpy as np

import gally
from generation_helpers import make_text_checkpoint

ALLOWED_GROWTH = 2 << 20  # bytes of resident memory after warm-up


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024


def test_generate_calls_and_sessions_leave_rss_flat(tmp_path):
    model = gally.load(make_text_checkpoint(tmp_path / "m", hidden_size=32, intermediate_size=64,
                                            num_attention_heads=2, num_key_value_heads=1), threads=1)
    prompt = model.tokenizer.encode("The capital of France is")

    def generate(i: int) -> None:
        out = model.generate(prompt, max_new_tokens=4, temperature=0.8, seed=i, stream=i % 2 == 1)
        if i % 2:
            out = list(out)
        assert out

    def session(i: int) -> None:
        s = model.session()
        s.append(prompt)
        assert np.isfinite(s.append([i % model.config.vocab_size])).all()

    for i in range(200):  # warm-up: caches, the allocator's arenas, lazily imported modules
        generate(i)
        session(i)
    gc.collect()
    before = resident_bytes()
    for i in range(1000):
        generate(i)
        if i % 5 == 0:
            session(i)
    gc.collect()
    growth = resident_bytes() - before
    print(f"RSS growth over 1000 generate calls and 200 sessions: {growth / 2**20:+.2f} MiB")
    assert growth <= ALLOWED_GROWTH
