"""The token layer's scheduler and the threaded engine: a batch of prompts gives each prompt's own
output; requests join and leave between steps, long prompts go in chunks without stalling running
ones, a full KV cache pool preempts instead of failing, finished prefixes are reused, and a
cancelled request frees its cache within a step."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import gally
from gally.options import resolve
from gally.scheduler import Scheduler
from generation_helpers import make_text_checkpoint

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_text_checkpoint(tmp_path_factory.mktemp("sched"), num_hidden_layers=2, hidden_size=64,
                                  max_position_embeddings=1024)
    m = gally.load(folder, threads=2)
    m.config.eos_token_id, m.generation_config = [], {}  # never stop early: every request runs its length
    m.tokenizer.eos_token_ids = []
    return m


def params(model, **kw):
    return resolve(model.generation_config, model.config.vocab_size, **{**GREEDY, **kw})


PROMPTS = ["The capital of France is", "Hello", "The quick brown fox jumps over the lazy dog. " * 3, "Stop here."]


def test_a_batch_gives_each_prompt_its_own_output(model):
    alone = [model.generate(p, max_new_tokens=12, **GREEDY) for p in PROMPTS]
    together = model.generate(PROMPTS, max_new_tokens=12, **GREEDY)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    # Each prompt its own options; sampling with a seed is reproducible inside a batch too.
    mixed = model.generate([{"prompt": PROMPTS[0], "max_new_tokens": 3},
                            {"prompt": PROMPTS[1], "temperature": 0.9, "seed": 5, "top_k": 0},
                            PROMPTS[2]], max_new_tokens=7, **GREEDY)
    assert [len(c.token_ids) for c in mixed] == [3, 7, 7]
    assert mixed[1].token_ids == model.generate(PROMPTS[1], max_new_tokens=7, temperature=0.9, seed=5,
                                                top_k=0).token_ids
    assert mixed[2].token_ids == alone[2].token_ids[:7]
    chunks = list(model.generate(PROMPTS[:2], max_new_tokens=5, stream=True, **GREEDY))
    for i in range(2):
        mine = [c for c in chunks if c.index == i]
        assert [t for c in mine for t in c.token_ids] == alone[i].token_ids[:5]
        assert mine[-1].finish_reason == "length" and mine[-1].usage["completion_tokens"] == 5


def test_bad_batches_name_the_prompt(model):
    with pytest.raises(ValueError, match="prompt 1: token id 9999"):
        model.generate(["Hi", [1, 9999]])
    with pytest.raises(ValueError, match="prompt 0: temperature"):
        model.generate([{"prompt": "Hi", "temperature": -1}])
    with pytest.raises(ValueError, match="'prompt' key"):
        model.generate([{"text": "Hi"}])
    with pytest.raises(ValueError, match="batch_size"):
        model.generate(["Hi"], batch_size=0)


def test_requests_join_and_leave_between_steps(model):
    """Two at a time of five requests of different lengths: each ends with its own tokens, and a
    waiting request starts in the step after one ends."""
    sched = Scheduler(model, max_sequences=2)
    lengths = [3, 9, 4, 6, 2]
    ids = [model.tokenizer.encode(PROMPTS[i % 4]) for i in range(5)]
    reqs = [sched.add(i, params(model, max_new_tokens=n)) for i, n in zip(ids, lengths)]
    running_seen = []
    while not sched.idle:
        sched.step()
        running_seen.append(len(sched.running))
        assert len(sched.running) <= 2
    assert [len(r.generated) for r in reqs] == lengths
    for r, i, n in zip(reqs, ids, lengths):
        assert r.generated == model.generate(i, max_new_tokens=n, **GREEDY).token_ids
    assert max(running_seen) == 2 and sum(running_seen) < sum(lengths)  # they overlapped


def test_a_long_prompt_is_prefilled_in_chunks_without_stalling(model):
    sched = Scheduler(model, max_sequences=4, max_batch_tokens=32)
    short = sched.add(model.tokenizer.encode("Hello"), params(model, max_new_tokens=30))
    sched.step()  # its prompt; it now decodes a token per step
    long_prompt = [int(t) for t in np.random.default_rng(0).integers(3, 300, 200)]
    long = sched.add(long_prompt, params(model, max_new_tokens=2))
    steps = 0
    while not long.generated:
        events = sched.step()
        steps += 1
        assert [e.request for e in events if e.token is not None][:1] == [short]  # a token every step
    assert steps >= 200 // 32  # chunks under the budget: the prompt took several steps
    assert long.generated == model.generate(long_prompt, max_new_tokens=1, **GREEDY).token_ids
    assert short.generated[:steps + 1] == model.generate("Hello", max_new_tokens=steps + 1, **GREEDY).token_ids


def test_prompt_chunks_are_long_enough_for_the_gemm(model):
    """Every chunk of a prompt prefilled over several passes, its last included, has at least
    gemm_min_tokens tokens where the pass allows, so that it takes the GEMM as the whole prompt would."""
    sched = Scheduler(model, max_sequences=2, max_batch_tokens=32)
    limit = sched.runner.gemm_min_tokens
    fed = []
    forward = sched.runner.forward_checked

    def recording(sessions, token_ids, counts):
        fed.append(list(counts))
        return forward(sessions, token_ids, counts)

    sched.runner.forward_checked = recording
    short = sched.add(model.tokenizer.encode("Hello"), params(model, max_new_tokens=10))
    sched.step()
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 300, 40)]
    r = sched.add(prompt, params(model, max_new_tokens=1))
    while not r.generated:
        sched.step()
    chunks = [c for counts in fed[1:] for c in counts if c > 1]
    assert sum(chunks) == 40 and min(chunks) >= limit, chunks  # 31 + 9 without the cut: 24 + 16 or 23 + 17
    assert r.generated == model.generate(prompt, max_new_tokens=1, **GREEDY).token_ids
    assert short.generated


@pytest.mark.parametrize("left, room, min_chunk, want", [
    (40, 32, 16, 24),  # 32 would leave 8, under the limit: 16 short of the end instead
    (40, 32, 4, 32),  # 8 left is enough
    (40, 40, 16, 40),  # the whole prompt fits
    (20, 12, 16, 12),  # no split leaves both parts at the limit: what the pass has room for
    (10, 0, 4, 0),
])
def test_chunk_tokens_keeps_a_prompts_last_chunk_at_the_gemm_limit(left, room, min_chunk, want):
    """The one rule Runner::forward's passes and the scheduler's chunks share (forward.h chunk_tokens)."""
    assert gally._core.chunk_tokens(left, room, min_chunk) == want


def steps_to_prefill(model, sched, seed):
    """Adds a random 40-token prompt for one new token and steps until it has it (at most 80 steps);
    checks the token is what the prompt gives alone and returns the steps taken."""
    prompt = [int(t) for t in np.random.default_rng(seed).integers(3, 300, 40)]
    r = sched.add(prompt, params(model, max_new_tokens=1))
    steps = 0
    while not r.generated and steps < 80:
        sched.step()
        steps += 1
    assert r.generated == model.generate(prompt, max_new_tokens=1, **GREEDY).token_ids
    return steps


@pytest.mark.parametrize("budget", [4, 8])
def test_a_pass_smaller_than_the_gemm_limit_still_prefills_a_long_prompt(model, budget):
    """A float model's prompt chunks of fewer than gemm_min_tokens (16 or 17) wait for a larger budget; a
    whole pass smaller than that takes what it can (a prompt longer than the pass is never left waiting)."""
    sched = Scheduler(model, max_sequences=1, max_batch_tokens=budget)
    assert sched.runner.gemm_min_tokens > budget
    assert steps_to_prefill(model, sched, seed=1) <= 40 // budget + 2


def test_decode_steps_leaving_less_than_the_gemm_limit_do_not_starve_a_prompt(model):
    """8 requests decoding in passes of 20 tokens leave a prompt 12 a pass, fewer than gemm_min_tokens: the
    prompt goes in chunks of 12 while they decode, instead of waiting for them to finish."""
    sched = Scheduler(model, max_sequences=9, max_batch_tokens=20)
    assert 20 - 8 < sched.runner.gemm_min_tokens
    decoders = [sched.add([5 + i], params(model, max_new_tokens=60)) for i in range(8)]
    while not all(d.generated for d in decoders):
        sched.step()
    assert steps_to_prefill(model, sched, seed=2) <= 40 // 12 + 2
    assert not any(d.finished for d in decoders)


def test_a_full_pool_preempts_and_every_request_still_finishes(tmp_path):
    """A pool of 6 blocks (96 positions) for four requests of ~40 positions each: the newest goes
    back to the queue whenever the pool is full, and every output is still its own."""
    folder = make_text_checkpoint(tmp_path, num_hidden_layers=2, hidden_size=64)
    m = gally.load(folder, threads=2, kv_cache_bytes=6 * 16 * 512)  # 512 bytes of KV a token
    m.config.eos_token_id, m.tokenizer.eos_token_ids = [], []
    assert m.kv_cache_bytes // m.kv_bytes_per_token == 96
    prompts = [[5 + i] * 10 for i in range(4)]
    together = m.generate(prompts, max_new_tokens=30, **GREEDY)
    for p, c in zip(prompts, together):
        assert c.token_ids == m.generate(p, max_new_tokens=30, **GREEDY).token_ids
    assert m.kv_cache_usage()["in_use"] == 0
    with pytest.raises(ValueError, match="longer than the context"):
        m.generate([1] * 2000)
    lone = m.generate([7] * 80, max_new_tokens=40, **GREEDY)  # 80 + 40 > 96 positions: ends at the pool
    assert lone.finish_reason == "length" and 0 < len(lone.token_ids) < 40


def test_the_prefix_cache_reuses_a_finished_prompt(model):
    sched = Scheduler(model, max_sequences=2, prefix_cache=4)
    system = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    first = sched.add(system + model.tokenizer.encode(" Hello"), params(model, max_new_tokens=4))
    while not sched.idle:
        sched.step()
    second = sched.add(system + model.tokenizer.encode(" Stop here."), params(model, max_new_tokens=6))
    while not sched.idle:
        sched.step()
    assert first.cached_tokens == 0 and second.cached_tokens >= len(system)
    assert second.generated == model.generate(second.prompt, max_new_tokens=6, **GREEDY).token_ids


def test_engine_streams_from_threads_and_cancels(model):
    with gally.Engine(model, max_sequences=3, prefix_cache=0) as engine:
        results = [None] * 6

        def client(i):
            results[i] = engine.submit(PROMPTS[i % 4], max_new_tokens=10, **GREEDY).result()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, c in enumerate(results):
            assert c.token_ids == model.generate(PROMPTS[i % 4], max_new_tokens=10, **GREEDY).token_ids
        # A cancelled request's sequence goes back to the pool within a step.
        stream = engine.submit(PROMPTS[2], max_new_tokens=500, **GREEDY)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        assert model.kv_cache_usage()["in_use"] > 0
        stream.cancel()
        assert list(chunks)[-1].finish_reason == "cancelled"
        assert engine.stats()["running"] == 0 and model.kv_cache_usage()["in_use"] == 0
        assert engine.metrics.requests_finished["cancelled"] == 1 and engine.metrics.ttft.n == 7


def test_engine_queue_limit_and_close(model):
    engine = gally.Engine(model, max_sequences=1, max_queue=1)
    first = engine.submit("Hello", max_new_tokens=200, **GREEDY)
    next(iter(first))  # running now, no longer waiting
    waiting = engine.submit("Hello", max_new_tokens=2, **GREEDY)
    with pytest.raises(gally.QueueFull, match="1 waiting"):
        engine.submit("Hello", max_new_tokens=2)
    first.cancel()
    assert waiting.result().usage["completion_tokens"] == 2
    with pytest.raises(ValueError, match="temperature"):
        engine.submit("Hello", temperature=-2)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("Hello")


def test_engine_async_streams(model):
    async def main():
        with gally.Engine(model, max_sequences=4) as engine:
            loop = asyncio.get_running_loop()

            async def one(p):
                stream = engine.submit(p, loop=loop, max_new_tokens=8, **GREEDY)
                return [t async for c in stream for t in c.token_ids]

            return await asyncio.gather(*(one(p) for p in PROMPTS))

    got = asyncio.run(main())
    assert got == [model.generate(p, max_new_tokens=8, **GREEDY).token_ids for p in PROMPTS]
