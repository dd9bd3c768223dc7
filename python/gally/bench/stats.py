"""Mean ± sample standard deviation over repetitions, as llama-bench reports them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Stat:
    """Summary of one figure's repetitions. std is the sample (n - 1) standard deviation, 0 for one sample."""

    mean: float
    std: float
    samples: tuple

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stat":
        xs = tuple(float(x) for x in samples)
        if not xs:
            raise ValueError("a statistic needs at least one sample")
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        return cls(mean, math.sqrt(var), xs)

    def scaled(self, factor: float) -> "Stat":
        return Stat(self.mean * factor, self.std * abs(factor), tuple(x * factor for x in self.samples))

    def format(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "samples": list(self.samples)}


def rates(tokens: int, seconds: Sequence[float]) -> Stat:
    """tokens/s of each repetition, then their mean and spread (llama-bench's avg_ts, stddev_ts)."""
    for s in seconds:
        if s <= 0:
            raise ValueError(f"a timing must be positive, got {s!r} s")
    return Stat.of([tokens / s for s in seconds])
