"""llama.cpp through llama-cpp-python, timed as llama-bench times it: pp = the prompt evaluated in
batches of 512, tg = single-token evaluations; flash attention on, as llama-bench's "auto" picks on CPU."""

from __future__ import annotations

import os
import re
import time

import numpy as np

# ggml.h's enum ggml_type, for Llama(type_k, type_v) (llama-cpp-python 0.3.36 has no GGML_TYPE_BF16)
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, gguf, gguf_type, threads, max_context, lib=None, kv_type=None, **_):
        self.gguf, self.gguf_type, self.threads, self.max_context = gguf, gguf_type, threads, max_context
        self.kv_type = kv_type  # llama.cpp's name of the KV cache type; None: its default
        self.llm = None
        self._prepared = False  # the context holds prepare_decode's tokens, for one decode
        if lib:  # read by llama_cpp at its import, which comes later (load): this process runs this engine only
            os.environ["LLAMA_CPP_LIB_PATH"] = os.path.abspath(lib)

    def load(self) -> float:
        from llama_cpp import Llama

        kv = {"type_k": GGML_TYPES[self.kv_type], "type_v": GGML_TYPES[self.kv_type]} if self.kv_type else {}
        self.llm, self._prepared = None, False
        t0 = time.perf_counter()
        self.llm = Llama(model_path=self.gguf, n_threads=self.threads, n_threads_batch=self.threads,
                         n_ctx=self.max_context, n_batch=512, n_ubatch=512, logits_all=False,
                         flash_attn=True, verbose=False, **kv)
        return time.perf_counter() - t0

    def info(self) -> dict:
        import llama_cpp

        # the cache type the context was made with (K's; V's is the same), llama.cpp's default included
        kv = {v: k for k, v in GGML_TYPES.items()}.get(self.llm.context_params.type_k, "?")
        return {"weights": self.gguf_type, "path": self.gguf, "file_bytes": os.path.getsize(self.gguf), "kv_dtype": kv,
                "version": f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}",
                "vocab_size": self.llm.n_vocab(), **build_info(llama_cpp)}

    def _fresh(self, depth_ids):
        self.llm.reset()  # eval() then drops the KV cache past position 0
        if len(depth_ids):
            self.llm.eval(list(depth_ids))

    def prefill(self, depth_ids, prompt_ids) -> dict:
        self._prepared = False
        prompt = [int(i) for i in prompt_ids]
        t0 = time.perf_counter()
        self._fresh(depth_ids)
        t1 = time.perf_counter()
        self.llm.eval(prompt)
        t2 = time.perf_counter()
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        int(np.argmax(logits))
        t3 = time.perf_counter()
        return {"seconds": t2 - t1, "ttft": t3 - t0 if not len(depth_ids) else None}

    def prepare_decode(self, depth_ids) -> dict:
        """depth_ids in a fresh context for the next decode(None, …) (see GallyEngine.prepare_decode)."""
        self._fresh(depth_ids)
        self._prepared = True
        return {}

    def decode(self, depth_ids, gen_ids) -> dict:
        if depth_ids is None:
            if not self._prepared:
                raise ValueError("decode(None, …) needs a prepare_decode first")
        else:
            self._fresh(depth_ids)
        self._prepared = False
        ids = [[int(i)] for i in gen_ids]
        evaluate = self.llm.eval
        t0 = time.perf_counter()
        for one in ids:
            evaluate(one)
        return {"seconds": time.perf_counter() - t0}


def build_info(llama_cpp) -> dict:
    """Which llama.cpp build the peer runs: the libllama loaded and its llama_print_system_info(), which lists
    the CPU features the build was compiled for ("CPU : SSE3 = 1 | AVX2 = 1 | ...")."""
    lib = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
    system_info = llama_cpp.llama_print_system_info()
    if isinstance(system_info, bytes):
        system_info = system_info.decode(errors="replace")
    return {"library": getattr(lib, "_name", "?"), "system_info": " ".join(system_info.split())}


def build_features(system_info: str) -> list:
    """The features a system_info string reports on ("AVX2 = 1"), in its order."""
    return re.findall(r"([A-Za-z0-9_]+) = 1\b", system_info)
