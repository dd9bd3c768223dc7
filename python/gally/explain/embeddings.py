"""The embedding matrix read from the model's checkpoint, a block of rows at a time, and what the
article's "embedding space" picture needs from it: nearest neighbours by cosine similarity and a
2-D projection.

The matrix is read through the checkpoint's zero-copy tensor views (a block converted to float32
at a time, so an 8B model's 128256 × 4096 matrix never exists in float32 at once): float rows as
stored, gally-quant rows dequantized. A model loaded with a dtype conversion (dtype="bf16", or
"int8" quantized at load) computes with a rounded copy of these rows; the stored ones are what
the neighbours are measured on.
"""

from __future__ import annotations

import numpy as np

from .. import quantize, safetensors_file
from ..dtypes import as_float32

EMBEDDING = "model.embed_tokens"
BLOCK_ROWS = 8192  # 8192 × 4096 float32 = 128 MiB for the largest hidden sizes gally runs


class EmbeddingMatrix:
    """model.embed_tokens [vocab_size, hidden_size] of a model folder, read in row blocks."""

    def __init__(self, folder: str):
        self.folder = folder
        self._tensors = safetensors_file.open_checkpoint(folder)
        t = self._tensors
        if EMBEDDING + ".weight" in t:
            self.stored = t[EMBEDDING + ".weight"].dtype
            self.shape = tuple(t[EMBEDDING + ".weight"].shape)
        elif EMBEDDING + ".qweight" in t:
            q = t[EMBEDDING + ".qweight"]
            self.stored = "int4" if q.dtype == "U8" else "int8"
            rows, cols = q.shape
            self.shape = (rows, cols * 2 if self.stored == "int4" else cols)
        else:
            raise ValueError(f"{folder}: no tensor {EMBEDDING}.weight or {EMBEDDING}.qweight")

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start, hidden_size]: rows start … stop - 1."""
        t = self._tensors
        if self.stored not in ("int8", "int4"):
            return as_float32(self.stored, t[EMBEDDING + ".weight"].numpy()[start:stop])
        q = t[EMBEDDING + ".qweight"].numpy()[start:stop]
        scales = t[EMBEDDING + ".scales"].numpy()[start:stop].view(np.float16)
        if self.stored == "int8":
            return quantize.dequantize_int8(q, scales)
        mins = t[EMBEDDING + ".mins"].numpy()[start:stop].view(np.float16)
        if EMBEDDING + ".subscales" in t:  # int4 version 2: scales and mins per super-block
            return quantize.dequantize_int4(q, scales, mins, t[EMBEDDING + ".subscales"].numpy()[start:stop])
        return quantize.dequantize_int4_v1(q, scales, mins)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), hidden_size]: the rows of ids."""
        return np.concatenate([self.rows(int(i), int(i) + 1) for i in ids]) if len(ids) else \
            np.zeros((0, self.shape[1]), np.float32)

    def blocks(self):
        """(first row, float32 rows) over the whole matrix, BLOCK_ROWS at a time."""
        for start in range(0, self.shape[0], BLOCK_ROWS):
            yield start, self.rows(start, min(start + BLOCK_ROWS, self.shape[0]))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), so a dot product is a cosine similarity."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def nearest_neighbours(matrix: EmbeddingMatrix, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """For each token of ids, the k other vocabulary rows of highest cosine similarity to its row,
    best first: (neighbour ids int64 [n, k], similarities float32 [n, k], the mean row norm of the
    whole vocabulary). Equal similarities are ordered by id, except at the k-th place."""
    ids = np.asarray(ids, dtype=np.int64)
    queries = unit_rows(matrix.take(ids))
    best_ids = np.zeros((len(ids), 0), np.int64)
    best_sim = np.zeros((len(ids), 0), np.float32)
    norm_sum = 0.0
    for start, block in matrix.blocks():
        norm_sum += float(np.linalg.norm(block, axis=1).sum(dtype=np.float64))
        sim = queries @ unit_rows(block).T  # [n, block rows]
        own = (ids >= start) & (ids < start + len(block))
        sim[np.flatnonzero(own), ids[own] - start] = -np.inf  # a token is not its own neighbour
        if sim.shape[1] > k:  # the block's k best, in no order, before the exact merge below
            cols = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            sim = np.take_along_axis(sim, cols, axis=1)
        else:
            cols = np.broadcast_to(np.arange(sim.shape[1]), sim.shape)
        all_ids = np.concatenate([best_ids, start + cols], axis=1)
        all_sim = np.concatenate([best_sim, sim], axis=1)
        # lexsort's last key is the primary one: similarity descending, then id ascending
        order = np.lexsort((all_ids, -all_sim), axis=1)[:, :k]
        best_ids = np.take_along_axis(all_ids, order, axis=1)
        best_sim = np.take_along_axis(all_sim, order, axis=1).astype(np.float32)
    return best_ids, best_sim, norm_sum / matrix.shape[0]


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors' coordinates on their two main axes of variation (principal components, from
    the SVD of the centred rows) and the fraction of the variance each axis holds."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    if len(vectors) < 2 or not np.any(centred):
        return np.zeros((len(vectors), 2), np.float32), np.zeros(2, np.float32)
    u, s, _ = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    coords = np.zeros((len(vectors), 2))
    m = min(2, len(s))
    coords[:, :m] = u[:, :m] * s[:m]
    share = np.zeros(2)
    share[:m] = s[:m] ** 2 / float((s ** 2).sum())
    return coords.astype(np.float32), share.astype(np.float32)
