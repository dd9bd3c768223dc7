"""The cache keeps whole entries only: files made durable before an entry appears, entries with
empty or cut files rebuilt, no temporary file or folder left by a failure or a killed process, a
content hash that a rewrite invalidates, and a lock that is waited for within a bound."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import gally
from conftest import DEFAULT_CONFIG, random_weights
from gally import cache, sources
from gguf_helpers import byte_level_vocab, write_gguf

CFG = {**DEFAULT_CONFIG, "vocab_size": len(byte_level_vocab()["tokens"])}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GALLY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, CFG, random_weights(CFG, seed=11))
    return str(path)


@pytest.mark.parametrize("damage", ["empty config", "cut config", "empty tokenizer", "zeroed tokenizer tail",
                                    "empty weights", "cut weights", "zeroed weights header"])
def test_entry_with_empty_or_cut_files_is_rebuilt(home, tiny_gguf, damage):
    # What a power loss can leave where the data of a renamed file never reached the disk.
    folder = sources.resolve(tiny_gguf)
    want = gally.load(folder).logits([1, 2, 3])
    files = {"config": "config.json", "tokenizer": "tokenizer.json", "weights": "model.safetensors"}
    name = next(file for key, file in files.items() if key in damage)
    path = os.path.join(folder, name)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage.startswith("empty"):
            f.truncate(0)
        elif damage.startswith("cut"):
            f.truncate(size // 2)
        elif damage == "zeroed tokenizer tail":
            f.seek(size - 100)
            f.write(bytes(100))
        else:
            f.write(bytes(64))
    assert not sources._complete(folder)
    assert sources.resolve(tiny_gguf) == folder
    assert (gally.load(folder).logits([1, 2, 3]) == want).all()


def test_entry_files_are_synced_before_the_rename(home, tiny_gguf, monkeypatch):
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folder = sources.resolve(tiny_gguf)
    names = {os.path.basename(p) for p in synced}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "model.safetensors", "models"} <= names
    assert any(os.path.basename(p).startswith("." + os.path.basename(folder) + ".tmp-") for p in synced)


def test_leftovers_of_killed_processes_go_and_a_running_ones_stay(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc"   # a killed `gally convert`
    old = tmp_path / ".out.tmp-xyz"             # named before pids were
    live = tmp_path / f".out.tmp-{os.getppid()}-def"  # a running one
    for d in (stale, old, live):
        d.mkdir()
    with cache.building(str(out)) as tmp:
        (tmp_path / "marker").write_text(os.path.basename(tmp))
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name, "marker"])


def test_failed_memo_write_leaves_no_temporary_file(home, monkeypatch):
    cache.write_memo("hashes.json", {"a": 1})

    def fail(*args):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", fail)
    cache.write_memo("hashes.json", {"a": 2})
    cache.write_memo("hashes.json", {"a": {1, 2}})  # not JSON
    assert sorted(os.listdir(home)) == ["hashes.json"]
    assert cache.read_memo("hashes.json") == {"a": 1}


def test_hash_memo_sees_a_rewrite_that_keeps_size_and_mtime(home, tmp_path):
    path = tmp_path / "f.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    first = sources.file_sha256(str(path))
    st = os.stat(path)
    time.sleep(0.01)
    path.write_bytes(b"GGUF" + bytes(99) + b"\1")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a copy tool that keeps times would
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert sources.file_sha256(str(path)) != first


def test_lock_wait_is_bounded_and_names_the_holder(home):
    with cache.locked("entry"):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"locks/entry.lock: waited 0.3 s for another gally process "
                                               rf"\(pid {os.getpid()}\) building entry"):
            with cache.locked("entry", timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - t0 < 2
    with cache.locked("entry", timeout=0.3):  # free again
        pass


def test_lock_timeout_from_the_environment(home, monkeypatch):
    monkeypatch.setenv("GALLY_LOCK_TIMEOUT", "0.2")
    with cache.locked("e"):
        with pytest.raises(TimeoutError, match="waited 0.2 s"):
            with cache.locked("e"):
                pass
    monkeypatch.setenv("GALLY_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GALLY_LOCK_TIMEOUT must be a number of seconds, got 'soon'"):
        with cache.locked("e"):
            pass
