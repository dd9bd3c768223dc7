"""What generation adds on top of the engine: Model.generate's decode rate against raw
Session.append decode of the same tokens, and the cost of one sampling step per vocabulary size.

    python bench/generate_overhead.py [MODEL] [--dtype bf16] [-t 2] [-n 128] [-r 5]

Raw and generate runs alternate, so that machine noise hits both alike; each figure is the mean ±
sample std over the repetitions. The generate row is timed by its own Completion.timings
(first token to last: every decode step with its sampling, detokenization and stop checks).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import gally
from gally import sampling

PROMPT = "The history of the printing press begins"
CONFIGS = {
    "greedy": dict(temperature=0.0),
    "default sampling": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # gally's DEFAULTS
    "top_p 0.95 only": dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0),
}


def raw_decode(model, prompt_ids, tokens) -> float:
    """tokens/s of single-token Session.append calls feeding `tokens` after the prompt."""
    s = model.session(len(prompt_ids) + len(tokens) + 1)
    s.append(prompt_ids)
    t0 = time.perf_counter()
    for t in tokens[:-1]:
        s.append(t)
    return (len(tokens) - 1) / (time.perf_counter() - t0)


def mean_std(xs) -> str:
    return f"{statistics.mean(xs):8.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:5.2f}"


def sampling_on_model_logits(model, prompt_ids, steps: int = 64) -> None:
    """µs per sampled token on the logits this model produces along a greedy continuation."""
    s = model.session(len(prompt_ids) + steps + 1)
    logits = [s.append(prompt_ids)]
    for _ in range(steps - 1):
        logits.append(s.append(int(np.argmax(logits[-1]))))
    print(f"\n| config, on this model's logits ({steps} steps) | µs per sampled token |\n|---|---:|")
    for name, kw in list(CONFIGS.items()) + [("temperature 1, no filter", dict(temperature=1.0, top_k=0, top_p=1.0,
                                                                              min_p=0.0))]:
        params = sampling.SamplingParams(**kw)
        sampler = sampling.Sampler(params, model.config.vocab_size, seed=0, prompt_ids=prompt_ids)
        t0 = time.perf_counter()
        for _ in range(5):
            for x in logits:
                sampler(x)
        print(f"| {name} | {(time.perf_counter() - t0) / (5 * len(logits)) * 1e6:.0f} |")


def sampling_cost(reps: int = 300) -> None:
    print("\n| vocab | logits | config | µs per sampled token |\n|---|---|---|---:|")
    rng = np.random.default_rng(0)
    for vocab in (49152, 151936):
        for name, scale in (("peaked (N(0,1)·4)", 4.0), ("flat (N(0,1))", 1.0)):
            logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
            for cname, kw in (("greedy", dict(temperature=0.0)), ("default", {}),
                              ("top_p 0.95 only", dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0)),
                              ("rep. penalty 1.1 + default", dict(repetition_penalty=1.1))):
                s = sampling.Sampler(sampling.SamplingParams(**kw), vocab, seed=0, prompt_ids=range(0, 2000, 3))
                s(logits)
                t0 = time.perf_counter()
                for _ in range(reps):
                    s(logits)
                print(f"| {vocab} | {name} | {cname} | {(time.perf_counter() - t0) / reps * 1e6:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--no-sampling-table", action="store_true")
    args = ap.parse_args()
    model = gally.load(args.model, dtype=args.dtype, threads=args.threads)
    ids = model.tokenizer.encode(PROMPT) if model.tokenizer else list(range(10, 20))
    print(f"{model}\nprompt {len(ids)} tokens, {args.n_gen} generated, {args.repetitions} repetitions\n")
    print("| config | raw Session.append tok/s | Model.generate tok/s | generate / raw |\n|---|---:|---:|---:|")
    for name, kw in CONFIGS.items():
        raw, gen = [], []
        model.generate(ids, max_new_tokens=8, seed=0, **kw)  # warm-up
        for r in range(args.repetitions):
            c = model.generate(ids, max_new_tokens=args.n_gen, seed=r, **kw)
            gen.append(c.timings["decode_tok_s"])
            raw.append(raw_decode(model, ids, c.token_ids))
        ratio = statistics.mean(g / w for g, w in zip(gen, raw))
        print(f"| {name} ({len(c.token_ids)} tokens) | {mean_std(raw)} | {mean_std(gen)} | {ratio:.3f} |")
    if not args.no_sampling_table:
        sampling_on_model_logits(model, ids)
        sampling_cost()


if __name__ == "__main__":
    main()
