"""transformers + torch on the same Hugging Face folder: model forward calls alone, KV cache on,
logits of the last position only (as gally and llama.cpp compute them), default (sdpa) attention."""

from __future__ import annotations

import time

TORCH_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


class TransformersEngine:
    name = "transformers"

    def __init__(self, folder, dtype, threads, **_):
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"transformers has no weight type matching gally's {dtype!r}")
        self.folder, self.dtype, self.threads = folder, dtype, threads
        self.model = None
        self._prepared = None  # prepare_decode's cache

    def load(self) -> float:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.threads)
        self.model = self._prepared = None
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=getattr(torch, TORCH_DTYPES[self.dtype]))
        self.model.eval()
        return time.perf_counter() - t0

    def info(self) -> dict:
        import torch
        import transformers

        return {"weights": self.dtype, "path": self.folder, "version": f"transformers {transformers.__version__}, "
                f"torch {torch.__version__}", "threads": torch.get_num_threads()}

    def _forward(self, ids, cache):
        return self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    def _fresh(self, depth_ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if len(depth_ids):
            self._forward(_tensor(depth_ids), cache)
        return cache

    def prefill(self, depth_ids, prompt_ids) -> dict:
        import torch

        prompt = _tensor(prompt_ids)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = self._fresh(depth_ids)
            t1 = time.perf_counter()
            logits = self._forward(prompt, cache)
            t2 = time.perf_counter()
            int(logits[0, -1].argmax())
            t3 = time.perf_counter()
        return {"seconds": t2 - t1, "ttft": t3 - t0 if not len(depth_ids) else None}

    def prepare_decode(self, depth_ids) -> dict:
        """depth_ids in a fresh cache for the next decode(None, …) (see GallyEngine.prepare_decode)."""
        import torch

        with torch.inference_mode():
            self._prepared = self._fresh(depth_ids)
        return {}

    def decode(self, depth_ids, gen_ids) -> dict:
        import torch

        with torch.inference_mode():
            if depth_ids is None:
                cache, self._prepared = self._prepared, None
                if cache is None:
                    raise ValueError("decode(None, …) needs a prepare_decode first")
            else:
                cache = self._fresh(depth_ids)
            ids = [_tensor([i]) for i in gen_ids]
            t0 = time.perf_counter()
            for one in ids:
                self._forward(one, cache)
            return {"seconds": time.perf_counter() - t0}


def _tensor(ids):
    """[1, n] token ids, made before the clock starts."""
    import torch

    return torch.tensor([[int(i) for i in ids]], dtype=torch.long)
