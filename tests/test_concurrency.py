"""Sessions and threads: each session changes in one thread at a time, a running forward pass sees
the token ids it was given, sessions of one model run side by side with the serial results, and
thread counts are bounded and checked before OpenMP could end the process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gally
from conftest import make_checkpoint

LONG = 2048  # tokens of a forward pass that takes tens of milliseconds on the small model: 4 chunks of 512


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("concurrency"), max_position_embeddings=4096)[0]


def _while_running(session, ids, action):
    """Runs session.forward(ids, all_logits=True) in this thread, and in another one `action`
    once the forward pass is seen running, in C++ with the GIL released: truncate(0), a no-op on
    the empty session before then, is refused while it runs. The GIL passes between the threads
    only where they let it go (a long switch interval), so `action` runs before the pass can end.
    Returns (logits, action's result)."""
    finished, result = threading.Event(), {}

    def other():
        while not finished.is_set():
            try:
                session.truncate(0)
            except RuntimeError:
                result["value"] = action()
                return
            time.sleep(0.0002)
        result["value"] = "the forward pass was never seen running"

    t = threading.Thread(target=other)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        t.start()
        logits = session.forward(ids, all_logits=True)
        finished.set()
    finally:
        sys.setswitchinterval(interval)
        finished.set()
        t.join()
    return logits, result.get("value")


def test_token_ids_changed_during_a_forward_pass_are_not_read(folder):
    # The caller's int32 array would otherwise be read chunk by chunk after the ids were checked:
    # changed to out-of-vocabulary ids in between, the embedding lookup would read outside the mapping.
    model = gally.load(folder, threads=1, max_context=LONG)
    original = np.random.default_rng(0).integers(0, 97, LONG).astype(np.int32)
    want = model.logits(original)
    ids = original.copy()

    def overwrite():
        ids[:] = (original + 1) % 97
        return True

    got, done = _while_running(model.session(), ids, overwrite)
    assert done is True and not np.array_equal(ids, original)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("change", ["truncate", "reset", "append", "forward"])
def test_a_running_session_refuses_other_threads(folder, change):
    model = gally.load(folder, threads=1, max_context=LONG + 1)
    s = model.session()
    calls = {"truncate": lambda: s.truncate(0), "reset": s.reset, "append": lambda: s.append([1]),
             "forward": lambda: s.forward([1, 2], all_logits=True)}

    def other_thread():
        try:
            calls[change]()
        except RuntimeError as e:
            return str(e), s.position  # position waits for the running pass to end
        return "not refused", s.position

    ids = np.random.default_rng(1).integers(0, 97, LONG)
    _, (message, position) = _while_running(s, ids, other_thread)
    assert message == "this session is already running in another thread; use one session per thread"
    assert position == LONG and s.position == LONG


def test_position_is_read_between_forward_passes(folder):
    model = gally.load(folder, threads=1, max_context=LONG)
    s = model.session()
    seen, finished = [], threading.Event()

    def watch():
        while not finished.is_set():
            seen.append(s.position)
            time.sleep(0.0005)

    t = threading.Thread(target=watch)
    t.start()
    s.forward(np.arange(LONG) % 97, all_logits=True)
    finished.set()
    t.join()
    assert seen and set(seen) <= {0, LONG}
    assert s.position == LONG


def test_four_threads_with_own_sessions_give_the_serial_logits(folder):
    # GALLY_TEST_THREADS=1 under ThreadSanitizer (.ci/sanitize), which cannot see libgomp's barriers
    model = gally.load(folder, threads=int(os.environ.get("GALLY_TEST_THREADS", "2")))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 97, 40 + 7 * i).tolist() for i in range(4)]

    def work(prompt):
        s = model.session()
        out = [s.append(prompt[:30])]
        out += [s.append([t]) for t in prompt[30:]]
        s.truncate(10)
        out.append(s.append(prompt[10:33]))
        return np.stack(out)

    serial = [work(p) for p in prompts]
    for _ in range(3):
        results = [None] * 4

        def run(i, results=results):
            results[i] = work(prompts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, want in zip(results, serial):
            assert np.array_equal(got, want)


@pytest.mark.parametrize("threads", [gally.model.MAX_THREADS + 1, 100_000])
def test_thread_count_is_bounded(folder, threads):
    with pytest.raises(ValueError, match=f"threads must be at most {gally.model.MAX_THREADS}, got {threads}"):
        gally.load(folder, threads=threads)


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""), reason="AddressSanitizer reserves more "
                    "address space than the limit this test sets")
def test_threads_that_cannot_start_raise_instead_of_ending_the_process(folder):
    # Under an address-space limit that leaves room for a few 8 MiB thread stacks, libgomp would print
    # "Thread creation failed" and exit at the first forward pass.
    code = f"""
import resource, gally
folder = {folder!r}
gally.load(folder, threads=1).logits([1, 2])  # everything imported and mapped first
with open("/proc/self/status") as f:
    vm = int(f.read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
try:
    gally.load(folder, threads=200).logits([1, 2])
    print("no error")
except ValueError as e:
    print("ValueError:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"ValueError: {folder}: threads=200: only "), r.stdout
    assert "threads could be started" in r.stdout and "pass fewer threads" in r.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP comes with the compiler (libgomp) on Linux "
                    "only; elsewhere a build may lack it")
def test_the_build_runs_threads():
    # The tests that compare one thread with several (here, test_model, test_quantized_model) would
    # compare one thread with itself in a build without OpenMP.
    assert gally.info()["openmp"] is True
