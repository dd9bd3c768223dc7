"""gally under the benchmark: timings of Session.append alone, on random token ids."""

from __future__ import annotations

import glob
import os
import time

import numpy as np

# The end-to-end row's prompt: open-ended, so that greedy decoding runs on rather than ending the text
GENERATE_PROMPT = "Here is the long story of a lighthouse keeper, told from the beginning:"


class GallyEngine:
    name = "gally"

    def __init__(self, model, dtype, threads, max_context, kv_dtype=None, **_):
        self.source, self.dtype, self.threads, self.max_context = model, dtype, threads, max_context
        self.kv_dtype = kv_dtype  # None: gally's default
        self.model = None
        self._prepared = None  # prepare_decode's session

    def load(self) -> float:
        import gally

        self.model = self._prepared = None
        t0 = time.perf_counter()
        self.model = gally.load(self.source, dtype=self.dtype, threads=self.threads, kv_dtype=self.kv_dtype)
        return time.perf_counter() - t0

    def info(self) -> dict:
        """Also the memory a session should cost: the mapped weight files (file_bytes; all of it when
        copied_bytes is 0) and the KV cache of one benchmark session (kv_bytes)."""
        m = self.model
        # A session's KV cache at max_context positions: keys and values of every layer and KV head
        kv_bytes = m.kv_bytes_per_token * self.max_context
        return {"weights": m.dtype, "weight_bytes": m.weight_bytes, "copied_bytes": m.copied_bytes,
                "path": m.path, "vocab_size": m.config.vocab_size,
                "file_bytes": sum(os.path.getsize(f) for f in glob.glob(os.path.join(m.path, "*.safetensors"))),
                "kv_bytes": kv_bytes, "kv_bytes_per_token": m.kv_bytes_per_token, "kv_dtype": m.kv_dtype,
                "max_context": self.max_context}

    def _session(self, depth_ids):
        s = self.model.session(self.max_context)
        if len(depth_ids):
            s.append(depth_ids)
        return s

    def prefill(self, depth_ids, prompt_ids) -> dict:
        """Seconds for the prompt; at depth 0 also the time to first token: a new session (its KV
        cache allocated), the prompt, and the argmax of its logits."""
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        t0 = time.perf_counter()
        s = self._session(np.asarray(depth_ids, dtype=np.int32))
        t1 = time.perf_counter()
        logits = s.append(prompt)
        t2 = time.perf_counter()
        int(np.argmax(logits))
        t3 = time.perf_counter()
        return {"seconds": t2 - t1, "ttft": t3 - t0 if not len(depth_ids) else None}

    def prepare_decode(self, depth_ids) -> dict:
        """A session with depth_ids in it for the next decode(None, …): the caller can probe the read
        bandwidth between the prefill and the timed steps."""
        self._prepared = self._session(np.asarray(depth_ids, dtype=np.int32))
        return {}

    def decode(self, depth_ids, gen_ids) -> dict:
        """Seconds for len(gen_ids) decode steps of one token each, after depth_ids (None: in the
        session prepare_decode made, once)."""
        if depth_ids is None:
            s, self._prepared = self._prepared, None
            if s is None:
                raise ValueError("decode(None, …) needs a prepare_decode first")
        else:
            s = self._session(np.asarray(depth_ids, dtype=np.int32))
        ids = [np.asarray([i], dtype=np.int32) for i in gen_ids]
        append = s.append
        t0 = time.perf_counter()
        for one in ids:
            append(one)
        return {"seconds": time.perf_counter() - t0}

    def generate(self, max_new_tokens, prompt_ids) -> dict:
        """Model.generate, greedy and streamed, timed from outside: from the first token's chunk to the
        end, so the decode steps with their sampling and detokenization. The prompt is GENERATE_PROMPT
        when the model has a tokenizer, else prompt_ids."""
        prompt = self.model.tokenizer.encode(GENERATE_PROMPT) if self.model.tokenizer is not None else list(prompt_ids)
        tokens, first, t_first, last = 0, 0, None, None
        for chunk in self.model.generate(prompt, max_new_tokens=max_new_tokens, temperature=0, stream=True):
            tokens += len(chunk.token_ids)
            if t_first is None and tokens:
                t_first, first = time.perf_counter(), tokens
            last = chunk
        t_end = time.perf_counter()
        if tokens - first < 1:
            raise RuntimeError(f"Model.generate stopped after {tokens} token(s); no decode step to time")
        return {"seconds": t_end - t_first, "tokens": tokens - first, "prompt_tokens": len(prompt),
                "finish_reason": last.finish_reason, "own_decode_tok_s": last.timings["decode_tok_s"]}

    def batched(self, prompt_ids, gen_ids) -> dict:
        """B sequences at once, as llama-batched-bench runs them: each a prompt (prompt_ids[i]),
        prefilled in passes of up to 512 tokens across sequences, then len(gen_ids[i]) decode steps
        that feed every sequence one token per pass (Runner.forward_checked: the ids are fixed, no
        sampling). Seconds of the prefill and of the decode steps."""
        b, p = len(prompt_ids), len(prompt_ids[0])
        runner = self.model.runner(max(512, b))
        sessions = [self.model.session(self.max_context) for _ in range(b)]
        per_pass = max(1, runner.max_tokens // p) if p else b
        t0 = time.perf_counter()
        for first in range(0, b, per_pass):
            group = range(first, min(b, first + per_pass))
            runner.forward_checked([sessions[i] for i in group], [t for i in group for t in prompt_ids[i]],
                                   [p] * len(group))
        t1 = time.perf_counter()
        steps = [np.array([g[j] for g in gen_ids], np.int32) for j in range(len(gen_ids[0]))]
        counts = [1] * b
        for step in steps:
            runner.forward_checked(sessions, step, counts)
        t2 = time.perf_counter()
        return {"pp_seconds": t1 - t0, "tg_seconds": t2 - t1}
