"""The cost of the layers of "Beyond one machine" on one machine: aggregate generated tok/s of

- gally serve alone (all cores), and 1 vs 2 `gally serve` replicas (1 thread each) behind HAProxy
  (deploy/replicas.py), under the same streaming load (`gally bench --serve`'s clients);
- a Ray Data job (examples/ray_batch.py) with 1 vs 2 actors (1 thread each), against one
  `Model.generate` call over the same prompts in this process (all cores).

    python bench/scaleout.py [-m MODEL] [--out bench/results/scaleout-2core.md]

Needs `gally[serve,ray]` and Debian's haproxy. Takes a few minutes on 2 cores. The figures of one
run are comparable with each other only (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_healthy(url: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_load(args, command: list[str], port: int, label: str) -> dict:
    from gally.bench.load import run_load

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        run_load(url, 2, 2, args.prompt, 8, 49152, seed=1)  # warm-up
        r = run_load(url, args.concurrency, args.requests, args.prompt, args.gen, 49152, seed=0)
        r["setup"] = label
        print(f"{label}: {r['aggregate_tok_s']:.1f} tok/s, {r['completed']} ok / {r['failed']} failed", file=sys.stderr)
        return r
    finally:
        stop(proc)


def ray_job(args, prompts_file: str, actors: int) -> dict:
    out = tempfile.mkdtemp(prefix="gally-scaleout-") + "/out"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "ray_batch.py"), prompts_file, out, "--actors", str(actors),
           "--threads", "1", "-n", str(args.gen), "--parallel", "8", "--batch-size", "16"]
    if args.model:
        cmd += ["-m", args.model]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    line = [s for s in p.stderr.splitlines() if "completion tokens in" in s][-1]
    tokens = int(line.split(" completion tokens")[0].split(", ")[-1])
    job_s = float(line.split(" completion tokens in ")[1].split(" s")[0])
    print(f"ray, {actors} actor(s): {line}", file=sys.stderr)
    return {"setup": f"Ray Data, {actors} actor(s) × 1 thread", "tokens": tokens, "job_s": job_s, "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("-p", "--prompt", type=int, default=64, help="prompt tokens per request (default 64)")
    p.add_argument("-n", "--gen", type=int, default=64, help="generated tokens per request (default 64)")
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompts", type=int, default=64, help="prompts of the Ray job (default 64)")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--out", default=None, help="write the markdown here")
    args = p.parse_args(argv)

    import gally
    import gally.bench.machine as machine

    model_args = ["-m", args.model] if args.model else []
    serve = [sys.executable, "-m", "gally", "serve", *model_args, "--parallel", "8", "--port", str(args.port)]
    serve += ["-t", str(os.cpu_count() or 1)]
    rows = [serve_load(args, serve, args.port, "gally serve, 1 process × all threads")]
    for n in (1, 2):
        cmd = [sys.executable, os.path.join(ROOT, "deploy", "replicas.py"), *model_args, "--replicas", str(n),
               "--threads", "1", "--parallel", "8", "--port", str(args.port + 10)]
        rows.append(serve_load(args, cmd, args.port + 10, f"HAProxy + {n} replica(s) × 1 thread"))

    # The Ray job: chat messages (the template applied on the actors), the same chats through
    # Model.generate in this process; greedy, so both make the same tokens
    chats = [[{"role": "user", "content": f"Write a long story number {i} about the sea, the sky and a lighthouse."}]
             for i in range(args.prompts)]
    prompts_file = os.path.join(tempfile.mkdtemp(prefix="gally-scaleout-"), "prompts.jsonl")
    with open(prompts_file, "w") as f:
        for i, chat in enumerate(chats):
            f.write(json.dumps({"id": i, "prompt": chat}) + "\n")
    from gally.generate import render_chat

    model = gally.load(args.model, threads=os.cpu_count() or 1)
    t0 = time.perf_counter()
    done = model.generate([{"prompt": render_chat(model, c)} for c in chats], max_new_tokens=args.gen,
                          temperature=0.0)
    seconds = time.perf_counter() - t0
    tokens = sum(c.usage["completion_tokens"] for c in done)
    print(f"Model.generate: {tokens} tokens in {seconds:.1f} s", file=sys.stderr)
    del model
    jobs = [{"setup": "Model.generate, 1 process × all threads (no Ray)", "tokens": tokens, "job_s": seconds,
             "wall_s": seconds}]
    jobs += [ray_job(args, prompts_file, n) for n in (1, 2)]

    cpu = machine.cpu()
    lines = ["# Beyond one machine, on one machine: replicas and Ray actors", "",
             f"gally {gally.__version__} ({machine.git_commit()}), {cpu.get('model', '?')}, "
             f"kernels {gally.info()['isa']}, {os.cpu_count()} cores. `python bench/scaleout.py"
             + (f" -m {args.model}" if args.model else "") + "`", "",
             f"## Serving: {args.concurrency} streaming clients, {args.requests} requests of {args.prompt} prompt "
             f"tokens and {args.gen} new tokens (ignore_eos)", "",
             "| setup | ok / failed | aggregate tok/s | × one process | TTFT p50 (s) | ITL p50 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    base = rows[0]["aggregate_tok_s"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['completed']} / {r['failed']} | {r['aggregate_tok_s']:.1f} | "
                     f"{r['aggregate_tok_s'] / base:.2f}× | {r['ttft_p50']:.3f} | {r['itl_p50'] * 1e3:.1f} |")
    lines += ["", f"## Batch job: {args.prompts} chats, at most {args.gen} new tokens each (greedy)", "",
              "| setup | completion tokens | job s | tok/s | × Model.generate | process wall s (Ray start included) |",
              "|---|---:|---:|---:|---:|---:|"]
    base = jobs[0]["tokens"] / jobs[0]["job_s"]
    for j in jobs:
        rate = j["tokens"] / j["job_s"]
        lines.append(f"| {j['setup']} | {j['tokens']} | {j['job_s']:.1f} | {rate:.1f} | {rate / base:.2f}× | "
                     f"{j['wall_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
