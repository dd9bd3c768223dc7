"""gally.ray.Generator on a local Ray (two actors, one thread each) and the two examples that use
Ray Data: the Generator's results are Model.generate's, whatever the batches and the actors, and
ray.data.llm's HTTP processor against a `gally serve` gives the same texts."""

from __future__ import annotations

import glob
import importlib
import json
import os
import random
import sys

# Local Ray listens on loopback, not on this machine's network address, and reports no usage.
# Both are read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402

import gally  # noqa: E402
from gally.ray import Generator  # noqa: E402
from generation_helpers import make_text_checkpoint  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
WORDS = "The capital of France is Paris . Hello world , the quick brown fox jumps over the lazy dog !".split()
GREEDY = dict(max_new_tokens=8, temperature=0)


def texts(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(1, 24))) for _ in range(n)]


def chats(n: int, seed: int = 1) -> list[list[dict]]:
    return [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": t}] for t in texts(n, seed)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(make_text_checkpoint(tmp_path_factory.mktemp("ray"), num_hidden_layers=2, hidden_size=64,
                                    max_position_embeddings=512))


@pytest.fixture(scope="module")
def model(folder):
    return gally.load(folder, threads=1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()


def example(name: str):
    """The module examples/NAME.py (which imports its neighbours as top-level modules)."""
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


def by_id(rows) -> list[dict]:
    return sorted(rows, key=lambda row: row["id"])


def test_two_actors_give_what_generate_gives(local_ray, folder, model):
    class Recorded(Generator):  # a local class travels to the actors by value; the pid shows which actor ran a row
        def __call__(self, batch):
            out = Generator.__call__(self, batch)
            return out.append_column("pid", pa.array([os.getpid()] * out.num_rows))

    prompts = texts(300)
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    rows = by_id(ds.map_batches(Recorded, batch_size=24, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(
        size=2), num_cpus=1, fn_constructor_kwargs=dict(model=folder, threads=1, token_ids=True, **GREEDY)).take_all())
    assert [row["id"] for row in rows] == list(range(300)) and len({row["pid"] for row in rows}) == 2
    expected = model.generate(prompts, **GREEDY)
    for row, want in zip(rows, expected):
        assert row["prompt"] == prompts[row["id"]]
        assert (row["generated_text"], row["finish_reason"]) == (want.text, want.finish_reason)
        assert list(row["generated_tokens"]) == want.token_ids
        assert (row["prompt_tokens"], row["completion_tokens"]) == (want.usage["prompt_tokens"],
                                                                    want.usage["completion_tokens"])


def test_chats_in_numpy_batches_are_model_chat(local_ray, folder, model):
    messages = chats(24)
    ds = ray.data.from_items([{"id": i, "messages": m} for i, m in enumerate(messages)])
    rows = by_id(ds.map_batches(Generator, batch_size=5, batch_format="numpy", compute=ray.data.ActorPoolStrategy(
        size=2), num_cpus=1, fn_constructor_kwargs=dict(model=folder, column="messages", **GREEDY)).take_all())
    assert [row["generated_text"] for row in rows] == [model.chat(m, **GREEDY).text for m in messages]


def test_formats_agree_and_bad_input_names_the_column_and_row(folder):
    g = Generator(folder, **GREEDY)
    prompts = ["Hello world", "The quick brown fox"]
    arrow = g(pa.table({"prompt": prompts}))
    numpy = g({"prompt": np.array(prompts, dtype=object)})
    frame = g(pd.DataFrame({"prompt": prompts}))
    assert arrow.column("generated_text").to_pylist() == list(numpy["generated_text"]) == list(frame.generated_text)
    ids = g.model.tokenizer.encode("Hello world", add_special_tokens=False)
    assert g(pa.table({"prompt": [ids]})).column("generated_text").to_pylist()[0] == numpy["generated_text"][0]
    assert g(pa.table({"prompt": pa.array([], pa.string())})).num_rows == 0

    with pytest.raises(ValueError, match="column 'prompt': the batch has no such column .columns: text"):
        g({"text": np.array(["Hi"])})
    with pytest.raises(ValueError, match="column 'prompt', row 1 of the batch: expected text.*got None"):
        g(pa.table({"prompt": ["Hi", None]}))
    with pytest.raises(ValueError, match="column 'prompt', row 1 of the batch: prompt is empty"):
        g(pa.table({"prompt": ["Hi", ""]}))
    with pytest.raises(ValueError, match="column 'prompt', row 0 of the batch: .*longer than the context"):
        g(pa.table({"prompt": ["word " * 600]}))
    with pytest.raises(ValueError, match="already has a column named 'finish_reason'"):
        g(pa.table({"prompt": ["Hi"], "finish_reason": ["x"]}))
    with pytest.raises(ValueError, match="column 'prompt', row 0 of the batch: messages must be"):
        g(pa.table({"prompt": [[{"content": "no role"}]]}))
    with pytest.raises(ValueError, match="use batch_format"):
        g([{"prompt": "Hi"}])
    for bad, message in ((dict(threads=0), "threads must be a positive integer"),
                         (dict(parallel=True), "parallel must be a positive integer"),
                         (dict(column=""), "column must be a column name"),
                         (dict(stream=True), "stream"), (dict(temperature=-1), "temperature")):
        with pytest.raises(ValueError, match=message):
            Generator(folder, **bad)


def test_batch_example_jsonl_to_parquet(local_ray, folder, model, tmp_path):
    ray_batch = example("ray_batch")
    prompts = texts(40, seed=2)
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "results"
    assert ray_batch.main([str(source), str(out), "-m", folder, "--actors", "2", "--batch-size", "8", "-n", "8",
                           "--temp", "0"]) == 0
    rows = by_id(pd.concat(pd.read_parquet(f) for f in glob.glob(str(out / "*.parquet"))).to_dict("records"))
    assert [row["generated_text"] for row in rows] == [c.text for c in model.generate(prompts, **GREEDY)]
    with pytest.raises(ValueError, match="results: the output folder exists already"):
        ray_batch.main([str(source), str(out), "-m", folder])
    with pytest.raises(ValueError, match=r"prompts.csv: expected a \.jsonl, \.json or \.parquet file"):
        ray_batch.main([str(tmp_path / "prompts.csv"), str(tmp_path / "other"), "-m", folder])


def test_http_example_against_gally_serve(local_ray, folder, model, tmp_path):
    """ray.data.llm's HTTP processor: the workers only send requests; the server's greedy replies
    are the model's."""
    from test_serve import Server

    ray_http = example("ray_http")
    messages = chats(12, seed=3)
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in enumerate(messages)))
    server = Server(folder, "--parallel", "2")
    try:
        out = tmp_path / "results"
        assert ray_http.main([str(source), str(out), "--url", server.url + "/v1", "--column", "messages",
                              "--concurrency", "2", "--batch-size", "4", "-n", "8", "--format", "json"]) == 0
    finally:
        server.stop()
    rows = by_id(json.loads(line) for f in glob.glob(str(out / "*.json")) for line in open(f))
    assert [row["messages"] for row in rows] == messages
    assert [row["generated_text"] for row in rows] == [model.chat(m, **GREEDY).text for m in messages]
    assert all(row["completion_tokens"] == 8 and row["finish_reason"] == "length" for row in rows)
