"""int8 and int4 weights: the format, NumPy quantize/dequantize, the reader and the writer of a
quantized folder (`gally quantize SRC OUT --to int8|int4`, cli/quantize.py).

Format "gally-quant", version 1
-------------------------------
A quantized model is a Hugging Face folder: the source's config.json (unchanged), tokenizer and
generation files, and ONE model.safetensors whose __metadata__ (all values strings) is

    {"format": "gally-quant", "gally.quant.version": "1", "gally.quant.type": "int8" | "int4",
     "gally.quant.int8.group_size": "32", "gally.quant.int4.group_size": "32"}

A weight matrix NAME.weight [rows, cols] (HF layout [out, in]) that is quantized is absent; in its
place, row-major and contiguous, groups of G = 32 consecutive columns of one row:

    int8   NAME.qweight  I8   [rows, cols]      q in [-127, 127] (never -128)
           NAME.scales   F16  [rows, cols/32]
           w[r, c] = scales[r, c/32] · qweight[r, c]                          (symmetric, llama.cpp Q8_0)

    int4   NAME.qweight  U8   [rows, cols/2]    two 4-bit q in [0, 15] per byte
           NAME.scales   F16  [rows, cols/32]
           NAME.mins     F16  [rows, cols/32]
           group g of row r (columns 32g … 32g+31) is bytes qweight[r, 16g … 16g+15]; byte i holds
           column 32g+i in its low nibble and column 32g+16+i in its high nibble (llama.cpp Q4_1):
           w[r, 32g + j] = scales[r, g] · q_j + mins[r, g]                  (asymmetric, mins = group minimum)

Which tensors (decided by perplexity, see below):
- --to int8: the seven matrices of every layer (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)
  and model.embed_tokens (and lm_head when untied) in int8;
- --to int4: the seven layer matrices in int4; model.embed_tokens and lm_head in int8;
- everything else keeps its HF name, dtype and bytes: norms, biases, and any matrix whose cols is
  not a multiple of 32. With tie_word_embeddings, model.embed_tokens.{qweight,scales} serve both
  the lookup (one row dequantized) and the output projection.

For kernels: with activations quantized per group of 32 to int8 (sx, xq), one group's share of a
dot product is s·sx·Σ q·xq (int8) or s·sx·Σ q·xq + m·sx·Σ xq (int4; Σ xq is per activation group,
shared by every row). Σ q·xq fits int32 exactly; int4 q is a valid unsigned operand of vpdpbusd
and maddubs as is; int8 q never being -128 lets a kernel move the activation's sign onto it;
maddubs pairs stay below 2^15 (2·127·127 = 32258, 2·15·127 = 3810). Tensor offsets are whatever
the safetensors writer chose: use unaligned loads.

Why (SmolLM2-135M-Instruct, `gally perplexity --ctx 512`; gpl-3.0 / how-llms-work / an unseen
README, relative to bf16 weights): int8 groups of 32 -0.06 / +0.31 / -0.25% (groups of 64 +0.12 /
-0.26 / +0.41%, KLD 14% higher; one scale per row +0.54 / -0.17 / +1.27%; groups of 128 do not
divide hidden 576). The GGUF this model comes from stores its layers as Q4_1 and its embeddings
as Q8_0, so int4 layers + int8 embeddings reproduce every weight exactly (ppl = f32's); int4
embeddings would cost +6%, symmetric int4 (Q4_0-like) +24%, int4 groups of 64 +34%.

Scales and mins are float16, rounded to nearest; q is computed from the stored (rounded) scale and
min, so rounding is to the nearest representable value. Groups whose scale falls below float16's
normal range (max|w| < 7.8e-3 for int8) get subnormal scales with fewer significant bits.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Optional

import numpy as np

from .dtypes import as_float32

FORMAT = "gally-quant"
VERSION = "1"
KINDS = ("int8", "int4")
# Group sizes version 1 reads and writes: one kernel per kind, no run-time group size.
GROUP_SIZE = {"int8": 32, "int4": 32}
INT8_MAX = 127   # int8 values lie in [-127, 127]: -128 never occurs, so kernels may negate either operand
INT4_MAX = 15    # int4 values lie in [0, 15]

METADATA_FORMAT = "format"
METADATA_VERSION = "gally.quant.version"
METADATA_TYPE = "gally.quant.type"


def metadata_group_key(kind: str) -> str:
    return f"gally.quant.{kind}.group_size"


# ---- NumPy quantize / dequantize (one matrix [rows, cols], groups along cols) ----

def _groups(w: np.ndarray, group_size: int, name: str) -> np.ndarray:
    """w [rows, cols] as float32 [rows, cols/G, G]; checks shape and finiteness."""
    if w.ndim != 2:
        raise ValueError(f"tensor {name!r}: only matrices are quantized, got shape {list(w.shape)}")
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"tensor {name!r}: {cols} columns is not a multiple of the group size {group_size}")
    g = np.asarray(w, dtype=np.float32).reshape(rows, cols // group_size, group_size)
    if not np.isfinite(g).all():
        raise ValueError(f"tensor {name!r} holds NaN or infinite values; it cannot be quantized")
    return g


def _to_f16(x: np.ndarray, name: str, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = x.astype(np.float16)
    if not np.isfinite(out).all():
        raise ValueError(f"tensor {name!r}: a group's {what} exceeds float16's range (±65504)")
    return out


def _safe_divide(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x / scale per group, 0 where the scale is 0 (an all-equal group)."""
    return np.divide(x, scale[..., None], out=np.zeros_like(x), where=scale[..., None] != 0)


def quantize_int8(w: np.ndarray, group_size: int = GROUP_SIZE["int8"], name: str = "weight"):
    """Symmetric int8 per group of `group_size` consecutive inputs of each row:
    w ≈ scale · q, scale = max|w| / 127 (float16), q = round(w / scale) ∈ [-127, 127].
    Returns qweight int8 [rows, cols], scales float16 [rows, cols/G]."""
    g = _groups(w, group_size, name)
    scales = _to_f16(np.abs(g).max(axis=2) / INT8_MAX, name, "scale")
    q = np.rint(_safe_divide(g, scales.astype(np.float32)))  # divide by the stored scale, so rounding sees it
    q = np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)
    return q.reshape(w.shape), scales


def dequantize_int8(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] = scale · q per group."""
    rows, cols = qweight.shape
    g = qweight.reshape(rows, scales.shape[1], -1).astype(np.float32)
    return (g * scales.astype(np.float32)[..., None]).reshape(rows, cols)


def quantize_int4(w: np.ndarray, group_size: int = GROUP_SIZE["int4"], name: str = "weight"):
    """Asymmetric int4 per group (llama.cpp's Q4_1): w ≈ scale · q + min, min = the group's
    minimum, scale = (max - min) / 15, both float16, q = round((w - min) / scale) ∈ [0, 15].
    Returns qweight uint8 [rows, cols/2] (pack_int4), scales and mins float16 [rows, cols/G]."""
    g = _groups(w, group_size, name)
    lo, hi = g.min(axis=2), g.max(axis=2)
    mins = _to_f16(lo, name, "minimum")
    scales = _to_f16((hi - lo) / INT4_MAX, name, "scale")
    q = np.rint(_safe_divide(g - mins.astype(np.float32)[..., None], scales.astype(np.float32)))
    q = np.clip(q, 0, INT4_MAX).astype(np.uint8)
    return pack_int4(q.reshape(w.shape), group_size), scales, mins


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] = scale · q + min per group."""
    rows = qweight.shape[0]
    group_size = 2 * qweight.shape[1] // scales.shape[1]
    q = unpack_int4(qweight, group_size).reshape(rows, scales.shape[1], group_size).astype(np.float32)
    w = q * scales.astype(np.float32)[..., None] + mins.astype(np.float32)[..., None]
    return w.reshape(rows, -1)


def pack_int4(q: np.ndarray, group_size: int) -> np.ndarray:
    """q uint8 [rows, cols] in [0, 15] → uint8 [rows, cols/2]. Within each group of G values,
    byte i holds value i in its low nibble and value i + G/2 in its high nibble (llama.cpp's
    order: one AND and one shift of G/2 bytes give the group's two halves in order)."""
    rows, cols = q.shape
    g = q.reshape(rows, cols // group_size, 2, group_size // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(rows, cols // 2)


def unpack_int4(packed: np.ndarray, group_size: int) -> np.ndarray:
    """uint8 [rows, cols/2] → q uint8 [rows, cols] in [0, 15] (inverse of pack_int4)."""
    rows, half_cols = packed.shape
    g = packed.reshape(rows, 2 * half_cols // group_size, 1, group_size // 2)
    return np.concatenate([g & 0x0F, g >> 4], axis=2).reshape(rows, 2 * half_cols)


# ---- which tensors are quantized ----

_LAYER_MATRIX = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def kind_for(name: str, shape, to: str) -> Optional[str]:
    """The kind tensor `name` of `shape` is stored in when quantizing `--to` int8 or int4, or None
    when it stays as it is: norms and biases, and matrices whose columns do not fill whole groups.
    Layer matrices take `to`; the embeddings (and lm_head) take int8 in both (see the module doc)."""
    if len(shape) != 2:
        return None
    if _LAYER_MATRIX.fullmatch(name):
        kind = to
    elif name in _EMBEDDINGS:
        kind = "int8"
    else:
        return None
    return kind if shape[1] % GROUP_SIZE[kind] == 0 else None


def module_name(weight_name: str) -> str:
    """"model.layers.0.mlp.up_proj.weight" → "model.layers.0.mlp.up_proj", the prefix of its
    .qweight/.scales/.mins."""
    return weight_name[: -len(".weight")]


def quantize_tensors(tensors: dict, to: str) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """Quantizes a checkpoint held as {name: (safetensors dtype, array)} (bf16 as uint16 bits).
    Returns the tensors of the quantized file in the same form (kept tensors pass through as the
    same (dtype, array) objects, not copies), and its __metadata__."""
    if to not in KINDS:
        raise ValueError(f"to must be one of {', '.join(KINDS)}, got {to!r}")
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, (dtype, array) in tensors.items():
        kind = kind_for(name, array.shape, to) if name.endswith(".weight") else None
        if kind is None:
            out[name] = (dtype, array)
            continue
        w = as_float32(dtype, array)
        base = module_name(name)
        if kind == "int8":
            q, s = quantize_int8(w, GROUP_SIZE["int8"], name)
            out[base + ".qweight"], out[base + ".scales"] = ("I8", q), ("F16", s)
        else:
            q, s, m = quantize_int4(w, GROUP_SIZE["int4"], name)
            out[base + ".qweight"], out[base + ".scales"], out[base + ".mins"] = ("U8", q), ("F16", s), ("F16", m)
    metadata = {METADATA_FORMAT: FORMAT, METADATA_VERSION: VERSION, METADATA_TYPE: to}
    metadata.update({metadata_group_key(k): str(GROUP_SIZE[k]) for k in KINDS})
    return out, metadata


# ---- reading a quantized file ----

@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """A weight matrix stored quantized, and the tensors of the file that hold it."""
    name: str                  # the HF weight it stands for: "model.layers.0.mlp.up_proj.weight"
    kind: str                  # "int8" or "int4"
    shape: tuple[int, int]     # [rows, cols] of the weight
    group_size: int
    qweight: str               # "model.layers.0.mlp.up_proj.qweight"
    scales: str
    mins: Optional[str]        # int4 only


@dataclasses.dataclass(frozen=True)
class QuantizedCheckpoint:
    path: str                                   # the .safetensors file
    quant_type: str                             # "int8" or "int4", as `gally quantize --to` made it
    metadata: dict[str, str]
    matrices: dict[str, QuantizedMatrix]        # by HF weight name
    plain: dict[str, tuple[str, tuple]]         # tensors stored as they are: name → (dtype, shape)


_QUANT_SUFFIXES = (".qweight", ".scales", ".mins")
_QWEIGHT_KIND = {"I8": "int8", "U8": "int4"}


def read_header(path: str) -> tuple[dict, dict]:
    """(tensor entries, __metadata__) of a .safetensors file; reads only the header."""
    from . import safetensors_file

    header, metadata = safetensors_file.read_header(path)
    for name, info in header.items():
        if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str)
                or not isinstance(info.get("shape"), list)):
            raise ValueError(f"{path}: tensor {name!r}: header entry needs a dtype and a shape")
    return header, metadata


def _group_size(path: str, metadata: dict, kind: str) -> int:
    key = metadata_group_key(kind)
    value = metadata.get(key)
    if value is None:
        raise ValueError(f"{path}: holds {kind} tensors but __metadata__ has no {key!r}")
    if str(value) != str(GROUP_SIZE[kind]):
        raise ValueError(f"{path}: __metadata__ {key!r} is {value!r}; gally reads {kind} groups of "
                         f"{GROUP_SIZE[kind]} only")
    return GROUP_SIZE[kind]


def read_file(path: str) -> Optional[QuantizedCheckpoint]:
    """The layout of a quantized .safetensors file, checked against the spec; None for a plain
    checkpoint (no gally-quant tag and no quantized tensors). Raises ValueError naming the file
    and the tensor or key that is wrong."""
    header, metadata = read_header(path)
    quant_names = sorted(n for n in header if n.endswith(_QUANT_SUFFIXES))
    tag = metadata.get(METADATA_FORMAT)
    if tag != FORMAT:
        if not quant_names:
            return None
        if tag is None:
            raise ValueError(f"{path}: tensor {quant_names[0]!r} looks quantized but __metadata__ has no format "
                             f"tag; gally reads files tagged {{{METADATA_FORMAT!r}: {FORMAT!r}}}")
        raise ValueError(f"{path}: unknown quantization format {tag!r} (tensor {quant_names[0]!r}); gally reads "
                         f"files tagged {{{METADATA_FORMAT!r}: {FORMAT!r}}}")
    version = metadata.get(METADATA_VERSION)
    if version != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {version!r}; this gally reads version {VERSION!r}")
    quant_type = metadata.get(METADATA_TYPE)
    if quant_type not in KINDS:
        raise ValueError(f"{path}: __metadata__ {METADATA_TYPE!r} is {quant_type!r}, "
                         f"expected one of {', '.join(KINDS)}")

    matrices: dict[str, QuantizedMatrix] = {}
    used: set[str] = set()
    for qname in (n for n in quant_names if n.endswith(".qweight")):
        base = qname[: -len(".qweight")]
        entry = header[qname]
        kind = _QWEIGHT_KIND.get(entry["dtype"])
        if kind is None:
            raise ValueError(f"{path}: tensor {qname!r} has dtype {entry['dtype']}; expected I8 (int8) or U8 (int4)")
        shape = entry["shape"]
        if len(shape) != 2:
            raise ValueError(f"{path}: tensor {qname!r} has shape {shape}; expected a matrix")
        group = _group_size(path, metadata, kind)
        rows, cols = shape[0], shape[1] * (2 if kind == "int4" else 1)
        if cols % group:
            raise ValueError(f"{path}: tensor {qname!r}: {cols} columns is not a multiple of the {kind} "
                             f"group size {group}")
        expected = [rows, cols // group]
        parts = {"scales": base + ".scales", "mins": base + ".mins" if kind == "int4" else None}
        for part, pname in parts.items():
            if pname is None:
                if base + ".mins" in header:
                    raise ValueError(f"{path}: tensor {base + '.mins'!r} belongs to no int4 weight "
                                     f"({qname!r} is int8, which has no mins)")
                continue
            if pname not in header:
                raise ValueError(f"{path}: tensor {pname!r} is missing ({kind} weight {qname!r} needs its {part})")
            if header[pname]["dtype"] != "F16":
                raise ValueError(f"{path}: tensor {pname!r} has dtype {header[pname]['dtype']}; expected F16")
            if header[pname]["shape"] != expected:
                raise ValueError(f"{path}: tensor {pname!r} has shape {header[pname]['shape']}; expected {expected} "
                                 f"for {kind} groups of {group} over a [{rows}, {cols}] weight")
            used.add(pname)
        weight = base + ".weight"
        if weight in header:
            raise ValueError(f"{path}: tensor {weight!r} is stored both plain and quantized ({qname!r})")
        used.add(qname)
        matrices[weight] = QuantizedMatrix(weight, kind, (rows, cols), group, qname, parts["scales"], parts["mins"])
    orphans = [n for n in quant_names if n not in used]
    if orphans:
        raise ValueError(f"{path}: tensor {orphans[0]!r} belongs to no quantized weight (no "
                         f"{orphans[0].rsplit('.', 1)[0] + '.qweight'!r})")
    plain = {n: (e["dtype"], tuple(e["shape"])) for n, e in header.items() if n not in used}
    return QuantizedCheckpoint(path, quant_type, {str(k): str(v) for k, v in metadata.items()}, matrices, plain)


def read_checkpoint(folder: str) -> Optional[QuantizedCheckpoint]:
    """read_file() of a model folder's model.safetensors; None for a plain checkpoint (sharded
    ones included: a quantized checkpoint is always one file)."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return read_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        for shard in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
            if read_file(os.path.join(folder, shard)) is not None:
                raise ValueError(f"{os.path.join(folder, shard)}: a {FORMAT} checkpoint must be one "
                                 f"model.safetensors, not shards")
        return None
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_arrays(folder: str) -> tuple[QuantizedCheckpoint, dict[str, np.ndarray]]:
    """The checked layout and every tensor of a quantized folder as a zero-copy NumPy view."""
    from . import safetensors_file

    layout = read_checkpoint(folder)
    if layout is None:
        raise ValueError(f"{folder}: not a {FORMAT} checkpoint (no {METADATA_FORMAT!r}: {FORMAT!r} tag)")
    return layout, {name: t.numpy() for name, t in safetensors_file.open_file(layout.path).items()}


def dequantize_checkpoint(folder: str) -> dict[str, np.ndarray]:
    """Every weight of a quantized folder under its HF name, dequantized to float32."""
    layout, arrays = load_arrays(folder)
    out = {name: as_float32(dtype, arrays[name]) for name, (dtype, _) in layout.plain.items()}
    for name, m in layout.matrices.items():
        if m.kind == "int8":
            out[name] = dequantize_int8(arrays[m.qweight], arrays[m.scales].view(np.float16))
        else:
            out[name] = dequantize_int4(arrays[m.qweight], arrays[m.scales].view(np.float16),
                                        arrays[m.mins].view(np.float16))
    return out


# ---- writing a quantized model folder ----

# Files copied from the source folder beside the weights: config, tokenizer, chat template.
_COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def quantize_folder(source: str, out_dir: str, to: str, progress: Optional[bool] = None) -> QuantizedCheckpoint:
    """Writes the model folder `out_dir` (which must not exist, or be empty): `source`'s config and
    tokenizer files, and model.safetensors quantized to `to` ("int8" or "int4"). source: a model
    folder, a .gguf file or an alias, as gally.load takes. The folder appears whole or not at all.
    progress: a bar on stderr once it has taken a second (default: when stderr is a terminal)."""
    from . import cache, gguf_import, safetensors_file, sources
    from .progress import progress_bar

    if to not in KINDS:
        raise ValueError(f"to must be one of {', '.join(KINDS)}, got {to!r}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: already exists; choose a new output folder")
    gguf = sources.gguf_file(source)
    if gguf is not None:  # straight from the GGUF file: no float32 conversion is written on the way
        gguf_import.convert(gguf, out_dir, to, progress)
        return read_checkpoint(out_dir)
    folder = sources.resolve(source)
    if read_checkpoint(folder) is not None:
        raise ValueError(f"{folder}: already quantized; quantize from an f32, bf16 or f16 checkpoint")
    views = safetensors_file.open_checkpoint(folder)
    arrays = {n: (t.dtype, t.numpy()) for n, t in views.items()}  # views into the mapped file
    tensors, metadata = {}, {}
    with progress_bar(sum(a.nbytes for _, a in arrays.values()), f"quantizing to {to}", progress) as bar:
        for name, (dtype, a) in arrays.items():  # one at a time, for the bar
            out, metadata = quantize_tensors({name: (dtype, a)}, to)
            tensors.update(out)
            bar.update(a.nbytes)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    cache.check_free_space(parent, sum(a.nbytes for _, a in tensors.values()) + (16 << 20), f"writing {out_dir}")
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    with cache.building(out_dir) as tmp:
        for f in sorted(os.listdir(folder)):
            copied = f.endswith(_COPIED_SUFFIXES) and f != "model.safetensors.index.json"
            if copied and os.path.isfile(os.path.join(folder, f)):
                shutil.copyfile(os.path.join(folder, f), os.path.join(tmp, f))
        safetensors_file.write_file(os.path.join(tmp, "model.safetensors"), tensors, metadata)
    return read_checkpoint(out_dir)
