"""The benchmark's plan and its run: for each weight type and thread count, gally and its peers are
loaded side by side (one process each), warmed up once, then timed test by test in turn, the
order rotating each repetition, so that all of them meet the same background load."""

from __future__ import annotations

import datetime
import importlib.util
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..model import DTYPES, KV_DTYPES, QUANTIZED
from . import derived, llama_bench, machine, peer_ct2, peer_gguf
from .stats import Stat, rates
from .worker import Worker, WorkerError

PROBE_PASSES = 3  # read passes before and after each timed decode
PREPARED_DECODE = ("gally", "llama.cpp", "transformers")  # engines whose decode can start from prepare_decode
PEERS = ("llama.cpp", "transformers", "llama-bench", "ctranslate2")
LIBLLAMA = ("libllama.so", "libllama.dylib")  # what llama-cpp-python loads from LLAMA_CPP_LIB_PATH
INSTALL = {
    "llama.cpp": 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36',
    "transformers": "pip install torch==2.13.0 transformers",
    "ctranslate2": peer_ct2.INSTALL,
}


@dataclass
class Options:
    model: Optional[str] = None
    dtypes: list = field(default_factory=lambda: ["f32", "bf16"])
    prompts: list = field(default_factory=lambda: [512])
    gens: list = field(default_factory=lambda: [128])
    threads: Optional[list] = None  # default: gally's default, the physical cores
    depths: list = field(default_factory=lambda: [0])
    reps: int = 5
    peers: list = field(default_factory=list)
    llama_cpp: Optional[str] = None  # llama.cpp sources (convert_hf_to_gguf.py)
    llama_cpp_bin: Optional[str] = None  # llama.cpp binaries (llama-quantize, llama-bench)
    llama_cpp_lib: Optional[str] = None  # the libllama the llama.cpp peer loads (default: llama-cpp-python's own)
    ggufs: dict = field(default_factory=dict)  # dtype → a peer GGUF to use as is
    generate: bool = True
    seed: int = 0
    bandwidth_bytes: int = 1 << 30
    shape: Optional[str] = None  # random weights in this model's shapes (random_model.SHAPES) instead of `model`
    sequential: bool = False     # engines one after another instead of side by side (models near the RAM)
    kv_dtype: Optional[str] = None  # KV cache type of gally and the llama.cpp peers (None: each engine's default)

    def validate(self) -> None:
        def ints(name, values, low):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= {low}, got {values!r}")

        ints("prompts (-p)", self.prompts, 0)
        ints("gens (-n)", self.gens, 0)
        ints("depths (-d)", self.depths, 0)
        if self.threads is not None:
            ints("threads (-t)", self.threads, 1)
        ints("reps (-r)", [self.reps], 1)
        ints("bandwidth_bytes", [self.bandwidth_bytes], 1 << 20)
        if self.shape is not None:
            from .random_model import SHAPES

            if self.shape not in SHAPES:
                raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, not {self.shape!r}")
            if self.model is not None:
                raise ValueError("give either -m MODEL or --shape NAME, not both")
        if not any(self.prompts) and not any(self.gens):
            raise ValueError("nothing to measure: every prompt length (-p) and generation length (-n) is 0")
        bad = [d for d in self.dtypes if d not in DTYPES] or ([] if self.dtypes else ["(none)"])
        if bad:
            raise ValueError(f"dtype {bad[0]!r} is not one of {', '.join(DTYPES)}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"--kv-dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        bad = [p for p in self.peers if p not in PEERS]
        if bad:
            raise ValueError(f"peer {bad[0]!r} is not one of {', '.join(PEERS)}")
        if self.llama_cpp_lib is not None:
            if not os.path.isdir(self.llama_cpp_lib):
                raise FileNotFoundError(f"--llama-cpp-lib {self.llama_cpp_lib}: no such folder")
            if not any(os.path.isfile(os.path.join(self.llama_cpp_lib, n)) for n in LIBLLAMA):
                raise ValueError(f"--llama-cpp-lib {self.llama_cpp_lib}: holds no {' or '.join(LIBLLAMA)}")
        for d, path in self.ggufs.items():
            if d not in DTYPES:
                raise ValueError(f"--gguf: {d!r} is not one of {', '.join(DTYPES)}")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--gguf {d}={path}: no such file")


@dataclass(frozen=True)
class Test:
    kind: str  # "pp": a prompt of `tokens` at once; "tg": `tokens` single-token steps
    tokens: int
    depth: int = 0  # tokens already in the context, not timed

    @property
    def label(self) -> str:
        return f"{self.kind}{self.tokens}" + (f" @ d{self.depth}" if self.depth else "")


@dataclass
class Row:
    """One engine's rate on one test."""

    engine: str
    dtype: str
    weights: str
    threads: int
    test: Test
    tok_s: Optional[Stat]
    gb_s: Optional[Stat] = None  # bytes read per token (weights and KV cache) × rate (gally only)
    bw_fraction: Optional[Stat] = None  # gb_s / the mean read pass around each repetition (_interleave)
    bw_fraction_best: Optional[Stat] = None  # gb_s / the best of those passes
    read_passes: Optional[list] = None  # GB/s of the read passes around each repetition (None: none made)
    note: str = ""


@dataclass
class Setup:
    """One engine at one dtype and thread count: load time, time to first token, peak RSS, errors."""

    engine: str
    dtype: str
    threads: int
    weights: str = "?"
    load_s: Optional[Stat] = None
    ttft_s: dict = field(default_factory=dict)  # prompt length → Stat
    peak_rss: Optional[int] = None
    info: dict = field(default_factory=dict)
    error: str = ""


@dataclass
class Results:
    options: Options
    command: str
    date: str
    machine: dict
    model: dict  # dtype → the model folder gally and the peers loaded (for int8/int4: quantized from)
    bandwidth: dict  # threads → GB/s, the best probe of the run
    peers: dict  # peer → dtype → status
    rows: list
    setups: list
    load: dict = field(default_factory=dict)  # "dtype tN" → 1-min load average (before, after) the block
    block_bandwidth: dict = field(default_factory=dict)  # "dtype tN" → GB/s, the probe just before the block
    quantized: dict = field(default_factory=dict)  # int8/int4 → the `gally quantize` folder gally loaded


def tests_of(opts: Options) -> list:
    return ([Test("pp", p, d) for d in opts.depths for p in opts.prompts if p]
            + [Test("tg", n, d) for d in opts.depths for n in opts.gens if n])


def installed(peer: str) -> str:
    """'' when the peer can be imported/run, else why not."""
    if peer == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return f"not installed ({INSTALL['llama.cpp']})"
    if peer == "transformers":
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"not installed: no {' and '.join(missing)} ({INSTALL['transformers']})"
    if peer == "ctranslate2" and importlib.util.find_spec("ctranslate2") is None:
        return f"not installed ({INSTALL['ctranslate2']})"
    return ""


def run(opts: Options, command: str = "", log: Callable[[str], None] = lambda s: None) -> Results:
    import gally
    from gally import _core, config, sources

    opts.validate()
    threads = opts.threads or [gally.physical_cores()]
    # A GGUF source or alias has one cached conversion per dtype, which gally loads zero-copy;
    # the peers get the same folder
    log("resolving the model (a GGUF source is converted once per dtype)")
    if opts.shape:  # random weights, stored f32 for f32 and bf16 for the rest (8B f32 would not fit)
        folders = {d: derived.random_folder(opts.shape, "f32" if d == "f32" else "bf16", log=log) for d in opts.dtypes}
    else:
        folders = {d: sources.resolve(opts.model, d if d in ("f32", "bf16", "f16") else None) for d in opts.dtypes}
    vocab = config.read(folders[opts.dtypes[0]]).vocab_size
    tests = tests_of(opts)
    rng = np.random.default_rng(opts.seed)
    inputs = {t: (rng.integers(0, vocab, t.depth).tolist(), rng.integers(0, vocab, t.tokens).tolist()) for t in tests}
    gen_prompt = rng.integers(0, vocab, 16).tolist()  # for Model.generate when the model has no tokenizer

    results = Results(opts, command, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      machine.describe(), folders, {}, {p: {} for p in opts.peers}, [], [])

    for dtype in opts.dtypes:
        specs = _peer_specs(opts, dtype, folders[dtype], results.peers, log)
        if dtype in QUANTIZED:
            results.quantized[dtype] = specs["gally"]["model"]
        for t in threads:
            # probed before every block for the header (the best of the run: the machine's bandwidth);
            # each decode's own fraction comes from read passes around it (_interleave)
            log(f"[{dtype} t{t}] probing read bandwidth ({opts.bandwidth_bytes >> 20} MiB, best of 5)")
            bw = _core.read_bandwidth(opts.bandwidth_bytes, t, 5)
            results.bandwidth[t] = max(bw, results.bandwidth.get(t, 0.0))
            results.block_bandwidth[f"{dtype} t{t}"] = bw
            before = _load_average()
            _block(opts, dtype, t, tests, inputs, gen_prompt, specs, results, log)
            results.load[f"{dtype} t{t}"] = (before, _load_average())
    return results


def _load_average():
    """The 1-minute load average: other work on the machine, which skews absolute figures."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _peer_specs(opts, dtype, folder, status, log) -> dict:
    """engine → the spec its worker starts from (threads filled in later); status[peer][dtype] says why a peer is
    absent. gally loads int8/int4 from a stored `gally quantize` folder (zero-copy), not quantizing at load."""
    model = derived.quantized_folder(folder, dtype, log=log, calibrate=not opts.shape) if dtype in QUANTIZED else (
        folder if opts.shape else opts.model)
    specs = {"gally": {"model": model, "dtype": dtype, "kv_dtype": opts.kv_dtype}}
    kv_type = peer_gguf.LLAMA_KV_TYPES[opts.kv_dtype] if opts.kv_dtype else None
    gguf = gguf_type = ct2 = None
    for peer in opts.peers:
        why = installed(peer)
        if not why and peer in ("llama.cpp", "llama-bench"):
            if peer == "llama-bench" and not peer_gguf.find_tool("llama-bench", opts.llama_cpp_bin, opts.llama_cpp):
                why = "no llama-bench binary (pass --llama-cpp-bin DIR)"
            elif gguf is None:
                try:
                    gguf = opts.ggufs.get(dtype) or peer_gguf.peer_gguf(folder, dtype, opts.llama_cpp,
                                                                       opts.llama_cpp_bin, log=log)
                    gguf_type = peer_gguf.type_of(gguf, dtype)
                except peer_gguf.PeerUnavailable as e:
                    gguf = e
            if isinstance(gguf, Exception):
                why = str(gguf)
        if not why and peer == "ctranslate2":
            try:
                ct2 = peer_ct2.ct2_folder(folder, dtype, log=log)
            except derived.PeerUnavailable as e:
                why = str(e)
        if not why and peer == "transformers" and dtype not in ("f32", "bf16", "f16"):
            why = f"no transformers weight type matches {dtype}"
        if why:
            status[peer][dtype] = why
            log(f"{peer} at {dtype}: {why}")
            continue
        status[peer][dtype] = "measured"
        if peer == "llama.cpp":
            specs[peer] = {"gguf": gguf, "gguf_type": gguf_type, "lib": opts.llama_cpp_lib, "kv_type": kv_type}
        elif peer == "transformers":
            specs[peer] = {"folder": folder, "dtype": dtype}
        elif peer == "ctranslate2":
            specs[peer] = {"folder": ct2, "compute_type": peer_ct2.CT2_TYPES[dtype]}
        else:
            specs[peer] = {"gguf": gguf, "gguf_type": gguf_type, "kv_type": kv_type,
                           "tool": peer_gguf.find_tool("llama-bench", opts.llama_cpp_bin, opts.llama_cpp)}
    return specs


def _block(opts, dtype, threads, tests, inputs, gen_prompt, specs, results: Results, log) -> None:
    """gally and the peers at one dtype and thread count, interleaved."""
    tag = f"[{dtype} t{threads}]"
    context = max([t.depth + t.tokens for t in tests] + [len(gen_prompt) + max(opts.gens) + 1])
    setups = {name: Setup(name, dtype, threads) for name in specs if name != "llama-bench"}
    results.setups += setups.values()
    if opts.sequential:  # one engine at a time: two copies of a large model's weights would not fit
        workers, seconds, probes = {}, {}, {}
        for name in setups:
            one = _start(opts, {name: specs[name]}, {name: setups[name]}, threads, -(-context // 256) * 256, tag, log)
            seconds.update(_interleave(opts, threads, tests, inputs, one, setups, tag, log, probes))
            _finish_engine(opts, dtype, threads, one, setups, gen_prompt, results, log)
        _rows(opts, dtype, threads, tests, setups, seconds, probes, results)
        if "llama-bench" in specs:
            _llama_bench_rows(opts, dtype, threads, specs["llama-bench"], results, log)
        return
    workers = _start(opts, specs, setups, threads, -(-context // 256) * 256, tag, log)
    probes = {}
    seconds = _interleave(opts, threads, tests, inputs, workers, setups, tag, log, probes)

    _rows(opts, dtype, threads, tests, setups, seconds, probes, results)
    _finish_engine(opts, dtype, threads, workers, setups, gen_prompt, results, log)
    if "llama-bench" in specs:
        _llama_bench_rows(opts, dtype, threads, specs["llama-bench"], results, log)


def _rows(opts, dtype, threads, tests, setups, seconds, probes, results) -> None:
    for name, setup in setups.items():
        for test in tests:
            s = seconds.get((name, test), [])
            if len(s) != opts.reps:
                continue
            row = Row(name, dtype, setup.weights, threads, test, rates(test.tokens, s))
            if name == "gally" and test.kind == "tg":
                row.gb_s = row.tok_s.scaled(read_per_token(setup.info, test) / 1e9)
                row.read_passes = passes = probes[name, test]  # the read passes around each repetition
                if all(passes):
                    row.bw_fraction = Stat.of([g / statistics.fmean(p) for g, p in zip(row.gb_s.samples, passes)])
                    row.bw_fraction_best = Stat.of([g / max(p) for g, p in zip(row.gb_s.samples, passes)])
            results.rows.append(row)


def read_per_token(info: dict, test: Test) -> float:
    """Bytes a decode step of `test` reads on average: every weight, and the KV cache of the context
    it attends to (depth + i + 1 positions at step i), which at depth 8192 rivals the weights."""
    return info["weight_bytes"] + info["kv_bytes_per_token"] * (test.depth + (test.tokens + 1) / 2)


def _finish_engine(opts, dtype, threads, workers, setups, gen_prompt, results, log) -> None:
    """Peak RSS while prefilling and decoding token ids (before Model.generate brings in the
    tokenizer), the Model.generate row, and the workers closed."""
    for name, w in workers.items():
        try:
            setups[name].peak_rss = w.call("peak_rss")["bytes"]
        except WorkerError as e:
            setups[name].error = str(e)
    if opts.generate and "gally" in workers and any(opts.gens):
        results.rows.append(_generate_row(opts, dtype, threads, workers["gally"], setups["gally"], gen_prompt, log))
    for w in workers.values():
        w.close()


def _start(opts, specs, setups, threads, max_context, tag, log) -> dict:
    """A loaded worker per engine; failures go to its Setup. The load is timed reps times after one
    untimed load in a process of its own, so that the worker that is measured has loaded once and its
    peak RSS is what one load and the runs cost, not what repeated loads leave on the heap."""
    workers = {}
    for name, setup in setups.items():
        log(f"{tag} loading {name}")
        w = None
        try:
            spec = {**specs[name], "threads": threads, "max_context": max_context}
            w = Worker(name, spec)
            try:
                setup.load_s = Stat.of(w.call("load", times=opts.reps + 1)["seconds"][1:])
            finally:
                w.close()
            w = Worker(name, spec)
            w.call("load", times=1)
            setup.info = w.call("info")
            setup.weights = setup.info.get("weights", "?")
            workers[name] = w
        except WorkerError as e:
            setup.error = str(e)
            log(f"{tag} {name} failed: {e}")
            if w is not None:
                w.close()
    return workers


def _interleave(opts, threads, tests, inputs, workers, setups, tag, log, probes: dict) -> dict:
    """One warm-up pass, then reps passes: each test run by every engine in turn, the first engine
    rotating. Returns {(engine, test): seconds per repetition}; fills each Setup's TTFT, and
    probes[(engine, test)] with the GB/s of the read passes around each timed decode (None where
    they could not be made).

    The host's bandwidth moves from one second to the next (on the 2-core test machine a pass over
    1 GiB read 10-23 GB/s within a minute), so a decode's bytes per second are compared with read
    passes just before and after it, once its context is in (prepare_decode; an engine without it,
    CTranslate2, gets its passes before the call that prefills and decodes). Every engine's decode
    comes after the same passes, which leave the caches alike for all of them."""
    from gally import _core

    seconds = {(name, t): [] for name in workers for t in tests}
    ttft = {name: {} for name in workers}
    probe = None  # the read buffer, made at the first timed decode and held through the block

    def read_passes():
        nonlocal probe
        try:
            if probe is None:
                probe = _core.ReadProbe(opts.bandwidth_bytes)
            return probe.passes(threads, PROBE_PASSES)
        except (MemoryError, ValueError, RuntimeError) as e:  # the fractions are left out, not the run
            log(f"{tag} read passes failed: {type(e).__name__}: {e}")
            return None

    def measure(name, test, keep):
        depth_ids, ids = inputs[test]
        passes = None
        try:
            if test.kind == "pp":
                r = workers[name].call("prefill", depth_ids=depth_ids, prompt_ids=ids)
            else:
                prepared = name in PREPARED_DECODE
                if prepared:
                    workers[name].call("prepare_decode", depth_ids=depth_ids)
                before = read_passes() if keep else None
                r = workers[name].call("decode", depth_ids=None if prepared else depth_ids, gen_ids=ids)
                after = read_passes() if keep else None
                passes = before + after if before and after else None
        except WorkerError as e:
            setups[name].error = str(e)
            log(f"{tag} {name} failed: {e}")
            workers.pop(name).close()
            return
        if keep:
            seconds[name, test].append(r["seconds"])
            if test.kind == "tg":
                probes.setdefault((name, test), []).append(passes)
            if r.get("ttft") is not None:
                ttft[name].setdefault(test.tokens, []).append(r["ttft"])

    log(f"{tag} warm-up")
    for name in list(workers):
        for test in tests:
            if name in workers:
                measure(name, test, keep=False)
    for rep in range(opts.reps):
        log(f"{tag} repetition {rep + 1}/{opts.reps}")
        for test in tests:
            names = list(workers)
            k = rep % max(len(names), 1)
            for name in names[k:] + names[:k]:
                if name in workers:
                    measure(name, test, keep=True)
    for name, by_prompt in ttft.items():
        setups[name].ttft_s = {p: Stat.of(v) for p, v in by_prompt.items() if len(v) == opts.reps}
    return seconds


def _generate_row(opts, dtype, threads, worker, setup, prompt, log) -> Row:
    """End to end: Model.generate's decode rate, sampling and detokenization included. Each run
    alternates with a raw Session.append decode of as many steps after as long a prompt, so that
    the note's generate / raw ratio compares the two under the same machine noise."""
    n = max(opts.gens)
    log(f"[{dtype} t{threads}] Model.generate, alternating with raw decode")
    runs, raw = [], []
    try:
        for _ in range(opts.reps + 1):  # the first pair warms up
            runs.append(worker.call("generate", max_new_tokens=n, prompt_ids=prompt))
            r = runs[-1]
            ids = [prompt[i % len(prompt)] for i in range(r["prompt_tokens"] + r["tokens"])]  # ids of any model
            raw.append(r["tokens"] / worker.call("decode", depth_ids=ids[:r["prompt_tokens"]],
                                                 gen_ids=ids[r["prompt_tokens"]:])["seconds"])
    except WorkerError as e:
        return Row("gally generate", dtype, setup.weights, threads, Test("tg", n), None, note=str(e).split(": ", 1)[-1])
    runs, raw = runs[1:], raw[1:]
    r = runs[0]
    rates = [x["tokens"] / x["seconds"] for x in runs]
    note = f"{r['tokens']} steps after a {r['prompt_tokens']}-token prompt, greedy, finish: {r['finish_reason']}"
    own = [x["own_decode_tok_s"] for x in runs if x.get("own_decode_tok_s")]
    if own:
        note += f"; generate's own timing: {sum(own) / len(own):.1f} tok/s"
    note += (f"; raw Session.append decode alternated with it: {sum(raw) / len(raw):.1f} tok/s, "
             f"generate / raw {sum(rates) / sum(raw):.3f}")
    return Row("gally generate", dtype, setup.weights, threads, Test("tg", r["tokens"]), Stat.of(rates), note=note)


def _llama_bench_rows(opts, dtype, threads, spec, results, log) -> None:
    log(f"[{dtype} t{threads}] llama-bench")
    try:
        stats, about = llama_bench.run_llama_bench(spec["tool"], spec["gguf"], [p for p in opts.prompts if p],
                                                   [n for n in opts.gens if n], opts.depths, threads, opts.reps,
                                                   spec["kv_type"])
    except (RuntimeError, ValueError, KeyError) as e:
        results.peers["llama-bench"][dtype] = f"failed: {e}"
        return
    results.peers["llama-bench"][dtype] = f"measured ({about})"
    weights = spec["gguf_type"]
    for test in tests_of(opts):
        stat = stats.get((test.kind, test.tokens, test.depth))
        if stat is not None:
            results.rows.append(Row("llama-bench", dtype, weights, threads, test, stat))
