"""Uncertainty of leaderboard scores: confidence intervals, paired tests and tied ranks (pure numpy).

Every function here is deterministic (bootstraps use a fixed seed), so tables built from the same
per-document scores are identical byte for byte.

* :func:`score_interval`: a 95% interval for a mean of per-document scores. Scores that are all 0/1
  get the Wilson score interval (Wilson 1927; good coverage for accuracies near 0 or 1 at n = 100,
  where the normal interval is too narrow); other scores a percentile bootstrap of the mean.
* :func:`paired_test`: whether two runs differ on the *same* documents. 0/1 scores: McNemar's exact
  test (a two-sided binomial test on the discordant pairs); otherwise a paired bootstrap of the mean
  difference (Efron & Tibshirani 1993, 16.4: resample the centred differences).
* :func:`tied_ranks`: rank = 1 + the number of rows whose interval lies entirely above this row's
  (the "rank (UB)" of LMSYS Chatbot Arena, https://arxiv.org/abs/2403.04132): rows whose intervals
  overlap share a rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: two-sided 95%
Z95 = 1.959963984540054
ALPHA = 0.05
BOOTSTRAP_ITERS = 2000
BOOTSTRAP_SEED = 0


def is_binary(x: np.ndarray) -> bool:
    return bool(x.size) and bool(np.all((x == 0) | (x == 1)))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes out of ``n``."""
    if n <= 0:
        raise ValueError("wilson: n must be positive")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exact ends at k = 0 and k = n (the formula gives them up to rounding)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _bootstrap_means(x: np.ndarray, iters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = x.size
    out = np.empty(iters)
    step = max(1, 4_000_000 // max(n, 1))  # bounded memory for large splits
    for s in range(0, iters, step):
        e = min(iters, s + step)
        out[s:e] = x[rng.integers(0, n, size=(e - s, n))].mean(axis=1)
    return out


def bootstrap_interval(x: np.ndarray, iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``x``."""
    m = _bootstrap_means(np.asarray(x, dtype=float), iters, seed)
    lo, hi = np.quantile(m, [ALPHA / 2, 1 - ALPHA / 2])
    return float(lo), float(hi)


def score_interval(x: Sequence[float]) -> tuple[float, float, str]:
    """``(low, high, method)``: 95% interval of the mean of per-document scores ``x``."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        raise ValueError("score_interval: no scores")
    if is_binary(a):
        lo, hi = wilson(int(a.sum()), a.size)
        return lo, hi, "wilson"
    lo, hi = bootstrap_interval(a)
    return lo, hi, "bootstrap"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap_p(d: np.ndarray, iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided p-value of mean(d) = 0 from the bootstrap of the centred differences."""
    d = np.asarray(d, dtype=float)
    obs = abs(d.mean())
    if np.all(d == d[0]):
        return 1.0 if obs == 0 else 0.0
    m = _bootstrap_means(d - d.mean(), iters, seed)
    return float((np.sum(np.abs(m) >= obs - 1e-15) + 1) / (iters + 1))


def paired_test(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, str]:
    """``(mean(x) - mean(y), p, test)`` for scores of two runs on the same documents (same order)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired_test: two non-empty score vectors of one length are needed")
    delta = float(a.mean() - b.mean())
    if is_binary(a) and is_binary(b):
        return delta, mcnemar_exact(int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))), "mcnemar_exact"
    return delta, paired_bootstrap_p(a - b), "paired_bootstrap"


def tied_ranks(low: Sequence[float], high: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Rank of each interval: 1 + the number of intervals entirely better than it (overlaps tie)."""
    lo, hi = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if higher_is_better:
        return [int(1 + np.sum(lo > h)) for h in hi]
    return [int(1 + np.sum(hi < l)) for l in lo]
