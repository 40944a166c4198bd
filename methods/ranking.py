"""Ranking rules shared by the methods: top-k in index order, the k smallest values, DPC-kNN centre scores.

Each is the torch rule; on CUDA one Triton launch replaces it (:mod:`kernels.ranking`, chosen by
:mod:`kernels`' dispatch, tested equal). Rank rule of the kernel: a higher score first, equal scores by
the lower index, ``-0.0 == +0.0``, NaN above every number. ``torch.topk`` breaks ties by an unspecified
rule, so the two agree exactly whenever the scores around the ``k``-th are distinct.
"""

from __future__ import annotations

import torch

from kernels import fast_path


def _check_counts(n: int, k: int, extra: int) -> None:
    if k < 0 or extra < 0 or k + extra > n:
        raise ValueError(f"topk_rank: need 0 <= k, 0 <= extra, k + extra <= N; got k={k}, extra={extra}, N={n}")


@fast_path("kernels.ranking:topk_rank", on=("scores",))
def topk_rank(scores: torch.Tensor, k: int, extra: int = 0, *, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` best scores per row in index order, and of the next ``extra`` in rank order.

    Parameters
    ----------
    scores : torch.Tensor
        ``(B, N)``.
    k, extra : int
        ``k >= 0``, ``extra >= 0``, ``k + extra <= N``.
    largest : bool
        ``False``: the smallest score ranks first (the negated scores, an exact negation).

    Returns
    -------
    keep : torch.LongTensor
        ``(B, k)``: ranks ``0 .. k-1``, sorted ascending by index.
    rest : torch.LongTensor
        ``(B, extra)``: ranks ``k .. k+extra-1``, in rank order.
    """
    _check_counts(scores.shape[1], k, extra)
    if not largest:
        scores = scores.neg()
    if k == 0:
        rest = scores.topk(extra, dim=1).indices
        return rest.new_empty(rest.shape[0], 0), rest
    if extra == 0:  # the set is all that is needed: an unordered ``topk`` (one kernel less on CUDA)
        keep = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        return keep, keep.new_empty(keep.shape[0], 0)
    top = scores.topk(k + extra, dim=1).indices
    return top[:, :k].sort(dim=1).values, top[:, k:]


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N) -> (B, k)``: indices of the ``k`` largest scores, sorted (the in-LLM methods' selection)."""
    return topk_rank(scores, k)[0]


@fast_path("kernels.ranking:smallest_sorted", on=("x",))
def smallest_sorted(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., N) -> (..., k)``: the ``k`` smallest values of each row, ascending."""
    return x.topk(k, dim=-1, largest=False).values


@fast_path("kernels.ranking:dpc_scores", on=("dist", "density"))
def dpc_scores(dist: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """DPC-kNN centre scores ``(B, M)``: ``density * (distance to the nearest denser token)``.

    ``dist`` ``(B, M, M)``, ``density`` ``(B, M)``. A token with no denser token takes the largest
    distance of its sample, as the official ``dist * mask + dist_max * (1 - mask)`` then ``min``.
    """
    b = dist.shape[0]
    higher = density[:, None, :] > density[:, :, None]
    dist_max = dist.flatten(1).max(-1).values.view(b, 1, 1)
    parent_dist = torch.where(higher, dist, dist_max).min(-1).values
    return parent_dist * density
