"""Offline batch inference on Ray Data: a callable class for `Dataset.map_batches` that loads the
model once per actor and decodes each batch of prompts together (Model.generate's continuous
batching). Needs: pip install 'gally[ray]'.

    import ray
    from ray.data import ActorPoolStrategy
    import gally.ray

    ds = ray.data.read_json("prompts.jsonl")                  # a "prompt" column (or "messages")
    out = ds.map_batches(gally.ray.Generator, batch_size=64, batch_format="pyarrow",
                         fn_constructor_kwargs=dict(model="smollm2-135m-instruct", threads=1,
                                                    max_new_tokens=128, temperature=0),
                         compute=ActorPoolStrategy(size=2),   # actors, each with its own model
                         num_cpus=1)                          # = threads: Ray fits actors × threads to the cores
    out.write_parquet("results/")

The column the prompts are read from (`column`, default "prompt") may hold, row by row, text (a raw
prompt, as Model.generate takes it), a list of chat messages [{"role": ..., "content": ...}]
(rendered with the model's chat template, as Model.chat), or token ids. Every input column is kept;
added are generated_text (ray.data.llm's name), finish_reason ("stop" or "length"),
prompt_tokens and completion_tokens (OpenAI's usage names), and generated_tokens with
token_ids=True. Greedy outputs equal Model.generate's for the same prompts, whatever the batches.

Sizing: an actor runs `threads` compute threads; giving map_batches num_cpus=threads makes Ray place
no more actors on a node than its cores hold. When actors × threads is every core, Ray Data's read
and write tasks, which ask for a core by default, would wait for ever: give them num_cpus=0, as
examples/ray_batch.py does. Each actor holds its own copy of the model (mapped from the same file
on one node, so the page cache holds the weights once) and its own KV caches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

import numpy as np

__all__ = ["Generator", "OUTPUT_COLUMNS"]

OUTPUT_COLUMNS = ("generated_text", "finish_reason", "prompt_tokens", "completion_tokens")


class Generator:
    """map_batches' callable class: Generator(model, column="prompt", threads=1, dtype=None,
    max_context=None, parallel=16, token_ids=False, **sampling).

    model: a folder, .gguf or alias, as gally.load takes it (each node loads its own copy).
    parallel: prompts decoded together within a batch (each holds a KV cache while it runs).
    sampling: Model.generate's options (max_new_tokens, temperature, top_k, top_p, min_p, seed,
    stop, ...), checked when the actor starts.
    """

    def __init__(self, model: str, column: str = "prompt", threads: int = 1, dtype: Optional[str] = None,
                 max_context: Optional[int] = None, parallel: int = 16, token_ids: bool = False, **sampling):
        import gally
        from gally.generate import resolve_options

        if not isinstance(column, str) or not column:
            raise ValueError(f"column must be a column name, got {column!r}")
        for name, value in (("threads", threads), ("parallel", parallel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if "stream" in sampling:
            raise ValueError("stream: a batch job returns whole completions; drop the stream option")
        self.model = gally.load(model, dtype=dtype, threads=threads, max_context=max_context)
        resolve_options(self.model, **sampling)  # a bad option fails here, once, not on every batch
        self.column = column
        self.parallel = parallel
        self.token_ids = token_ids
        self.sampling = sampling

    def __call__(self, batch):
        """A batch in — a pyarrow Table (batch_format="pyarrow", which keeps nested input columns such
        as chat messages as they are), a dict of NumPy arrays or a pandas DataFrame —, the same batch
        with the output columns out."""
        arrow = hasattr(batch, "append_column")
        if not arrow and not isinstance(batch, Mapping) and not hasattr(batch, "assign"):
            raise ValueError(f"the batch is a {type(batch).__name__}; "
                             "use batch_format='pyarrow', 'numpy' or 'pandas'")
        names = list(batch.column_names if arrow else batch.keys())
        if self.column not in names:
            raise ValueError(f"column {self.column!r}: the batch has no such column "
                             f"(columns: {', '.join(map(str, names)) or 'none'})")
        outputs = OUTPUT_COLUMNS + (("generated_tokens",) if self.token_ids else ())
        taken = [name for name in outputs if name in names]
        if taken:
            raise ValueError(f"the batch already has a column named {taken[0]!r}, which Generator writes; "
                             "rename it first (Dataset.rename_columns)")
        values = batch.column(self.column).to_pylist() if arrow else batch[self.column]
        prompts = [self._prompt(value, row) for row, value in enumerate(values)]
        try:
            done = self.model.generate(prompts, batch_size=self.parallel, **self.sampling) if prompts else []
        except ValueError as e:  # "prompt i: ..." — i is the row of the batch
            raise ValueError(re.sub(r"^prompt (\d+): ", rf"column {self.column!r}, row \1 of the batch: ", str(e))) \
                from None
        columns = {
            "generated_text": [c.text for c in done],
            "finish_reason": [c.finish_reason for c in done],
            "prompt_tokens": [c.usage["prompt_tokens"] for c in done],
            "completion_tokens": [c.usage["completion_tokens"] for c in done],
        }
        if self.token_ids:
            columns["generated_tokens"] = [list(c.token_ids) for c in done]
        if arrow:
            import pyarrow as pa

            types = {"generated_text": pa.string(), "finish_reason": pa.string(), "prompt_tokens": pa.int64(),
                     "completion_tokens": pa.int64(), "generated_tokens": pa.list_(pa.int64())}
            for name, column in columns.items():
                batch = batch.append_column(name, pa.array(column, type=types[name]))
            return batch
        numpy = {name: np.array(column, dtype=object if name in ("generated_text", "finish_reason") else np.int64)
                 for name, column in columns.items() if name != "generated_tokens"}
        if self.token_ids:
            numpy["generated_tokens"] = np.empty(len(done), dtype=object)  # ragged: one array per row
            numpy["generated_tokens"][:] = [np.array(ids, dtype=np.int64) for ids in columns["generated_tokens"]]
        return {**batch, **numpy} if isinstance(batch, Mapping) else batch.assign(**numpy)

    def _prompt(self, value, row: int):
        """Text, a chat (rendered to token ids), or token ids; anything else names its row."""
        from gally.generate import render_chat

        where = f"column {self.column!r}, row {row} of the batch"
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
            if all(isinstance(m, Mapping) for m in value):
                try:
                    return {"prompt": render_chat(self.model, [dict(m) for m in value])}
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value):
                return [int(t) for t in value]
        raise ValueError(f"{where}: expected text, a list of chat messages or token ids, got {_show(value)}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
