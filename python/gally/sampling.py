"""Sampling: one step's logits in, the next token out.

A chain of small pure functions, applied in the order of transformers' logits processors:

    repetition penalty → presence/frequency penalties → temperature → top-k → top-p → min-p → draw

Temperature 0 (or top_k == 1) is greedy: argmax of the penalised logits. The filters pass
candidate sets `(ids, logits)` along, `ids is None` meaning "the whole vocabulary, in order", so
that after top-k every later step costs O(k) instead of O(vocab); a filter that keeps most of a
whole vocabulary masks the rest instead (logit + MASKED, probability 0). Nothing here sorts the whole
vocabulary on the common paths: a decode step of a 135M model takes ~10 ms, and sampling a 49k-150k
vocabulary must stay a small fraction of that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from .options import DEFAULTS

Candidates = tuple[Optional[np.ndarray], np.ndarray]  # (token ids or None for all, logits float32)
MASKED = np.float32(np.finfo(np.float32).min)  # added to a filtered-out logit


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The decoding strategy. Defaults are options.py's (llama.cpp's; a model's
    generation_config.json overrides them)."""

    temperature: float = DEFAULTS["temperature"]
    top_k: int = DEFAULTS["top_k"]                # 0 disables
    top_p: float = DEFAULTS["top_p"]              # 1 disables
    min_p: float = DEFAULTS["min_p"]              # 0 disables
    repetition_penalty: float = DEFAULTS["repetition_penalty"]
    presence_penalty: float = DEFAULTS["presence_penalty"]
    frequency_penalty: float = DEFAULTS["frequency_penalty"]

    def __post_init__(self):
        _check_number(self.temperature, "temperature", low=0.0)
        _check_int(self.top_k, "top_k", low=0)
        _check_number(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_number(self.min_p, "min_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        _check_number(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check_number(self.presence_penalty, "presence_penalty")
        _check_number(self.frequency_penalty, "frequency_penalty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _check_number(value, name: str, low: Optional[float] = None) -> None:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low:g}, got {value!r}")


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def make_rng(seed: Optional[int]) -> np.random.Generator:
    """A reproducible random stream for `seed`; fresh OS entropy when seed is None."""
    if seed is not None:
        _check_int(seed, "seed", low=0)
    return np.random.default_rng(seed)


# ---- logits processors: full-vocabulary logits in, logits out ----

def apply_repetition_penalty(logits: np.ndarray, context_ids: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL / transformers: a token already in the context (prompt + generated) has its logit
    divided by `penalty` when positive and multiplied when negative, so penalty > 1 always lowers it."""
    if penalty == 1.0 or len(context_ids) == 0:
        return logits
    out = logits.copy()
    x = out[context_ids]
    out[context_ids] = np.where(x > 0, x / np.float32(penalty), x * np.float32(penalty))
    return out


def apply_presence_frequency_penalty(logits: np.ndarray, generated_ids: np.ndarray, counts: np.ndarray,
                                     presence: float, frequency: float) -> np.ndarray:
    """OpenAI: logit[j] -= count[j] · frequency + (count[j] > 0) · presence, where count[j] is how
    often token j was generated so far. generated_ids are distinct, counts[i] belongs to generated_ids[i]."""
    if (presence == 0 and frequency == 0) or len(generated_ids) == 0:
        return logits
    out = logits.copy()
    out[generated_ids] -= (counts * np.float32(frequency) + np.float32(presence)).astype(np.float32)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T): T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits if temperature == 1.0 else logits * np.float32(1.0 / temperature)


# ---- filters: candidates in, fewer candidates out ----

def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices, unordered, of a set holding the k largest values (all values >= some threshold).
    np.argpartition over 49k floats costs ~0.7 ms; estimating the threshold from a strided sample
    of ~1024 values and masking costs ~30 µs. Falls back to argpartition when the estimate misses."""
    n = len(values)
    if n < 8192 or 4 * k >= n:
        return np.argpartition(values, n - k)[n - k:]
    sample = values[::n // 1024]
    want = min(len(sample), 2 * k * len(sample) // n + 8)  # ~2k + margin expected above the threshold
    threshold = np.partition(sample, len(sample) - want)[len(sample) - want]
    idx = np.flatnonzero(values >= threshold)
    if len(idx) < k:
        return np.argpartition(values, n - k)[n - k:]
    return idx


def _take(cands: Candidates, keep: np.ndarray) -> Candidates:
    ids, logits = cands
    return (keep if ids is None else ids[keep]), logits[keep]


def top_k_filter(cands: Candidates, k: int) -> Candidates:
    """Keeps the k largest logits (and any tied with the k-th, as transformers does)."""
    logits = cands[1]
    if k == 0 or k >= len(logits):
        return cands
    values = logits[_largest(logits, k)]
    kth = np.partition(values, len(values) - k)[len(values) - k]
    return _take(cands, np.flatnonzero(logits >= kth))


def top_p_filter(cands: Candidates, p: float) -> Candidates:
    """Nucleus: the fewest most-likely tokens whose probability mass reaches p (a token is kept when
    the mass of the tokens more likely than it is below p). A full sort of 150k logits costs ~11 ms,
    so only the tokens near the cut get sorted: all of them when few (after top-k), the 64 or 512
    largest when they hold mass p (peaked distributions), else a band around a cut estimated from
    a strided sample (flat ones), whose result is a threshold: logits below it become -inf."""
    logits = cands[1]
    n = len(logits)
    if p >= 1.0 or n == 1:
        return cands
    weights = np.exp(logits - logits.max())
    target = p * float(weights.sum())
    if n <= 2048:
        return _take(cands, _nucleus(logits, weights, np.arange(n), target))
    for size in (64, 512):
        idx = _largest(logits, size)
        if float(weights[idx].sum()) >= target:
            return _take(cands, _nucleus(logits, weights, idx, target))
    threshold, size = _nucleus_threshold(logits, weights, target)
    if 8 * size <= n:  # a nucleus of a few thousand: the draw is cheaper over its ids alone
        return _take(cands, np.flatnonzero(logits >= threshold))
    return cands[0], _mask_below(logits, threshold)


def _mask_below(logits: np.ndarray, threshold) -> np.ndarray:
    """Logits below threshold pushed to ~float32 min, whose probability is exactly 0. Adding a
    masked constant costs a quarter of np.where and a third of selecting a large index set."""
    return logits + (logits < threshold) * MASKED


def _nucleus(logits: np.ndarray, weights: np.ndarray, idx: np.ndarray, target: float) -> np.ndarray:
    """The prefix of idx, sorted by logit descending, whose weights first reach target (at least one)."""
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    mass = np.cumsum(weights[idx], dtype=np.float64)
    return idx[:min(int(np.searchsorted(mass, target, side="left")) + 1, len(idx))]


def _nucleus_threshold(logits: np.ndarray, weights: np.ndarray, target: float) -> tuple[np.float32, int]:
    """(the smallest logit of the nucleus, the nucleus' size), found in a band lo <= logit <= hi that brackets the cut:
    estimated from ~2048 sampled logits, checked with exact masses (mass above hi < target <= mass
    at or above lo) and moved outwards until it holds; only the band gets sorted. Masses are dot
    products with the masks: boolean indexing a half-selected array costs 30x more."""
    n = len(logits)
    sample = np.sort(logits[::max(1, n // 2048)])[::-1]
    sample_mass = np.cumsum(np.exp(sample - sample[0]), dtype=np.float64)
    q = int(np.searchsorted(sample_mass * (float(weights.sum()) / sample_mass[-1]), target))
    last, step = len(sample) - 1, 16
    i = max(q - step, 0)
    while True:
        above = logits > sample[i]
        mass_above = float(np.dot(weights, above))
        if mass_above < target:
            break
        if i == 0:  # the nucleus lies above the largest sampled logit
            kept = _nucleus(logits, weights, np.flatnonzero(above), target)
            return logits[kept[-1]], len(kept)
        i, step = max(i - 4 * step, 0), 4 * step
    i, step = min(q + 16, last), 16
    while True:
        at_least = logits >= sample[i]
        if float(np.dot(weights, at_least)) >= target:
            break
        if i == last:  # the cut lies below the smallest sampled logit
            at_least[:] = True
            break
        i, step = min(i + 4 * step, last), 4 * step
    band = np.flatnonzero(at_least & ~above)
    kept = _nucleus(logits, weights, band, target - mass_above)
    return logits[kept[-1]], int(np.count_nonzero(above)) + len(kept)


def min_p_filter(cands: Candidates, min_p: float) -> Candidates:
    """Keeps tokens with probability >= min_p · (top probability), i.e. logit >= max + log(min_p)."""
    logits = cands[1]
    if min_p == 0.0:
        return cands
    return _take(cands, np.flatnonzero(logits >= logits.max() + np.float32(math.log(min_p))))


# ---- the draw ----

def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """Index i with cumsum[i-1] <= u·total < cumsum[i] (so zero weights are never chosen). Large
    arrays go by blocks: block sums, then a cumsum inside one block; one cumsum over 150k floats
    would cost ~0.75 ms."""
    n, block = len(weights), 1024
    if n <= 4 * block:
        mass = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(mass, u * mass[-1], side="right")), n - 1)
    full = n // block
    sums = np.empty(full + 1, dtype=np.float64)
    sums[:full] = weights[:full * block].reshape(full, block).sum(axis=1, dtype=np.float64)
    sums[full] = weights[full * block:].sum(dtype=np.float64)
    mass = np.cumsum(sums)
    r = u * mass[-1]
    b = min(int(np.searchsorted(mass, r, side="right")), full)
    if b > 0:
        r -= mass[b - 1]
    part = weights[b * block:(b + 1) * block]
    j = int(np.searchsorted(np.cumsum(part, dtype=np.float64), r, side="right"))
    if j >= len(part):  # r landed past this block's sum by rounding: take its last possible token
        j = int(np.flatnonzero(part)[-1])
    return b * block + j


def draw(cands: Candidates, rng: np.random.Generator) -> int:
    """One token from softmax(logits) over the candidates."""
    ids, logits = cands
    weights = np.exp(logits - logits.max())
    i = _inverse_cdf(weights, rng.random())
    return i if ids is None else int(ids[i])


_NO_IDS = np.empty(0, np.int64)
_NO_COUNTS = np.empty(0, np.int32)


def check_finite(logits: np.ndarray) -> None:
    """Raises ValueError when logits hold a NaN or +inf, or no finite value: the model's weights or
    config are corrupt, and no token may be drawn from them. (-inf alone is a banned token.)"""
    top = logits.max()
    if not -np.inf < top < np.inf:  # NaN fails both comparisons
        bad = int(np.count_nonzero(~np.isfinite(logits)))
        raise ValueError(f"the model produced non-finite logits ({bad} of {len(logits)} are NaN or infinite): its "
                         f"weights or config are corrupt; gally.load(..., check_tensors=True) names a tensor that "
                         f"holds NaN or infinity")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           context_ids: np.ndarray = _NO_IDS, generated_ids: np.ndarray = _NO_IDS,
           generated_counts: np.ndarray = _NO_COUNTS) -> int:
    """The whole chain for one step. context_ids: distinct tokens of prompt + generated text (for
    the repetition penalty); generated_ids / generated_counts: distinct generated tokens and how
    often each appeared (for the presence and frequency penalties)."""
    check_finite(logits)
    logits = apply_repetition_penalty(logits, context_ids, params.repetition_penalty)
    logits = apply_presence_frequency_penalty(logits, generated_ids, generated_counts,
                                              params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    logits = apply_temperature(logits, params.temperature)
    cands = top_k_filter((None, logits), params.top_k)
    cands = top_p_filter(cands, params.top_p)
    cands = min_p_filter(cands, params.min_p)
    return draw(cands, rng)


class Sampler:
    """One generation's sampling state: parameters, random stream, and the token history the
    penalties need, kept incrementally so a step costs O(distinct tokens), not O(context)."""

    def __init__(self, params: SamplingParams, vocab_size: int, seed: Optional[int] = None,
                 prompt_ids: Sequence[int] = ()):
        self.params = params
        self.rng = make_rng(seed)
        self._track_context = params.repetition_penalty != 1.0
        self._track_generated = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        if self._track_context:
            self._seen = np.zeros(vocab_size, dtype=bool)
            self._context = np.empty(vocab_size, dtype=np.int64)  # distinct tokens, first n_context valid
            self._n_context = 0
            for t in prompt_ids:
                self._add_context(int(t))
        if self._track_generated:
            self._counts = np.zeros(vocab_size, dtype=np.int32)
            self._generated = np.empty(vocab_size, dtype=np.int64)
            self._n_generated = 0

    def _add_context(self, token: int) -> None:
        if not self._seen[token]:
            self._seen[token] = True
            self._context[self._n_context] = token
            self._n_context += 1

    def __call__(self, logits: np.ndarray) -> int:
        """Samples the next token and records it in the history."""
        context = self._context[:self._n_context] if self._track_context else np.empty(0, np.int64)
        if self._track_generated:
            generated = self._generated[:self._n_generated]
            counts = self._counts[generated]
        else:
            generated, counts = np.empty(0, np.int64), np.empty(0, np.int32)
        token = sample(logits, self.params, self.rng, context, generated, counts)
        if self._track_context:
            self._add_context(token)
        if self._track_generated:
            if self._counts[token] == 0:
                self._generated[self._n_generated] = token
                self._n_generated += 1
            self._counts[token] += 1
        return token


def logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax(logits)[token] and the n most likely (token, logprob) pairs, best first, of the
    model's own distribution (before penalties, temperature and filters, as OpenAI reports them)."""
    m = float(logits.max())
    lse = m + math.log(float(np.exp(logits - m).sum(dtype=np.float64)))
    top: list[tuple[int, float]] = []
    if n > 0:
        idx = _largest(logits, min(n, len(logits)))
        idx = idx[np.argsort(-logits[idx], kind="stable")][:n]
        top = [(int(i), float(logits[i]) - lse) for i in idx]
    return float(logits[token]) - lse, top
