"""PruMerge's adaptive (IQR) budget and PruMerge+'s spatial samples: the official fixed and adaptive modes, and the
``dedup`` correction, in plain torch.

The rule that calls them is :class:`methods.prumerge.PruMergePlus` (official
``clip_encoder.py::token_prune_merge_advanced_plus``).

PruMerge+'s official fixed mode (``if_adaptive=False``): the top ``L`` by score (descending), then the spatial
samples ``arange(int(s / 2), N - 1, s)`` with ``s = int(1 / ρ)``, ``ρ = L / N``, taken from **all** tokens, so a
sample already in the top-``L`` is kept twice (its two centres are equal) and, as the official ``complement_idx``
drops as many entries as there are kept ones, the ``d`` lowest-index tokens of the complement (``d`` = the number of
duplicates) silently vanish: they are neither kept, merged into the extra token, nor anyone's neighbour. The
official code only runs where the number of samples equals ``L`` (``2L + 1`` tokens, e.g. ``ρ = 1/8``: 72 + 72 + 1 =
145 on LLaVA-1.5); for other budgets the stride is the ``s`` with ``s = int(N / L)`` and ``L + len(samples) + 1 =
T`` (:func:`plus_split`), the same rule at the budget asked for. ``spatial: dedup`` is the corrected variant
instead: ``floor((T - 1) / 2)`` samples evenly spaced (half-stride offset) over the *not yet kept* tokens, no
duplicates, nothing lost.

The adaptive mode's official defects are handled per sample (methods.md policy): the official code computes the
outlier ratio over the whole batch flattened and PruMerge+'s "not already kept" filter against the whole batch's
indices (here per sample); adaptive PruMerge+ crashes without outliers (here ``int(1 / ratio)`` is taken as ``N``,
the top-k part empty) and for ``ratio > 1/3`` (stride 0; here at least 1).
"""

from __future__ import annotations

import functools
import math

import torch

from methods.base import VisualSelection


@functools.lru_cache(maxsize=None)
def plus_split(n: int, total: int) -> tuple[int, int]:
    """PruMerge+'s official fixed split for ``total`` LLM tokens: ``(L, s)`` with ``L`` top tokens and the
    ``len(range(s // 2, n - 1, s))`` stride samples, ``L + samples + 1 = total`` and ``s = int(n / L)`` (the
    official ``s = int(1 / ρ)`` for ``ρ = L / n``). Where no stride satisfies that exactly, the stride whose
    ``int(n / L)`` is nearest (then the larger ``L``)."""
    m = total - 1
    best = None
    for s in range(1, n + 1):
        c = len(range(s // 2, n - 1, s))
        l = m - c
        if l < 1:
            continue
        key = (abs(n // l - s), -l)
        if best is None or key < best[0]:
            best = (key, l, s)
    if best is None:  # a budget of 1-2 tokens: no stride leaves a top token
        return max(m, 0), 0
    return best[1], best[2]


def official_plus_fixed(cls: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge+'s official fixed-mode selection: ``(B, N)`` scores -> ``idx`` ``(B, L + S)`` (top ``L`` by
    descending score, then the stride samples ``arange(s // 2, N - 1, s)`` of all tokens, duplicates kept)
    and ``rest`` ``(B, N - L - S)``: the official ``complement_idx`` (the tokens not in ``idx``, ascending,
    minus as many of the lowest as ``idx`` has duplicates)."""
    b, n = cls.shape
    l, s = plus_split(n, total)
    top = cls.topk(l, dim=1).indices
    if s == 0:
        samples = top.new_zeros(b, 0)
    else:
        samples = torch.arange(s // 2, n - 1, s, device=cls.device).expand(b, -1)
    idx = torch.cat([top, samples], dim=1)
    # complement_idx: zero the kept positions of arange(N), sort, drop the first len(idx) entries
    masked = torch.arange(n, device=cls.device).expand(b, n).scatter(1, idx, 0)
    rest = masked.sort(dim=1).values[:, idx.shape[1]:]
    return idx, rest


def spatial_fill(kept: torch.Tensor, n: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced (half-stride offset) tokens of those not in ``kept`` ``(B, L)``, raster order."""
    b = kept.shape[0]
    if count <= 0:
        return kept.new_zeros(b, 0)
    free = torch.ones(b, n, dtype=torch.bool, device=kept.device).scatter_(1, kept, False)
    rest = (~free).to(torch.int8).sort(dim=1, stable=True).indices[:, : n - kept.shape[1]]
    m = rest.shape[1]
    pos = ((torch.arange(count, device=kept.device, dtype=torch.float64) + 0.5) * (m / count)).long().clamp(max=m - 1)
    return rest[:, pos]


def adaptive_plus_samples(top: torch.Tensor, ratio: float, n: int) -> torch.Tensor:
    """PruMerge+'s spatial samples for one sample ``top`` ``(L,)``: ``arange(0, N-1, int(int(1/r)/3))`` minus ``top``."""
    step_length = int(1 / ratio) if ratio > 0 else n
    seq = torch.arange(0, n - 1, max(1, int(step_length / 3)), device=top.device)
    return seq[~torch.isin(seq, top)]


def outlier_ratio(scores: torch.Tensor) -> float:
    """Share of ``(N,)`` scores above ``Q3 + 1.5 * IQR`` (linear-interpolated percentiles as ``np.percentile``,
    here in float64): the official ``outlier_dectection``."""
    v = scores.detach().float().double()
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=torch.float64, device=v.device)).tolist()
    upper = q3 + 1.5 * (q3 - q1)
    return int((v > upper).sum()) / v.numel()


def adaptive_kept(cls: torch.Tensor, plus: bool) -> list[torch.Tensor]:
    """The adaptive budget's kept tokens per sample, in output order: ``(B, N)`` scores -> ``B`` tensors ``(L_b,)``,
    the top ``int(N * outlier_ratio)`` by descending score (then PruMerge+'s :func:`adaptive_plus_samples`)."""
    out = []
    for i in range(cls.shape[0]):
        ratio = outlier_ratio(cls[i])
        top = cls[i : i + 1].topk(int(cls.shape[1] * ratio), dim=1).indices[0]
        out.append(torch.cat([top, adaptive_plus_samples(top, ratio, cls.shape[1])]) if plus else top)
    return out


def padded_selection(rows: list[torch.Tensor], like: torch.Tensor) -> VisualSelection:
    """``B`` merged outputs ``(K_b, D)`` -> ``(B, max K_b, D)`` features in ``like``'s dtype and device, zero rows
    past each ``K_b`` (``n_kept``)."""
    out = like.new_zeros(len(rows), max(r.shape[0] for r in rows), rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.to(like.dtype)
    return VisualSelection(out, None, torch.tensor([r.shape[0] for r in rows], dtype=torch.long))


def plus_fixed(cls: torch.Tensor, total: int, spatial: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PruMerge+'s fixed-budget picks for ``total`` LLM tokens (the extra token included): ``spatial="official"``
    :func:`official_plus_fixed` (with its ``complement_idx``), ``"dedup"`` the top ``ceil(m / 2)`` of ``m = total - 1``
    by descending score then :func:`spatial_fill` of the rest (``rest`` ``None``: every token not kept)."""
    if spatial == "official":
        return official_plus_fixed(cls, total)
    m = total - 1
    top = cls.topk(math.ceil(m / 2), dim=1).indices
    return torch.cat([top, spatial_fill(top, cls.shape[1], m - math.ceil(m / 2))], dim=1), None


class AdaptiveBudget:
    """The adaptive budget's record keys and eagerness, mixed into :class:`methods.prumerge.PruMerge`."""

    @property
    def budget_mode(self) -> str:
        """``adaptive``: the official IQR budget (the kept count is the method's, not ``n_keep(N)``)."""
        return "pre_llm_exact" if self.budget == "fixed" else "adaptive"

    @property
    def graph_safe(self) -> bool:
        """The adaptive budget reads each sample's outlier count on the host (a value-dependent length): eager."""
        return self.budget == "fixed"
