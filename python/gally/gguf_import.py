"""GGUF → Hugging Face folder (config.json, model.safetensors, tokenizer files), so that one loader
serves both formats. `gally convert MODEL.gguf OUT_DIR` on the command line (cli/convert.py).

What llama.cpp's converter changed, undone here:
- names: blk.N.attn_q.weight is model.layers.N.self_attn.q_proj.weight, and so on (gguf_names);
- blocks: quantized weights (Q8_0, Q4_1, Q4_K, ...) are dequantized with the gguf package to
  float32, then stored in the requested dtype; GGUF lists dims fastest first, so a GGUF shape
  [in, out] is numpy's (out, in), HF's [out, in];
- rows: for Llama-family files, each head's q_proj/k_proj rows were permuted so that RoPE rotates
  adjacent pairs (x[2i], x[2i+1]); HF rotates (x[i], x[i + head_dim/2]) (gguf_names);
- config: llama.cpp's metadata keys map onto HF field names (hf_config).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Any, Callable, Iterator, Optional

import numpy as np

from . import cache, gguf_names, gguf_tokenizer, safetensors_file
from .dtypes import to_dtype
from .progress import progress_bar

# GGUF general.architecture → the HF architecture gally runs it as.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Output dtype → (safetensors dtype name, config torch_dtype, bytes per value).
DTYPES = {"f32": ("float32", "float32", 4), "bf16": ("bfloat16", "bfloat16", 2), "f16": ("float16", "float16", 2)}
# Quantized outputs: the float32 weights quantized as `gally quantize --to` does (quantize.py), in one pass.
QUANTIZED = ("int8", "int4", "int4-v1")

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")

# Shards bound the memory a conversion holds (one shard of converted arrays at a time).
SHARD_BYTES = 2 << 30

# Tensors llama.cpp writes that carry no weights of their own (rope_freqs becomes rope_scaling).
_NOT_WEIGHTS = ("rope_freqs.weight",)


def open_gguf(path: str):
    """A gguf.GGUFReader on `path`, or a ValueError that says what is wrong with the file."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    size = os.path.getsize(path)
    check_counts(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        if "GGMLQuantizationType" in str(e):
            raise ValueError(f"{path}: a tensor has a type unknown to gguf {_gguf_version()} ({e}); "
                             f"upgrading the gguf package may help") from None
        raise ValueError(f"{path}: unreadable GGUF file, truncated or corrupt ({type(e).__name__}: {e}); "
                         f"download or copy it again") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} of a "
                             f"{size}-byte file: the file is truncated; download or copy it again")
    return reader


# Bytes of GGUF's scalar value types (GGUFValueType): u8 i8 u16 i16 u32 i32 f32 bool, -, -, u64 i64 f64.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_counts(path: str) -> None:
    """Walks a GGUF file's header and metadata, checking every count (tensors, entries, string
    lengths, array lengths) against the bytes left in the file, so that a corrupt count raises
    ValueError here instead of sending a reader into a loop of billions of steps (the gguf package
    reads past the end as empty values: an array claiming 4e9 numbers loops 4e9 times)."""
    import mmap
    import struct

    def corrupt(what: str) -> ValueError:
        return ValueError(f"{path}: truncated or corrupt GGUF file: {what}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise corrupt(f"{size} bytes, shorter than the 24-byte header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
            if 24 * n_tensors + 13 * n_kv > size:  # a tensor info takes 24 bytes or more, an entry 13
                raise corrupt(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in a file of {size} bytes")
            at = 24

            def take(n: int, what: str) -> int:
                nonlocal at
                if n > size - at:
                    raise corrupt(f"{what} at byte {at} needs {n} bytes; {size - at} are left")
                at += n
                return at - n

            def skip_value(kind: int, where: str) -> None:
                if kind in _SCALAR_BYTES:
                    take(_SCALAR_BYTES[kind], where)
                elif kind == _STRING:
                    take(struct.unpack_from("<Q", data, take(8, where))[0], where)
                elif kind == _ARRAY:
                    item, count = struct.unpack_from("<IQ", data, take(12, where))
                    if item in _SCALAR_BYTES:
                        take(count * _SCALAR_BYTES[item], f"{where}: {count} values")
                    elif item in (_STRING, _ARRAY):
                        least = 8 if item == _STRING else 12  # a string's length; an array's type and count
                        if count * least > size - at:
                            raise corrupt(f"{where}: {count} items at byte {at} need {count * least} bytes or more; "
                                          f"{size - at} are left")
                        for _ in range(count):
                            skip_value(item, where)
                    else:
                        raise corrupt(f"{where} holds values of unknown type {item}")
                else:
                    raise corrupt(f"{where} has unknown value type {kind}")

            for i in range(n_kv):
                key_len = struct.unpack_from("<Q", data, take(8, f"metadata entry {i}"))[0]
                key = bytes(data[take(key_len, f"metadata entry {i}'s key"):at]).decode("utf-8", "replace")
                kind = struct.unpack_from("<I", data, take(4, f"metadata {key!r}"))[0]
                skip_value(kind, f"metadata {key!r}")


def metadata(reader) -> dict[str, Any]:
    """Every key-value field of the file as Python values (strings, numbers, lists)."""
    return {name: _value(field, reader) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _value(field, reader) -> Any:
    """A field as Python data: numpy parts, strings as UTF-8 bytes (ReaderField.contents() of newer
    gguf releases, written out for older ones)."""
    from gguf import GGUFValueType

    def text(part) -> str:
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{reader.data.filename}: metadata {field.name!r} is not valid UTF-8; "
                             f"the file is corrupt") from None

    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [text(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if field.types[0] == GGUFValueType.STRING:
        return text(field.parts[-1])
    return field.parts[-1].tolist()[0]


def hf_config(meta: dict[str, Any], tensors: dict[str, Any], path: str, dtype: str = "f32") -> dict[str, Any]:
    """config.json for a GGUF file: llama.cpp's `<arch>.*` keys under HF field names."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; gally converts GGUF files of "
                         f"architecture {', '.join(ARCHITECTURES)}")

    def number(key: str, kind=int, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{key} is missing")
        if isinstance(value, list):
            if not value or any(v != value[0] for v in value):
                raise ValueError(f"{path}: {arch}.{key} varies per layer ({value}); gally needs one value")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"{path}: metadata key {arch}.{key} must be a number, got {value!r}")
        return kind(value)

    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    hidden = number("embedding_length")
    heads = number("attention.head_count")
    head_dim = number("attention.key_length", default=hidden // heads if heads else 0)
    if number("attention.value_length", default=head_dim) != head_dim:
        raise ValueError(f"{path}: attention.value_length differs from attention.key_length; gally needs them equal")
    if number("rope.dimension_count", default=head_dim) != head_dim:
        raise ValueError(f"{path}: RoPE covers {number('rope.dimension_count')} of {head_dim} head dimensions; "
                         f"gally supports RoPE over the whole head only")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": number("feed_forward_length"),
        "num_hidden_layers": number("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": number("attention.head_count_kv", default=heads),
        "head_dim": head_dim,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "max_position_embeddings": number("context_length", default=2048),
        # float32 in the file: 1e-5 reads back as 9.999999747e-06, which is written here as 1e-05
        "rms_norm_eps": float(str(np.float32(number("attention.layer_norm_rms_epsilon", float)))),
        "rope_theta": float(str(np.float32(number("rope.freq_base", float, default=10000.0)))),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch != "qwen2" and "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "torch_dtype": DTYPES[dtype][1],
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            config[name] = int(meta[f"tokenizer.ggml.{key}"])
    _check_config(config, path)  # gally's bounds (block count, dimensions), before anything loops over them
    scaling = rope_scaling(meta, tensors, arch, config, path)
    if scaling is not None:
        config["rope_scaling"] = scaling
        _check_config(config, path)
    return config


def _check_config(config: dict, path: str) -> None:
    from .config import Config

    try:
        Config.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def rope_scaling(meta: dict[str, Any], tensors: dict[str, Any], arch: str, config: dict, path: str) -> Optional[dict]:
    """rope_scaling from `<arch>.rope.scaling.*`, or, for Llama 3.1/3.2 files, recovered from the
    per-frequency divisors llama.cpp stores in rope_freqs.weight."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(np.asarray(dequantize(tensors["rope_freqs.weight"], path)).reshape(-1), config, path)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ValueError(f"{path}: metadata key {arch}.rope.scaling.factor must be a number, got {factor!r}")
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"{path}: RoPE scaling {kind!r} is not supported; gally supports linear and llama3 scaling")


def _llama3_scaling(divisors: np.ndarray, config: dict, path: str) -> dict:
    from .config import Config

    if divisors.size != config["head_dim"] // 2 or not np.isfinite(divisors).all():
        raise ValueError(f"{path}: rope_freqs.weight must hold head_dim/2 = {config['head_dim'] // 2} finite "
                         f"divisors, got {divisors.size}")
    factor = float(divisors.max())
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                       "original_max_position_embeddings": original}
            cfg = Config.from_dict({**config, "rope_scaling": scaling})
            plain = Config.from_dict({k: v for k, v in config.items() if k != "rope_scaling"}).inv_freq()
            if divisors.shape == plain.shape and np.allclose(plain / cfg.inv_freq(), divisors, rtol=1e-4):
                return scaling
    raise ValueError(f"{path}: rope_freqs.weight matches no Llama 3 RoPE scaling gally knows")


def check_type(t, path: str) -> None:
    if t.tensor_type.name not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gally cannot convert "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")


def dequantize(t, path: str) -> np.ndarray:
    """float32 array of GGUF tensor `t` in HF layout: shape reversed, [out, in] for a matrix."""
    import gguf

    check_type(t, path)
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.ascontiguousarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape.tolist())))


class _Plan:
    """What convert() will write: tensors in file order with their HF names, and the config."""

    def __init__(self, path: str, dtype: str):
        self.reader = open_gguf(path)
        self.meta = metadata(self.reader)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = hf_config(self.meta, self.tensors, path, "f32" if dtype in QUANTIZED else dtype)
        self.tokenizer, self.tokenizer_config, self.eos_ids = gguf_tokenizer.build(self.meta, path)
        self.tokenizer_config["model_max_length"] = self.config["max_position_embeddings"]
        self.names: list[tuple[str, Any]] = []
        for t in self.reader.tensors:
            if t.name in _NOT_WEIGHTS:
                continue
            name = gguf_names.hf_name(t.name)
            if name is None:
                raise ValueError(f"{path}: tensor {t.name!r} has no place in a {self.config['architectures'][0]} "
                                 f"(a variant gally does not run, e.g. mixture of experts)")
            check_type(t, path)
            self.names.append((name, t))
        missing = [f"blk.{i}.{n}" for i in range(self.config["num_hidden_layers"]) for n in gguf_names.REQUIRED_LAYER
                   if f"blk.{i}.{n}" not in self.tensors]
        missing += [n for n in ("output_norm.weight",) if n not in self.tensors]
        if missing:
            raise ValueError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
        self.out_bytes = sum(_stored_bytes(name, t, dtype, self.config["num_hidden_layers"]) for name, t in self.names)


def _stored_bytes(name: str, t, dtype: str, layers: int) -> int:
    """Bytes HF tensor `name` (GGUF tensor t) takes in the converted file."""
    n = int(t.n_elements)
    if dtype not in QUANTIZED:
        return n * (DTYPES[dtype][2] if len(t.shape) > 1 else 4)
    from .quantize import kind_for

    kind = kind_for(name, tuple(int(d) for d in reversed(t.shape.tolist())), dtype, layers)
    # int8: a byte per weight + an f16 scale per 32; int4: 4.5 bits per weight (quantize.py);
    # int4-v1: half a byte + an f16 scale and min per 32
    return {None: 4 * n, "int8": n + n // 16, "int4": n * 9 // 16, "int4-v1": n // 2 + n // 8}[kind]


def convert(path: str, out_dir: str, dtype: str = "f32", progress: Optional[bool] = None,
            announce: Optional[Callable[[int], None]] = None, calibration=None) -> str:
    """Writes the Hugging Face folder for GGUF file `path` at `out_dir` (which must not exist, or be
    empty) in weights of `dtype` ("f32", "bf16" or "f16"; norms and biases stay float32; "int8" or
    "int4": the gally-quant folder `gally quantize` would make of the f32 conversion, int4 with the
    quantize.Calibration `calibration` when given). The folder
    appears whole or not at all. progress: a bar on stderr once the work has taken a second
    (default: when stderr is a terminal). announce: called with the bytes it will write, before
    writing them."""
    if dtype not in DTYPES and dtype not in QUANTIZED:
        raise ValueError(f"dtype must be one of {', '.join(list(DTYPES) + list(QUANTIZED))}, got {dtype!r}")
    path, out_dir = os.fspath(path), os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: already exists; choose a new output folder")
    with _named_errors(path):
        plan = _Plan(path, dtype)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    cache.check_free_space(parent, plan.out_bytes + (1 << 20), f"converting {os.path.basename(path)}")
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    if announce is not None:
        announce(plan.out_bytes)
    with cache.building(out_dir) as tmp:
        write_folder(plan, path, tmp, dtype, progress, calibration)
    return out_dir


def write_folder(plan: _Plan, path: str, folder: str, dtype: str, progress: Optional[bool] = None,
                 calibration=None) -> None:
    """Writes config, tokenizer and weights of `plan` into the existing empty `folder`."""
    _write_json(os.path.join(folder, "config.json"), plan.config)
    try:
        plan.tokenizer.save(os.path.join(folder, "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on I/O errors
        raise OSError(errno.EIO, f"writing {folder}/tokenizer.json failed ({e})") from None
    _write_json(os.path.join(folder, "tokenizer_config.json"), plan.tokenizer_config)
    generation = {k: plan.config[k] for k in ("bos_token_id", "pad_token_id") if k in plan.config}
    if plan.eos_ids:
        generation["eos_token_id"] = plan.eos_ids if len(plan.eos_ids) > 1 else plan.eos_ids[0]
    _write_json(os.path.join(folder, "generation_config.json"), generation)
    _write_weights(plan, path, folder, dtype, progress, calibration)


def _float_tensors(plan: _Plan, path: str) -> Iterator[tuple[str, Any, np.ndarray]]:
    """(HF name, GGUF tensor, float32 weights in HF layout) of each tensor, one at a time."""
    architecture = plan.meta["general.architecture"]
    for name, t in plan.names:
        with _named_errors(path, f"tensor {t.name!r}: "):
            w = dequantize(t, path)
        heads = gguf_names.permuted_heads(architecture, name, plan.config)
        if heads:
            w = gguf_names.unpermute_rows(w, heads)
        yield name, t, w


def _write_quantized(plan: _Plan, path: str, folder: str, to: str, progress: Optional[bool], calibration) -> None:
    """One model.safetensors in the gally-quant format: each weight quantized as it is dequantized,
    so that memory holds the quantized model and one float32 tensor."""
    from .quantize import quantize_tensors

    tensors: dict[str, tuple[str, np.ndarray]] = {}
    metadata: dict[str, str] = {}
    with progress_bar(plan.out_bytes, f"quantizing {os.path.basename(path)} to {to}", progress) as bar:
        for name, t, w in _float_tensors(plan, path):
            out, metadata = quantize_tensors({name: ("F32", np.ascontiguousarray(w))}, to,
                                             layers=plan.config["num_hidden_layers"], calibration=calibration)
            tensors.update(out)
            bar.update(_stored_bytes(name, t, to, plan.config["num_hidden_layers"]))
    safetensors_file.write_file(os.path.join(folder, "model.safetensors"), tensors, metadata)


def _write_weights(plan: _Plan, path: str, folder: str, dtype: str, progress: Optional[bool], calibration) -> None:
    if dtype in QUANTIZED:
        _write_quantized(plan, path, folder, dtype, progress, calibration)
        return
    shard: dict[str, np.ndarray] = {}
    shard_bytes = 0
    shards: list[list[str]] = []  # tensor names of each shard written
    with progress_bar(plan.out_bytes, f"converting {os.path.basename(path)}", progress) as bar:
        for name, _, w in _float_tensors(plan, path):
            w = np.ascontiguousarray(to_dtype(w, dtype, name) if w.ndim > 1 else w)
            if shard and shard_bytes + w.nbytes > SHARD_BYTES:
                shards.append(_write_shard(folder, len(shards), shard))
                shard, shard_bytes = {}, 0
            shard[name] = w
            shard_bytes += w.nbytes
            bar.update(w.nbytes)
        shards.append(_write_shard(folder, len(shards), shard))
    if len(shards) == 1:
        os.rename(os.path.join(folder, "shard-0.safetensors"), os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(folder, f"shard-{i}.safetensors"), os.path.join(folder, file))
        weight_map.update(dict.fromkeys(names, file))
    _write_json(os.path.join(folder, "model.safetensors.index.json"),
                {"metadata": {"total_size": plan.out_bytes}, "weight_map": weight_map})


def _write_shard(folder: str, index: int, tensors: dict[str, np.ndarray]) -> list[str]:
    """Writes shard-<index>.safetensors; returns the names it holds."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16"}
    safetensors_file.write_file(os.path.join(folder, f"shard-{index}.safetensors"),
                                {key: (names[w.dtype], w) for key, w in tensors.items()}, {"format": "pt"})
    return list(tensors)


@contextlib.contextmanager
def _named_errors(path: str, what: str = "") -> Iterator[None]:
    """Whatever a malformed file makes the reading code trip over (a list where a number belongs,
    a 1-D tensor where a matrix does) becomes a ValueError that names the file."""
    try:
        yield
    except ValueError as e:
        if path in str(e):
            raise
        raise ValueError(f"{path}: {what}{e}") from None
    except (IndexError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise ValueError(f"{path}: {what}corrupt GGUF metadata or tensor info ({type(e).__name__}: {e})") from None
    except Exception as e:
        if type(e) is not Exception:  # the tokenizers library raises plain Exception for a bad vocabulary
            raise
        raise ValueError(f"{path}: {what}the tokenizer cannot be built from the file's vocabulary ({e})") from None


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "(unknown version)"
