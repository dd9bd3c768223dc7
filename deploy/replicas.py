#!/usr/bin/env python3
"""N `gally serve` replicas behind HAProxy on one machine, without containers or compose: starts the
replicas on loopback ports, writes the balancer's configuration, starts Debian's haproxy in front of
them, restarts a replica that dies, and stops everything on Ctrl-C or SIGTERM, letting running
requests finish. Standard library only; see deploy/README.md.

    apt-get install haproxy && pip install 'gally[serve]'
    python deploy/replicas.py -m smollm2-135m-instruct --replicas 2 --threads 1 --parallel 4 --port 8000
    python deploy/replicas.py --print-config --replicas 2 > haproxy.cfg     # the configuration alone

Clients use http://127.0.0.1:8000/v1 as they would one server. The replicas listen on 127.0.0.1 at
--first-port, --first-port + 1, ... (default: --port + 1). The run folder (--run-dir) holds
haproxy.cfg, HAProxy's admin socket (haproxy.sock: `echo "show stat" | socat - haproxy.sock`) and
replicas.json, the process ids and ports, rewritten whenever a replica (re)starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# HAProxy's view of the replicas. Why each line:
# - balance leastconn: a request goes to the replica with the fewest in flight; generation times vary
#   too much for round robin.
# - maxconn = --parallel per replica: a replica only ever holds what it decodes at once; the rest wait
#   in HAProxy's queue, from which they go to whichever replica frees a slot first — and to the other
#   replicas when one dies, since nothing of theirs had started.
# - option httpchk on /health (200 when the model is loaded, 503 while it loads or drains), every
#   `inter`, `fall` failures to take a replica out, `rise` successes to take it back; observe layer4
#   takes it out at once when a real request cannot connect.
# - retries with redispatch 1 on conn-failure, empty-response and 503: the failures where the replica
#   produced nothing (refused the connection, died before answering, was loading, draining or full),
#   so that sending the request again, to another replica, cannot repeat anything the client saw.
#   A stream that has begun is never retried: its client sees the connection cut.
# - option http-server-close: each request opens its own connection to a replica. A connection kept
#   from an earlier request can die with its replica between two requests, and a request HAProxy
#   writes onto it in that instant can fail without a retry: HAProxy then closes the client's
#   kept-alive connection without an answer, as for a keep-alive race of its own. A fresh connection
#   to a dead replica is refused (retried as conn-failure), or reset or closed before any answer
#   (retried as empty-response: tried with fake replicas on Debian's 2.6.12; HAProxy 2.6.0 did not
#   retry a reset, haproxy#2061). A loopback connect costs tens of microseconds against the hundreds
#   of milliseconds of a completion.
# - timeout server/client: the longest silence within a stream (a long prompt's prefill), not a
#   request's length. timeout check: a replica whose /health takes longer (a busy machine) counts a
#   failed check; a dead one refuses the connection at once.
CONFIG = """\
# gally serve replicas behind HAProxy 2.6 (Debian bookworm): written by deploy/replicas.py
global
    maxconn 4096
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout check 2s
    timeout client 5m
    timeout server 5m
    timeout queue 2m
    timeout http-request 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503
    option http-server-close

frontend gally
    bind {host}:{port}
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
    http-response set-header X-Gally-Replica %[srv_name]
    default-server {server_defaults}
{servers}"""


def render(replicas: int, port: int, first_port: int, parallel: int, inter_s: float, socket: str,
           host: str = "127.0.0.1") -> str:
    server_defaults = (f"check inter {round(inter_s * 1000)}ms fall 2 rise 2 maxconn {parallel} "
                       "observe layer4 error-limit 1 on-error mark-down")
    servers = "".join(f"    server r{i + 1} 127.0.0.1:{first_port + i}\n" for i in range(replicas))
    return CONFIG.format(socket=socket, host=host, port=port, server_defaults=server_defaults, servers=servers)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="model folder, .gguf file or alias (gally serve -m)")
    p.add_argument("--replicas", type=int, default=2, help="gally serve processes (default 2)")
    p.add_argument("--host", default="127.0.0.1", help="the balancer's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the balancer's port (default 8000)")
    p.add_argument("--first-port", type=int, default=None, help="the first replica's port (default: --port + 1)")
    p.add_argument("-t", "--threads", type=int, default=1, help="threads per replica (default 1)")
    p.add_argument("--parallel", type=int, default=4, help="requests a replica decodes together (default 4)")
    p.add_argument("--check-interval", type=float, default=1.0,
                   help="seconds between health checks of a replica (default 1); two failures take it out")
    p.add_argument("--restart-delay", type=float, default=1.0,
                   help="seconds before a replica that died is started again (default 1; doubled while it keeps "
                        "dying within 30 s of its start, up to 60)")
    p.add_argument("--run-dir", default=None, help="folder for haproxy.cfg, haproxy.sock and replicas.json "
                                                   "(default: /tmp/gally-replicas-PORT)")
    p.add_argument("--haproxy", default="haproxy", help="the haproxy program (default: haproxy on PATH)")
    p.add_argument("--print-config", action="store_true", help="print HAProxy's configuration and exit")
    p.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="after --: more gally serve options for every replica (e.g. -- --dtype bf16 --api-key K)")
    args = p.parse_args(argv)
    args.serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    for name in ("replicas", "port", "threads", "parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.first_port is None:
        args.first_port = args.port + 1
    if args.first_port <= args.port < args.first_port + args.replicas:
        p.error(f"--port {args.port} is one of the replicas' ports ({args.first_port}-"
                f"{args.first_port + args.replicas - 1})")
    if args.first_port + args.replicas - 1 > 65535:
        p.error(f"--first-port {args.first_port}: {args.replicas} replicas run past port 65535")
    if not 0.1 <= args.check_interval <= 60:
        p.error(f"--check-interval must be between 0.1 and 60 seconds, got {args.check_interval}")
    if args.restart_delay < 0:
        p.error(f"--restart-delay must be >= 0, got {args.restart_delay}")
    args.run_dir = args.run_dir or os.path.join(tempfile.gettempdir(), f"gally-replicas-{args.port}")
    return args


def log(message: str) -> None:
    print(f"gally replicas: {message}", file=sys.stderr, flush=True)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def child(command: list[str]) -> subprocess.Popen:
    """A process of its own group, so that Ctrl-C reaches the launcher alone (which then stops the
    children gracefully), and which Linux ends with SIGTERM if the launcher dies without doing so."""
    def die_with_parent():
        if sys.platform == "linux":
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)


class Replica:
    def __init__(self, name: str, port: int, command: list[str]):
        self.name, self.port, self.command = name, port, command
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.died: float | None = None  # when it was found dead, until it is started again
        self.backoff = 0.0  # seconds from its death to its next start

    def start(self) -> None:
        self.proc = child(self.command)
        self.started = time.monotonic()
        log(f"replica {self.name} pid {self.proc.pid} on {self.url}")


class Deployment:
    def __init__(self, args):
        self.args = args
        self.stopping = False
        os.makedirs(args.run_dir, exist_ok=True)
        self.config = os.path.join(args.run_dir, "haproxy.cfg")
        self.socket = os.path.join(args.run_dir, "haproxy.sock")
        self.state = os.path.join(args.run_dir, "replicas.json")
        serve = [sys.executable, "-m", "gally", "serve", "--host", "127.0.0.1", "-t", str(args.threads),
                 "--parallel", str(args.parallel), *(["-m", args.model] if args.model else []), *args.serve_args]
        self.replicas = [Replica(f"r{i + 1}", args.first_port + i, serve + ["--port", str(args.first_port + i)])
                         for i in range(args.replicas)]
        self.haproxy: subprocess.Popen | None = None

    def write_state(self) -> None:
        state = {"balancer": f"http://{self.args.host}:{self.args.port}", "socket": self.socket,
                 "haproxy_pid": self.haproxy.pid if self.haproxy else None,
                 "replicas": [{"name": r.name, "port": r.port, "pid": r.proc.pid if r.proc else None}
                              for r in self.replicas]}
        with open(self.state + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(self.state + ".tmp", self.state)  # readers never see half a file

    def start(self) -> None:
        # Debian puts it in /usr/sbin, which a user's PATH may lack
        haproxy = shutil.which(self.args.haproxy) or shutil.which(self.args.haproxy, path="/usr/sbin:/sbin")
        if haproxy is None:
            raise RuntimeError(f"{self.args.haproxy}: not found; install Debian's haproxy (apt-get install haproxy)")
        with open(self.config, "w") as f:
            f.write(render(self.args.replicas, self.args.port, self.args.first_port, self.args.parallel,
                           self.args.check_interval, self.socket, self.args.host))
        check = subprocess.run([haproxy, "-c", "-q", "-f", self.config], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"{self.config}: haproxy refused it: {check.stderr.strip() or check.stdout.strip()}")
        for r in self.replicas:
            r.start()
        self.write_state()
        # The balancer starts once every replica answers, so that its first checks find them up.
        while not all(healthy(r.url) for r in self.replicas):
            for r in self.replicas:
                if r.proc.poll() is not None:
                    raise RuntimeError(f"replica {r.name} exited with code {r.proc.returncode} while loading")
            if self.stopping:
                return
            time.sleep(0.2)
        self.haproxy = child([haproxy, "-db", "-f", self.config])
        self.write_state()
        balancer = f"http://{self.args.host}:{self.args.port}"
        while not healthy(balancer):
            if self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited with code {self.haproxy.returncode}")
            time.sleep(0.1)
        log(f"ready: {len(self.replicas)} replicas behind {balancer}/v1 (haproxy pid {self.haproxy.pid}, "
            f"run folder {self.args.run_dir})")

    def supervise(self) -> int:
        """Restarts replicas that die until asked to stop; returns when haproxy itself ends."""
        while not self.stopping:
            if self.haproxy.poll() is not None:
                log(f"haproxy exited with code {self.haproxy.returncode}")
                return 1
            for r in self.replicas:
                if r.proc.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                if r.died is None:
                    quick = now - r.started < 30  # dying again soon after its start: back off
                    r.backoff = min(60.0, max(self.args.restart_delay, 2 * r.backoff)) if quick \
                        else self.args.restart_delay
                    r.died = now
                    log(f"replica {r.name} (pid {r.proc.pid}) exited with code {r.proc.returncode}; "
                        f"restarting in {r.backoff:g} s")
                if now - r.died >= r.backoff:
                    r.died = None
                    r.start()
                    self.write_state()
            time.sleep(0.1)
        return 0

    def stop(self) -> None:
        """Stops taking requests, lets the running ones finish (gally serve drains on SIGTERM, HAProxy's
        soft stop on SIGUSR1 waits for its open streams), then ends what is left."""
        self.stopping = True
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGUSR1)
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 70  # gally serve drains for up to 60 s
        for proc in [r.proc for r in self.replicas] + [self.haproxy]:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log("stopped")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_config:
        sys.stdout.write(render(args.replicas, args.port, args.first_port, args.parallel, args.check_interval,
                                os.path.join(args.run_dir, "haproxy.sock"), args.host))
        return 0
    deployment = Deployment(args)

    def stop(signum, frame):
        deployment.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        deployment.start()
        return deployment.supervise()
    finally:
        deployment.stop()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        log(f"error: {e}")
        sys.exit(1)
