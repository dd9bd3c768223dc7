"""gally's cache folder (GALLY_HOME, default ~/.cache/gally) and the two rules that keep it whole:
an entry appears only by renaming a finished temporary folder onto its name, and one process at a
time builds a given entry (a lock file), so that concurrent loads neither clash nor half-write.

    GALLY_HOME/models/<name>/       converted checkpoints (Hugging Face folders)
    GALLY_HOME/gguf/<file>.gguf     GGUF files fetched for aliases
    GALLY_HOME/locks/<name>.lock    held while an entry is being built (holds the builder's pid)

A temporary folder is named .<entry>.tmp-<pid>-<random>, so that a later build can tell one a
killed process left (removed) from one a running process is filling (kept).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
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
