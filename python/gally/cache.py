"""gally's cache folder (GALLY_HOME, default ~/.cache/gally) and the two rules that keep it whole:
an entry appears only by renaming a finished temporary folder onto its name, and one process at a
time builds a given entry (a lock file), so that concurrent loads neither clash nor half-write.

    GALLY_HOME/models/<name>/       converted checkpoints (Hugging Face folders)
    GALLY_HOME/gguf/<file>.gguf     GGUF files fetched for aliases
    GALLY_HOME/locks/<name>.lock    held while an entry is being built
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Iterator

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
    `keep` most recent entries; a read-only GALLY_HOME is no error."""
    if len(memo) > keep:
        memo = dict(list(memo.items())[-keep:])
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder())
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, os.path.join(home(), name))
    except OSError:
        pass


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Holds GALLY_HOME/locks/<name>.lock exclusively (waits for another process holding it)."""
    path = os.path.join(folder("locks"), name + ".lock")
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
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
    finishes, renames it onto `final`; when it raises (or is interrupted), deletes it."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(final), dir=parent)
    target = tmp if kind == "folder" else os.path.join(tmp, os.path.basename(final))
    try:
        yield target
        _usual_permissions(target)
        os.rename(target, final)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"the disk holding {parent} is full ({e.strerror}) while writing "
                                   f"{os.path.basename(final)}; nothing was kept. Free some space, or write to "
                                   f"another disk (for the model cache: set GALLY_HOME)") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _usual_permissions(path: str) -> None:
    """mkdtemp and some writers make owner-only entries; give them the modes of a plain mkdir/open."""
    mask = os.umask(0)
    os.umask(mask)
    entries = [path] + ([os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [])
    for entry in entries:
        os.chmod(entry, (0o777 if os.path.isdir(entry) else 0o666) & ~mask)


def remove_stale(final: str) -> None:
    """Deletes temporary folders a killed process left beside `final`. Call with its lock held."""
    parent, prefix = os.path.dirname(os.path.abspath(final)), temp_prefix(final)
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


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
