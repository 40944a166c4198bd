"""ToMe: token merging by bipartite soft matching inside the CLIP blocks (baseline).

Paper: https://arxiv.org/abs/2210.09461 (code: facebookresearch/ToMe, ``tome/merge.py::bipartite_soft_matching``,
``merge_wavg``; ``tome/patch/timm.py`` for the block and the proportional attention).

methods.md 1b: in every CLIP block up to the feature layer (blocks 0-22 for LLaVA's layer -2), after
the attention and before the MLP, the tokens are split alternately into A (even) and B (odd); each A
token's best match in B is found on the head-averaged keys (cosine); the ``r`` A tokens with the best
matches are merged into their B partners by size-weighted average (``merge_wavg``), sizes are
propagated, and the next blocks add ``log(size)`` to the attention logits (proportional attention).
The CLS token is never merged and stays row 0; token order is scrambled every block (unmerged A
tokens, then B); at most half of the non-CLS tokens merge per block; ``r = 0`` still returns
``x * size / size``. The per-block ``r`` is front-loaded so that the count lands exactly on
``round(N * (1 - prune_ratio))``: 576 -> 192 is ``[17] * 16 + [16] * 7``, -> 128 ``[20] * 11 + [19] * 12``,
-> 64 ``[23] * 6 + [22] * 17``. An explicit ``r`` (int or per-block list) may be configured instead.

The merge adds the sources into their destinations with a one-hot GEMM instead of ToMe's
``scatter_reduce`` (a float atomic add on CUDA, whose summation order changes from run to run): the same
sums, deterministic, so the merging tower can be replayed from a CUDA graph with bit-identical output.

This module holds the pure tensor functions and the schedule; the block loop that calls them inside
the tower is ``bench.models.vision_merge.encode_with_merging`` (``stage = "in_vision"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext, VisualSelection
from methods.select_kernels import topk_rank, use_kernel


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool) -> tuple[Callable, int]:
    """ToMe's matching on ``(B, T, d)`` metric; returns ``(merge, r_applied)``.

    ``merge(x, mode)`` maps ``(B, T, C)`` to ``(B, T - r, C)``: unmerged A tokens (CLS first, by
    ascending index when ``class_token``, else in descending-score order), then the B tokens with the
    merged A tokens reduced into them.
    """
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return (lambda x, mode="mean": x), 0
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    if class_token and use_kernel(node_max):
        # one launch instead of an argsort and a sort (~50 us a block at B=1 on an H100): the ``t/2 - r``
        # smallest in index order (unmerged, as the sort below leaves them) and the ``r`` largest, ascending,
        # reversed to ToMe's descending edge order; ties, unordered by ``argsort``, go by index
        unm, src = topk_rank(node_max, node_max.shape[1] - r, r, largest=False)
        unm_idx, src_idx = unm.unsqueeze(-1), src.flip(1).unsqueeze(-1)
    else:
        edge_idx = node_max.argsort(dim=-1, descending=True).unsqueeze(-1)
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        if class_token:
            unm_idx = unm_idx.sort(dim=1).values
    dst_idx = node_idx.unsqueeze(-1).gather(1, src_idx)
    # the scatter-add of the sources into their destinations as a one-hot GEMM: ToMe's scatter_reduce
    # is a float atomic add on CUDA, whose order (and so rounding) changes from run to run
    one_hot = torch.zeros(metric.shape[0], t // 2, r, dtype=metric.dtype, device=metric.device)
    one_hot.scatter_(1, dst_idx.transpose(1, 2), 1.0)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(1, unm_idx.expand(n, t1 - r, c))
        src = src.gather(1, src_idx.expand(n, r, c))
        oh = one_hot.to(x.dtype)
        dst = torch.baddbmm(dst, oh, src)
        if mode == "mean":  # scatter_reduce's "mean" counts the destination itself
            dst = dst / (1 + oh.sum(dim=2, keepdim=True))
        elif mode != "sum":
            raise ValueError(f"tome merge mode must be 'sum' or 'mean', got {mode!r}")
        return torch.cat([unm, dst], dim=1)

    return merge, r


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: ``(B, T, C)``, ``(B, T, 1)`` -> merged ``x`` and summed ``size``."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_schedule(n_tokens: int, n_keep: int, n_blocks: int, class_token: bool) -> list[int]:
    """Per-block ``r`` merging ``n_tokens`` patches down to ``n_keep`` over ``n_blocks``.

    ToMe merges at most half of the unprotected tokens in a block (its bipartite split). The merges are
    spread evenly (``ceil(left / blocks left)`` per block, close to ToMe's usual constant ``r``). When
    the halving cap makes the even split fall short (few blocks, small budgets: e.g. 576 -> 58 in the
    5 feature blocks of the embedded tower), the schedule is front-loaded instead: the smallest
    constant ``r`` that, capped at half per block, merges enough, with the last blocks trimmed to land
    on ``n_keep``. Raises when even merging half in every block cannot reach the budget.
    """
    protected = 1 if class_token else 0

    def even() -> list[int] | None:
        left, t, out = n_tokens - n_keep, n_tokens + protected, []
        for i in range(n_blocks):
            r = min(-(-left // (n_blocks - i)), (t - protected) // 2)
            out.append(r)
            left, t = left - r, t - r
        return None if left else out

    def capped(rc: int) -> list[int]:
        t, out = n_tokens + protected, []
        for _ in range(n_blocks):
            out.append(min(rc, (t - protected) // 2))
            t -= out[-1]
        return out

    out = even()
    if out is not None:
        return out
    need = n_tokens - n_keep
    if sum(capped(n_tokens)) < need:
        raise ConfigError(f"tome: cannot merge {n_tokens} tokens down to {n_keep} in {n_blocks} blocks (at most half per block)")
    lo, hi = 1, n_tokens  # smallest constant r whose capped schedule merges at least `need`
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(capped(mid)) >= need else (mid + 1, hi)
    out = capped(lo)
    extra = sum(out) - need
    for i in reversed(range(n_blocks)):  # trim from the back: earlier caps, hence feasibility, are unchanged
        cut = min(extra, out[i])
        out[i] -= cut
        extra -= cut
    return out


@dataclass
class ToMe(PruningMethod):
    """ToMe inside the vision tower.

    Parameters
    ----------
    r : int, list of int, or None
        Tokens merged per block; ``None`` = the front-loaded schedule landing on the budget.
    prop_attn : bool
        Proportional attention (``+ log(size)`` on the logits), as in ToMe.
    """

    r: int | list[int] | None = None
    prop_attn: bool = True

    stage: ClassVar[str] = "in_vision"

    @property
    def name(self) -> str:
        return "tome"

    def schedule(self, n_tokens: int, n_blocks: int, class_token: bool) -> list[int]:
        """Per-block ``r`` for ``n_blocks`` blocks on ``n_tokens`` patches (CLS not counted)."""
        if self.r is None:
            return tome_schedule(n_tokens, self.n_keep(n_tokens), n_blocks, class_token)
        if isinstance(self.r, int):
            return [int(self.r)] * n_blocks
        rs = [int(v) for v in self.r]
        if len(rs) != n_blocks:
            raise ConfigError(f"tome: r has {len(rs)} entries for {n_blocks} blocks")
        return rs

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        raise NotImplementedError("tome merges inside the vision tower: the adapter runs it (bench.models.vision_merge)")
