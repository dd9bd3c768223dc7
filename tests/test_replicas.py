"""deploy/: `gally serve` replicas behind Debian's HAProxy, started by deploy/replicas.py as a user
would, on loopback. Under a load of streaming clients (the official openai client) one replica is
killed: streams it was sending end with an error their client sees, requests that had not started
are served by the other replica, the balancer takes the dead one out within its health-check
interval, and the replica the launcher restarts rejoins. SIGTERM then drains what runs."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from generation_helpers import make_text_checkpoint

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
CHECK_INTERVAL = 0.5  # seconds between health checks; two failures take a replica out
CLIENTS = 6           # against 2 replicas × 2 slots: two requests wait in HAProxy's queue
TOKENS = 160          # per request: a stream lasts a quarter of a second here
LONG = 4000           # per request of clients 0 and 1: the streams the kill is timed to cut
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


def free_ports(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    for _ in range(100):
        base = random.randrange(20000, 60000 - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def haproxy_stats(path: str) -> dict[str, dict]:
    """HAProxy's `show stat` over its admin socket: server (or BACKEND) name → its row."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {row["svname"]: row for row in rows if row["pxname"] == "replicas"}


class Launcher:
    """deploy/replicas.py in a process of its own; its log lines are kept with their times."""

    def __init__(self, folder, run_dir, replicas=2, parallel=2):
        self.port = free_ports(replicas + 1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = str(run_dir)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(DEPLOY, "replicas.py"), "-m", str(folder), "--replicas", str(replicas),
             "--port", str(self.port), "--threads", "1", "--parallel", str(parallel), "--check-interval",
             str(CHECK_INTERVAL), "--restart-delay", "0.5", "--run-dir", self.run_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("deploy/replicas.py did not become ready:\n" + self.log())

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))
            if "gally replicas: ready:" in line:
                self.ready.set()

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def state(self) -> dict:
        with open(os.path.join(self.run_dir, "replicas.json")) as f:
            return json.load(f)

    def pid(self, name: str) -> int:
        return next(r["pid"] for r in self.state()["replicas"] if r["name"] == name)

    def stats(self) -> dict[str, dict]:
        return haproxy_stats(os.path.join(self.run_dir, "haproxy.sock"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


class Load:
    """Streaming clients, each sending one request after another until stopped (at most 200 each),
    recording for each request when it was sent, which replica answered (HAProxy's X-Gally-Replica
    header), when its headers and its end came, and the error its client raised, if any."""

    def __init__(self, url: str, clients: int):
        self.url = url
        self.records: list[dict] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int):
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=20)
        for n in range(200):
            if self.stopped.is_set():
                return
            record = {"client": i, "sent": time.monotonic(), "replica": None, "headers": None, "end": None,
                      "max_tokens": LONG if i < 2 else TOKENS, "tokens": 0, "finish_reason": None, "error": None}
            self.records.append(record)
            try:
                stream = client.completions.create(model="", prompt=f"Hello world {i} {n}",
                                                   max_tokens=record["max_tokens"],
                                                   temperature=0, stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True})
                record["headers"] = time.monotonic()
                record["replica"] = stream.response.headers.get("x-gally-replica")
                for chunk in stream:
                    if chunk.choices:
                        record["finish_reason"] = chunk.choices[0].finish_reason or record["finish_reason"]
                        record["chunks"] = record.get("chunks", 0) + 1
                    if chunk.usage is not None:
                        record["tokens"] = chunk.usage.completion_tokens
            except Exception as e:  # what the client sees is what is recorded
                record["error"] = f"{type(e).__name__}: {e}"
            record["end"] = time.monotonic()

    def stop(self):
        self.stopped.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a client hung"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if HAPROXY is None:
        pytest.fail("haproxy is missing: install Debian's haproxy (.ci/run does)")
    return make_text_checkpoint(tmp_path_factory.mktemp("replicas"), num_hidden_layers=4, hidden_size=256,
                                intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=LONG + 96)


def test_a_replica_killed_under_load(folder, tmp_path):
    launcher = Launcher(folder, tmp_path / "run")
    load = None
    try:
        assert httpx.get(launcher.url + "/health").status_code == 200
        stats = launcher.stats()
        assert stats["r1"]["status"].startswith("UP") and stats["r2"]["status"].startswith("UP")
        load = Load(launcher.url, CLIENTS)

        # The kill comes while r1 streams a long request sent less than a second before: r1 takes five
        # seconds for its tokens here, so it cannot have sent them all. (A short stream's last bytes
        # can all have left r1 before the kill while a loaded client still reads them; then it ends whole.)
        def streaming_on_r1():
            done = {r["replica"] for r in load.records if r["end"] is not None and r["error"] is None}
            now = time.monotonic()
            running = [r for r in load.records if r["replica"] == "r1" and r["end"] is None
                       and r["max_tokens"] == LONG and now - r["sent"] < 1.0]
            return done >= {"r1", "r2"} and running

        wait_for(streaming_on_r1, 90, "both replicas to serve and a long stream to start on r1")
        old_pid = launcher.pid("r1")
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()

        wait_for(lambda: launcher.stats()["r1"]["status"].startswith("DOWN"), 10, "HAProxy to take r1 out")
        down = time.monotonic()
        wait_for(lambda: launcher.pid("r1") != old_pid, 30, "the launcher to restart r1")
        wait_for(lambda: launcher.stats()["r1"]["status"] == "UP", 90, "r1 to rejoin")
        up = time.monotonic()
        wait_for(lambda: any(r["replica"] == "r1" and r["sent"] > up and r["error"] is None and r["end"]
                             for r in load.records), 30, "a request served by the restarted r1")
        load.stop()
        stats = launcher.stats()

        # With no traffic to notice, the health checks alone take a dead replica out.
        old_pid = launcher.pid("r2")
        os.kill(old_pid, signal.SIGKILL)
        quiet_kill = time.monotonic()
        seen = []  # (seconds since the kill, r2's status, its pid) at each poll

        def r2_down():
            seen.append((round(time.monotonic() - quiet_kill, 2), launcher.stats()["r2"]["status"], launcher.pid("r2")))
            return seen[-1][1].startswith("DOWN")

        try:
            wait_for(r2_down, 10, "the checks to take r2 out")
        except AssertionError as e:  # did r2 stay UP (the kill missed), or come back before two failed checks?
            changes = [s for i, s in enumerate(seen) if i == 0 or s[1:] != seen[i - 1][1:]]
            raise AssertionError(f"{e}; pid {old_pid} killed; (s, status, pid) where they changed: {changes}\n"
                                 f"{launcher.log()[-3000:]}") from None
        quiet_down = time.monotonic()
        wait_for(lambda: launcher.pid("r2") != old_pid and launcher.stats()["r2"]["status"] == "UP", 90,
                 "r2 to rejoin")

        # SIGTERM: HAProxy stops listening and the replicas drain; a stream that runs ends whole.
        client = openai.OpenAI(base_url=launcher.url + "/v1", api_key="none", max_retries=0, timeout=20)
        chunks = iter(client.completions.create(model="", prompt="Once", max_tokens=TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        next(chunks)
        pids = [launcher.state()["haproxy_pid"]] + [r["pid"] for r in launcher.state()["replicas"]]
        launcher.proc.send_signal(signal.SIGTERM)
        assert list(chunks)[-1].usage.completion_tokens == TOKENS
        code = launcher.proc.wait(90)
    finally:
        if load is not None:
            load.stop()
        launcher.stop()
    assert code == 0, launcher.log()
    for pid in pids:  # the launcher waited for each: none is left, not even as a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    records = load.records
    # r1's header before it rejoined: the first r1 answered (the client may note its headers a moment
    # after the kill, while their bytes came before it)
    # (and not whole: a stream whose last bytes left r1 just before the kill may be noted as ended a
    # moment after it)
    whole = [r for r in records if r["error"] is None and r["finish_reason"] == "length"
             and r["tokens"] == r["max_tokens"]]
    cut = [r for r in records if r["replica"] == "r1" and r["headers"] < up and r["end"] > killed
           and not any(r is w for w in whole)]
    failed = [r for r in records if r["error"] is not None]
    completed = [r for r in records if r["error"] is None]
    retried = int(stats["BACKEND"]["wretr"]) + int(stats["BACKEND"]["wredis"])
    print(f"\n{len(records)} requests: {len(completed)} completed, {len(failed)} failed (streams cut by the kill), "
          f"{retried} retries at the balancer ({stats['BACKEND']['wretr']} retried, {stats['BACKEND']['wredis']} "
          f"redispatched); r1 taken out {down - killed:.2f} s after the kill, back {up - killed:.1f} s after it; "
          f"without traffic, r2 taken out {quiet_down - quiet_kill:.2f} s after its kill")

    # The streams r1 was sending when it died, and only they, failed: with an error their client
    # raised within a second or two, not a hang until a timeout, and not a silent short ending.
    # A request r1 had taken when it died may also fail before its client read a byte of the answer,
    # at once too: as HAProxy's 502 when r1 had not answered, or as a reset connection when the
    # client had not yet read the headers r1 sent (a reset drops what the client's socket held).
    unanswered = [r for r in failed if r["headers"] is None and r["sent"] < killed
                  and ("502" in r["error"] or "APIConnectionError" in r["error"])]
    def shown(rs):  # a line a request, times from the kill
        return "".join("\n  " + " ".join(f"{k}={v - killed if k in ('sent', 'headers', 'end') and v else v}"
                                         for k, v in r.items()) for r in rs)

    assert (cut or unanswered) and sorted(map(id, failed)) == sorted(map(id, cut + unanswered)), \
        f"failed:{shown(failed)}\ncut:{shown(cut)}"
    assert all(r["end"] - killed < 5 for r in unanswered)
    assert all(r["end"] - killed < 5 and "Timeout" not in r["error"] for r in cut), [r["error"] for r in cut]
    # Every other request — those queued at the balancer, those sent after the kill — completed whole.
    assert all(r["finish_reason"] == "length" and r["tokens"] == r["max_tokens"] for r in completed)
    assert all(r["replica"] == "r2" for r in completed if killed < r["headers"] < up)
    assert down - killed <= 2 * CHECK_INTERVAL + 1.5  # two failed checks, or the first refused request
    assert quiet_down - quiet_kill <= 2 * CHECK_INTERVAL + 1.5


def test_the_config_in_deploy_is_what_the_launcher_writes():
    shown = subprocess.run([sys.executable, os.path.join(DEPLOY, "replicas.py"), "--print-config"],
                           capture_output=True, text=True, check=True).stdout
    with open(os.path.join(DEPLOY, "haproxy.cfg")) as f:
        assert f.read() == shown
    checked = subprocess.run([HAPROXY, "-c", "-f", os.path.join(DEPLOY, "haproxy.cfg")], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stderr
    assert "server r2 127.0.0.1:8002" in shown and "bind 127.0.0.1:8000" in shown


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "--replicas must be a positive integer, got 0"),
    (["--port", "8001", "--first-port", "8000"], "--port 8001 is one of the replicas' ports (8000-8001)"),
    (["--first-port", "65535"], "--first-port 65535: 2 replicas run past port 65535"),
    (["--check-interval", "0"], "--check-interval must be between 0.1 and 60 seconds, got 0.0"),
])
def test_bad_arguments_are_named(args, message):
    p = subprocess.run([sys.executable, os.path.join(DEPLOY, "replicas.py"), *args], capture_output=True, text=True)
    assert p.returncode == 2 and message in p.stderr


def test_a_missing_haproxy_or_a_model_that_fails_to_load_ends_the_launcher(tmp_path, folder):
    launcher = [sys.executable, os.path.join(DEPLOY, "replicas.py"), "--port", str(free_ports(3)),
                "--run-dir", str(tmp_path / "run")]
    p = subprocess.run(launcher + ["-m", str(folder), "--haproxy", "no-such-haproxy"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "no-such-haproxy: not found; install Debian's haproxy" in p.stderr
    p = subprocess.run(launcher + ["-m", str(tmp_path / "no-model")], capture_output=True, text=True, timeout=120)
    # both replicas fail; whichever the launcher sees end first is the one it names
    assert p.returncode == 1 and re.search(r"replica r[12] exited with code 1 while loading", p.stderr), p.stderr
