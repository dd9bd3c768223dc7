"""Map a checkpoint's safetensors files (one file, or the shards an index names) read-only.

The C++ side maps each file and checks every tensor against it; this module only parses the
JSON header (with Python's json module) and walks the shard index.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np

from . import _core

_WRITE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8"}


def write_file(path: str, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> None:
    """Writes {name: (safetensors dtype, array)} and __metadata__ to one .safetensors file (bf16
    arrays as uint16). A full disk raises OSError(ENOSPC), also when a buffered write stopped early
    without an error: the file's size must match its header."""
    import safetensors

    specs = {}
    arrays = []  # keeps the contiguous copies alive until the file is written
    for name, (dtype, array) in tensors.items():
        a = np.ascontiguousarray(array)
        arrays.append(a)
        if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.7 reads straight from the arrays
            specs[name] = safetensors.TensorSpec(dtype=_WRITE_DTYPES[dtype], shape=list(a.shape),
                                                 data_ptr=a.ctypes.data, data_len=a.nbytes)
        else:
            specs[name] = {"dtype": _WRITE_DTYPES[dtype], "shape": list(a.shape), "data": a.tobytes()}
    try:
        safetensors.serialize_file(specs, path, metadata=metadata)
    except Exception as e:  # SafetensorError is no OSError
        full = any(s in str(e) for s in ("code: 28", "StorageFull", "No space left"))
        raise OSError(errno.ENOSPC if full else errno.EIO, f"writing {path} failed ({e})") from None
    data_bytes = sum(a.nbytes for a in arrays)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        header = int.from_bytes(f.read(8), "little")
        size = os.fstat(f.fileno()).st_size
    if size != 8 + header + data_bytes:
        raise OSError(errno.ENOSPC, f"{path} holds {size} of its {8 + header + data_bytes} bytes: the disk is full "
                                    f"or failing")


HUGE_PAGES_MIN_BYTES = 32 << 20  # smaller files are not worth a second read


def prefer_huge_pages(path: str) -> None:
    """Before a large weight file is mapped: once per version of the file (size, mtime, inode,
    remembered in GALLY_HOME/pagecache.json), drops it from the page cache, so that the mapping,
    which asks for MADV_HUGEPAGE, reads it anew into 2 MiB pages where the filesystem can (see
    release_page_cache). A file another program wrote or read first is otherwise cached in 4 KiB
    pages for good. Costs one read of the file from disk, once. GALLY_HUGEPAGES=0 turns it off."""
    if os.environ.get("GALLY_HUGEPAGES") == "0" or not hasattr(os, "posix_fadvise"):
        return
    try:
        st = os.stat(path)
    except OSError:
        return
    if st.st_size < HUGE_PAGES_MIN_BYTES:
        return
    from . import cache

    key, version = os.path.realpath(path), [st.st_size, st.st_mtime_ns, st.st_ino]
    memo = cache.read_memo("pagecache.json")
    if memo.get(key) == version:
        return
    try:
        release_page_cache(path)
    except OSError:
        return
    memo.pop(key, None)
    memo[key] = version
    cache.write_memo("pagecache.json", memo)  # read-only GALLY_HOME: the next load drops it again


def release_page_cache(path: str) -> None:
    """Writes a weight file's dirty pages through to disk and drops it from the page cache.

    The pages a process writes or reads stay cached in whatever size they were made (4 KiB for
    the safetensors writer), and every later mapping of the file gets those. Dropped, the file is
    read anew on its next load, which maps it with MADV_HUGEPAGE: on filesystems with large folios
    (ext4, xfs; Linux 6.x) the kernel then reads it into 2 MiB pages, and decode streams the
    weights faster. Measured on SmolLM2-135M bf16 here: one-thread decode 75 -> 92 tok/s, a
    one-thread GEMV over the mapped embedding matrix 24 -> 29 GB/s. Elsewhere (no posix_fadvise,
    other filesystems) it costs one read from disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
        except OSError:
            pass  # e.g. a read-only filesystem, whose pages are never dirty
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_header(path: str) -> tuple[dict, dict]:
    """(tensor entries, __metadata__) of a .safetensors file, its JSON parsed; the C++ map checks
    the length prefix against the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = _core.MappedFile(path).header()
    except RuntimeError as e:
        raise OSError(str(e)) from None
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ must be an object of strings")
    return header, metadata


def open_file(path: str) -> dict[str, "_core.Tensor"]:
    """name → zero-copy tensor view of one .safetensors file. Raises ValueError naming the file
    and tensor when the header or data is corrupt."""
    prefer_huge_pages(path)
    header, _ = read_header(path)
    f = _core.MappedFile(path)
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{path}: tensor {name!r}: header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise ValueError(f"{path}: tensor {name!r}: dtype must be a string, got {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: shape must be a list of integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"{path}: tensor {name!r}: data_offsets must be two integers, got {offsets!r}")
        if any(o < 0 or o >= 1 << 62 for o in offsets) or any(d < 0 or d >= 1 << 62 for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: negative or huge shape or data_offsets")
        entries.append(_core.TensorEntry(name, dtype, shape, offsets[0], offsets[1]))
    return {t.name: t for t in _core.tensor_views(f, entries)}


def open_checkpoint(folder: str) -> dict[str, "_core.Tensor"]:
    """All tensors of a model folder: model.safetensors, or the shards of model.safetensors.index.json."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be an object")
        tensors: dict[str, _core.Tensor] = {}
        shard_of: dict[str, str] = {}
        for shard in weight_map.values():
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise ValueError(f"{index}: shard name {shard!r} must be a file in the model folder")
        for shard in sorted(set(weight_map.values())):
            for name, t in open_file(os.path.join(folder, shard)).items():
                if name in tensors:
                    raise ValueError(f"{index}: tensor {name!r} appears in more than one shard")
                tensors[name], shard_of[name] = t, shard
        for name, shard in weight_map.items():
            if shard_of.get(name) != shard:
                raise ValueError(f"{index}: tensor {name!r} is not in its shard {shard!r}")
        return tensors
    if os.path.isfile(single):
        return open_file(single)
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


# Bit masks of the exponent field: a value is NaN or infinite exactly when all its exponent bits are set.
_EXPONENT_BITS = {"F32": (np.uint32, 0x7F800000), "BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00),
                  "F64": (np.uint64, 0x7FF0000000000000)}


def check_finite(tensors: dict[str, "_core.Tensor"], folder: str, chunk: int = 1 << 22) -> None:
    """Raises ValueError naming the first floating-point tensor that holds a NaN or an infinity
    (integer tensors, such as quantized weights, cannot). Reads every weight once, `chunk`
    elements at a time."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _EXPONENT_BITS:
            continue
        kind, mask = _EXPONENT_BITS[t.dtype]
        bits = t.numpy().reshape(-1).view(kind)
        mask = kind(mask)
        for start in range(0, bits.size, chunk):
            part = bits[start:start + chunk]
            bad = np.flatnonzero((part & mask) == mask)
            if bad.size:
                raise ValueError(f"{folder}: tensor {name!r} ({t.dtype}) holds a NaN or an infinity at flat index "
                                 f"{start + int(bad[0])}; the checkpoint is corrupt")
