"""CTranslate2 through its Python Generator, intra_threads = t, inter_threads = 1 (one generation
at a time on t threads, as gally runs). Generator.generate_batch with include_prompt_in_result=False,
greedy (sampling_topk=1):

- pp: the prompt with max_length=1. CTranslate2 runs all but the last prompt token in one batched
  forward pass that computes no logits, then the last token as one step with its logits and argmax:
  the prompt, the last position's logits and the first token, as gally's TTFT.
- tg: one start token and max_length = min_length = N + 1 (min_length keeps the end token from
  stopping it); a callback stamps each step, and the time from the first stamp to the last covers
  N single-token steps (each with its logits and argmax).

Depth: the context is passed as static_prompt, whose state CTranslate2 caches after the warm-up
and copies into each timed call. Token ids travel as CTranslate2's token strings (vocabulary.json)."""

from __future__ import annotations

import json
import os
import time


class CTranslate2Engine:
    name = "ctranslate2"

    def __init__(self, folder, compute_type, threads, **_):
        self.folder, self.compute_type, self.threads = folder, compute_type, threads
        path = os.path.join(folder, "vocabulary.json")
        try:
            with open(path, encoding="utf-8") as f:
                self.vocab = json.load(f)  # id → token string
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the CTranslate2 vocabulary ({e})") from None
        self.generator = None

    def load(self) -> float:
        import ctranslate2

        self.generator = None
        t0 = time.perf_counter()
        self.generator = ctranslate2.Generator(self.folder, device="cpu", compute_type=self.compute_type,
                                               intra_threads=self.threads, inter_threads=1)
        return time.perf_counter() - t0

    def info(self) -> dict:
        import ctranslate2

        return {"weights": self.generator.compute_type, "path": self.folder,
                "file_bytes": os.path.getsize(os.path.join(self.folder, "model.bin")),
                "version": f"ctranslate2 {ctranslate2.__version__}", "threads": self.threads,
                "vocab_size": len(self.vocab)}

    def _tokens(self, ids) -> list:
        return [self.vocab[int(i)] for i in ids]

    def _generate(self, depth_ids, start, **options):
        return self.generator.generate_batch([start], include_prompt_in_result=False, sampling_topk=1,
                                             static_prompt=self._tokens(depth_ids) if len(depth_ids) else None,
                                             **options)

    def prefill(self, depth_ids, prompt_ids) -> dict:
        prompt = self._tokens(prompt_ids)
        t0 = time.perf_counter()
        self._generate(depth_ids, prompt, max_length=1)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "ttft": seconds if not len(depth_ids) else None}

    def decode(self, depth_ids, gen_ids) -> dict:
        n = len(gen_ids)
        stamps = []

        def stamp(_step):
            stamps.append(time.perf_counter())
            return False  # go on

        self._generate(depth_ids, self._tokens(gen_ids[:1]), max_length=n + 1, min_length=n + 1, callback=stamp)
        if len(stamps) != n + 1:
            raise RuntimeError(f"CTranslate2 made {len(stamps)} steps, not the {n + 1} asked for")
        return {"seconds": stamps[-1] - stamps[0]}
