"""Offline batch generation with gally on Ray Data: prompts from a JSONL or Parquet file in, a folder
of Parquet (or JSONL) files of completions out. The same script runs on a laptop and on a cluster.

    pip install 'gally[ray]'
    python examples/ray_batch.py prompts.jsonl results/ -m smollm2-135m-instruct --actors 2 --threads 1 -n 128
    python examples/ray_batch.py prompts.parquet results/ --address auto     # on a node of a running cluster
    RAY_ADDRESS=ray://head:10001 python examples/ray_batch.py ...            # or through Ray Client

Each row holds a prompt in --column (default "prompt"): text, or a list of chat messages
[{"role": ..., "content": ...}] to which the model's chat template is applied. Every input column is
kept (give rows an id: Ray Data does not keep their order), and generated_text, finish_reason,
prompt_tokens and completion_tokens are added (gally/ray.py). On a cluster, the input, the output
folder and the model (a folder path, or an alias each node converts into its own ~/.cache/gally)
must be reachable from every node: shared storage, or s3:// / gs:// paths Ray Data reads directly.

Without an address, Ray starts on this machine only and listens on loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", help="prompts: a .jsonl/.json or .parquet file (or a folder of them)")
    p.add_argument("output", help="a folder for the results")
    p.add_argument("-m", "--model", default=None, help="model folder, .gguf or alias (default: smollm2-135m-instruct)")
    p.add_argument("--column", default="prompt", help="the column holding the prompts (default: prompt)")
    p.add_argument("--actors", type=int, default=1, help="actors, each with its own copy of the model (default 1)")
    p.add_argument("--threads", type=int, default=1, help="threads per actor (default 1); actors × threads ≤ cores")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch handed to an actor (default 64)")
    p.add_argument("--parallel", type=int, default=16, help="prompts an actor decodes together (default 16)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="most tokens per completion (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--format", choices=("parquet", "json"), default="parquet", help="output files (default parquet)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="a running Ray cluster (auto, host:port, ray://host:10001); default: RAY_ADDRESS, else local")
    return p.parse_args(argv)


# Reading and writing ask for no core: the actors hold `threads` cores each, and when actors ×
# threads is every core, a task asking for any share of one would wait for ever.
IO_CPUS = 0


def read(path: str):
    import ray.data

    name = path.rstrip("/").lower()
    if name.endswith((".jsonl", ".json")):
        return ray.data.read_json(path, num_cpus=IO_CPUS)
    if name.endswith(".parquet"):
        return ray.data.read_parquet(path, num_cpus=IO_CPUS)
    raise ValueError(f"{path}: expected a .jsonl, .json or .parquet file")


def check_new(path: str) -> None:
    """The results are read back to count them: a folder holding earlier files would count those too."""
    import pyarrow.fs

    fs, where = pyarrow.fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
    if fs.get_file_info(where).type != pyarrow.fs.FileType.NotFound:
        raise ValueError(f"{path}: the output folder exists already; give a new one")


def write_timed(dataset, path: str, format: str) -> tuple[int, int, float]:
    """Writes the dataset (which runs the pipeline); its rows, completion tokens and seconds."""
    t0 = time.perf_counter()
    write = dataset.write_parquet if format == "parquet" else dataset.write_json
    write(path, ray_remote_args={"num_cpus": IO_CPUS})
    seconds = time.perf_counter() - t0
    return (*written(path, format), seconds)


def written(path: str, format: str) -> tuple[int, int]:
    """(rows, completion tokens) in the files written, read by Arrow (no Ray job)."""
    import pyarrow.compute as pc
    import pyarrow.dataset

    table = pyarrow.dataset.dataset(path, format=format).to_table(columns=["completion_tokens"])
    return table.num_rows, pc.sum(table["completion_tokens"]).as_py() or 0


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("actors", "threads", "batch_size", "parallel"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.address is None:
        # Local Ray: its processes listen on loopback rather than on this machine's network
        # address (read when ray is imported); no usage report leaves the machine.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.data import ActorPoolStrategy

    import gally.ray

    ray.init(address=args.address, include_dashboard=False, ignore_reinit_error=True)
    check_new(args.output)
    prompts = read(args.input)
    sampling = dict(max_new_tokens=args.max_tokens, temperature=args.temp, seed=args.seed)
    out = prompts.map_batches(
        gally.ray.Generator, batch_size=args.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs=dict(model=args.model, column=args.column, threads=args.threads,
                                   parallel=args.parallel, **sampling),
        compute=ActorPoolStrategy(size=args.actors), num_cpus=args.threads)
    rows, tokens, seconds = write_timed(out, args.output, args.format)
    print(f"{rows} rows, {tokens} completion tokens in {seconds:.1f} s "
          f"({tokens / seconds:.1f} tok/s, {args.actors} actors × {args.threads} threads, model loads included) "
          f"→ {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
