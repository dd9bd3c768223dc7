"""gally's cache folder (GALLY_HOME, default ~/.cache/gally) and the two rules that keep it whole:
an entry appears only by renaming a finished temporary folder onto its name, and one process at a
time builds a given entry (a lock file), so that concurrent loads neither clash nor half-write.

    GALLY_HOME/models/<name>/       converted checkpoints (Hugging Face folders)
    GALLY_HOME/gguf/<file>.gguf     GGUF files fetched for aliases
    GALLY_HOME/bench/<name>/        models the benchmark derives (peers' files, gally's int8/int4)
    GALLY_HOME/locks/<name>.lock    held while an entry is being built (holds the builder's pid)

A temporary folder is named .<entry>.tmp-<pid>-<random>, so that a later build can tell one a
killed process left (removed) from one a running process is filling (kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import time
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic rename still keeps entries whole
    fcntl = None


def home() -> str:
    root = os.environ.get("GALLY_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "gally")
    return os.path.abspath(root)


def folder(*parts: str) -> str:
    """A folder under GALLY_HOME, created if needed; says so clearly when that is impossible."""
    path = os.path.join(home(), *parts)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the cache folder {path} ({e.strerror}); "
                               f"set GALLY_HOME to a writable folder") from None
    return path


def read_memo(name: str) -> dict:
    """GALLY_HOME/<name>: a JSON object that remembers work per file (path → stamp and result);
    {} when it is missing or unreadable, which only costs doing the work again."""
    try:
        with open(os.path.join(home(), name), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_memo(name: str, memo: dict, keep: int = 256) -> None:
    """Replaces GALLY_HOME/<name> whole (a concurrent reader sees the old or the new), keeping the
    `keep` most recent entries; a read-only GALLY_HOME is no error, and a failed write leaves no
    temporary file."""
    if len(memo) > keep:
        memo = dict(list(memo.items())[-keep:])
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder())
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, os.path.join(home(), name))
    except (OSError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            os.remove(tmp)


# How long locked() waits for another process building the same entry (GALLY_LOCK_TIMEOUT
# overrides): longer than converting a large GGUF file takes.
LOCK_TIMEOUT_S = 1800.0


@contextlib.contextmanager
def locked(name: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Holds GALLY_HOME/locks/<name>.lock exclusively, waiting up to `timeout` seconds (default
    GALLY_LOCK_TIMEOUT, else LOCK_TIMEOUT_S) for another process holding it; then raises
    TimeoutError (an OSError) naming the lock and its holder."""
    path = os.path.join(folder("locks"), name + ".lock")
    if timeout is None:
        try:
            timeout = float(os.environ.get("GALLY_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
        except ValueError:
            raise ValueError(f"GALLY_LOCK_TIMEOUT must be a number of seconds, got "
                             f"{os.environ['GALLY_LOCK_TIMEOUT']!r}") from None
    with open(path, "a+") as f:
        if fcntl is not None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        f.seek(0)
                        holder = f.read().strip() or "unknown"
                        raise TimeoutError(errno.ETIMEDOUT, f"{path}: waited {timeout:g} s for another gally process "
                                                            f"(pid {holder}) building {name}; wait for it to finish, "
                                                            f"or end it and try again (GALLY_LOCK_TIMEOUT sets the "
                                                            f"wait)") from None
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def temp_prefix(final: str) -> str:
    return "." + os.path.basename(final) + ".tmp-"


@contextlib.contextmanager
def building(final: str, kind: str = "folder") -> Iterator[str]:
    """Yields a new temporary folder (or file path, kind="file") beside `final`; when the block
    finishes, makes its files durable (fsync) and renames it onto `final`; when it raises (or is
    interrupted), deletes it. Temporary folders that killed processes left beside `final` go first."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    remove_stale(final)
    tmp = tempfile.mkdtemp(prefix=f"{temp_prefix(final)}{os.getpid()}-", dir=parent)
    target = tmp if kind == "folder" else os.path.join(tmp, os.path.basename(final))
    try:
        yield target
        _usual_permissions(target)
        _sync(target)
        os.rename(target, final)
        _sync(parent)  # the rename itself
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"the disk holding {parent} is full ({e.strerror}) while writing "
                                   f"{os.path.basename(final)}; nothing was kept. Free some space, or write to "
                                   f"another disk (for the model cache: set GALLY_HOME)") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sync(path: str) -> None:
    """fsync of a file, or of a folder's files and then the folder (its entries), so that after a
    power loss an entry renamed into place holds its whole contents, not empty files."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            if os.path.isfile(os.path.join(path, name)):
                _sync(os.path.join(path, name))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EROFS):  # filesystems that cannot sync folders
            raise
    finally:
        os.close(fd)


def _usual_permissions(path: str) -> None:
    """mkdtemp and some writers make owner-only entries; give them the modes of a plain mkdir/open."""
    mask = os.umask(0)
    os.umask(mask)
    entries = [path] + ([os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [])
    for entry in entries:
        os.chmod(entry, (0o777 if os.path.isdir(entry) else 0o666) & ~mask)


def remove_stale(final: str) -> None:
    """Deletes the temporary folders beside `final` that processes no longer running left (a
    kill during a conversion); a live process's folder (its pid is in the name) stays."""
    parent, prefix = os.path.dirname(os.path.abspath(final)), temp_prefix(final)
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith(prefix) and not _running(name[len(prefix):].split("-", 1)[0]):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _running(pid: str) -> bool:
    if not pid.isdigit() or int(pid) == 0:
        return False
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def check_free_space(path: str, needed: int, what: str) -> None:
    """Raises before a long write when the disk holding `path` has less than `needed` bytes free."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return
    if free < needed:
        raise OSError(errno.ENOSPC, f"{what} needs about {needed / 1e6:.0f} MB but the disk holding {path} has "
                                    f"{free / 1e6:.0f} MB free; free some space, or write to another disk "
                                    f"(for the model cache: set GALLY_HOME)")


# ---- what the cache holds: `gally cache` lists entries and removes them ----

# The folders of GALLY_HOME that hold entries, and what each entry is.
KINDS = {"models": "model", "gguf": "gguf", "bench": "bench"}
_DTYPE_SUFFIX = re.compile(r"-(f32|bf16|f16|int8|int4)(-q\d+)?(-ends\d+)?(-calibrated)?$")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str        # the file or folder name, what `gally cache rm` takes
    kind: str        # "model" (a converted or quantized checkpoint), "gguf" (a fetched file), "bench"
    dtype: str       # of a model entry's weights; "" where it has none
    size: int        # bytes
    last_used: float  # seconds since the epoch: the entry's mtime, which loading it renews
    path: str


def entries() -> list[Entry]:
    """Every entry of the cache, by kind and name; temporary folders of builds are not entries."""
    found = []
    for sub, kind in KINDS.items():
        parent = os.path.join(home(), sub)
        if not os.path.isdir(parent):
            continue
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            if name.startswith(".") or os.path.islink(path):
                continue
            match = _DTYPE_SUFFIX.search(name) if kind == "model" else None
            try:
                found.append(Entry(name, kind, match.group(1) if match else "", _size(path),
                                   os.stat(path).st_mtime, path))
            except OSError:  # removed meanwhile
                continue
    return found


def human_bytes(n: float) -> str:
    """999 B, 505.1 kB, 96.7 MB, 2.2 GB (decimal units, as disks are sold and `du --si` shows)."""
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    total = 0
    for parent, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, f)).st_size
    return total


def find(patterns: list[str]) -> list[Entry]:
    """The entries that names or shell patterns (`*-f16`) select, each once. A name that is a path
    must be an entry of this GALLY_HOME. Raises ValueError for one that selects nothing."""
    import fnmatch

    every = entries()
    chosen: dict[str, Entry] = {}
    for pattern in patterns:
        if os.sep in pattern or (os.altsep and os.altsep in pattern):
            real = os.path.realpath(pattern)
            hits = [e for e in every if os.path.realpath(e.path) == real]
            if not hits:
                raise ValueError(f"{pattern} is not an entry of the cache {home()} (GALLY_HOME); `gally cache rm` "
                                 f"removes only what `gally cache` lists")
        else:
            hits = [e for e in every if fnmatch.fnmatchcase(e.name, pattern)]
            if not hits:
                known = ", ".join(e.name for e in every) or "none: the cache is empty"
                raise ValueError(f"no cache entry named {pattern!r} in {home()}; the entries are: {known}")
        chosen.update((e.path, e) for e in hits)
    return list(chosen.values())


def remove(entry: Entry) -> None:
    """Deletes a cache entry: first renamed away (it disappears at once, whole), then deleted; a
    model entry under its lock, so that no process is building it meanwhile."""
    parent = os.path.dirname(entry.path)
    if os.path.dirname(parent) != home() or os.path.basename(parent) not in KINDS:
        raise ValueError(f"{entry.path} is not an entry of the cache {home()}; not removed")
    lock = locked(entry.name) if entry.kind == "model" else contextlib.nullcontext()
    with lock:
        doomed = os.path.join(parent, f"{temp_prefix(entry.path)}{os.getpid()}-rm")
        os.rename(entry.path, doomed)
        if os.path.isdir(doomed):
            shutil.rmtree(doomed)
        else:
            os.remove(doomed)
