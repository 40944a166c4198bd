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
-> 64 ``[23] * 6 + [22] * 17`` (:mod:`methods.tome_parts`). An explicit ``r`` (int or per-block list) may be
configured instead.

The merge adds the sources into their destinations with a one-hot GEMM instead of ToMe's ``scatter_reduce``
(a float atomic add on CUDA, whose order changes from run to run): the same sums, deterministic, so the
merging tower replays from a CUDA graph bit for bit. The block loop that calls this rule inside the tower is
``bench.models.vision_merge.encode_with_merging``; fast paths in :mod:`kernels.tome`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kernels import HALF, fast_path
from methods.base import PruningMethod, VisionContext, VisualSelection
from methods.tome_parts import per_block_r, tome_schedule  # noqa: F401 (tome_schedule re-exported)


@dataclass
class Match:
    """One block's matching of A (even rows) to B (odd rows) of ``T`` tokens, ``T1 = ceil(T / 2)``."""

    node_idx: torch.Tensor  #: ``(B, T1)`` each A token's best B token
    unm_idx: torch.Tensor  #: ``(B, T1 - r)`` unmerged A tokens in output order (by index with a CLS token, kept first)
    src_idx: torch.Tensor  #: ``(B, r)`` the merged A tokens, best match first (ToMe's edge order)


@fast_path("kernels.tome:normalize")
def normalize(metric: torch.Tensor) -> torch.Tensor:
    """``(B, T, D)`` rows scaled to unit L2 norm (cosine similarity as a matrix product)."""
    return metric / metric.norm(dim=-1, keepdim=True)


@fast_path("kernels.tome:match")
def match(scores: torch.Tensor, r: int, class_token: bool) -> Match:
    """ToMe's matching on ``(B, T1, T2)`` A-to-B similarities: each A token's best B token; the ``r`` A tokens
    with the highest best similarity merge (the CLS row, with ``class_token``, never does)."""
    if class_token:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if class_token:
        unm_idx = unm_idx.sort(dim=1).values
    return Match(node_idx, unm_idx, src_idx)


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool) -> Match | None:
    """ToMe's matching on the ``(B, T, d)`` metric; ``None`` when nothing merges (``r`` is capped at half the
    unprotected tokens)."""
    t = metric.shape[1]
    r = min(r, (t - (1 if class_token else 0)) // 2)
    if r <= 0:
        return None
    metric = normalize(metric)
    a, b = metric[:, ::2], metric[:, 1::2]
    return match(a @ b.transpose(-1, -2), r, class_token)


def merge_sum(x: torch.Tensor, m: Match | None) -> torch.Tensor:
    """``(B, T, C) -> (B, T - r, C)``: the unmerged A tokens, then the B tokens with their sources added in.

    The scatter-add as a one-hot GEMM: ToMe's ``scatter_reduce`` is a float atomic add on CUDA, whose
    order (and so rounding) changes from run to run.
    """
    if m is None:
        return x
    src_x, dst = x[:, ::2], x[:, 1::2]
    n, t1, c = src_x.shape
    r = m.src_idx.shape[1]
    unm_x = src_x.gather(1, m.unm_idx.unsqueeze(-1).expand(n, t1 - r, c))
    src_x = src_x.gather(1, m.src_idx.unsqueeze(-1).expand(n, r, c))
    dst_idx = m.node_idx.gather(1, m.src_idx)  # (B, r) each source's destination
    one_hot = torch.zeros(n, dst.shape[1], r, dtype=x.dtype, device=x.device).scatter_(1, dst_idx.unsqueeze(1), 1.0)
    return torch.cat([unm_x, torch.baddbmm(dst, one_hot, src_x)], dim=1)


@fast_path("kernels.tome:merge_wavg", on=("x",), dtypes=HALF)
def merge_wavg(x: torch.Tensor, size: torch.Tensor | None, m: Match | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: ``(B, T, C)``, ``(B, T, 1)`` sizes (``None``: all ones) -> merged ``x`` and summed sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge_sum(x * size, m)
    size = merge_sum(size, m)
    return x / size, size


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

    merges: ClassVar[bool] = True

    r: int | list[int] | None = None
    prop_attn: bool = True

    stage: ClassVar[str] = "in_vision"

    def selection_flops(self, cost) -> int:
        """In every merging block: the ``ceil(T/2) x floor(T/2)`` cosine on head-averaged keys, and the merge of
        the ``r`` sources, a one-hot ``(floor(T/2) x r) @ (r x C)`` GEMM for the features and one for the sizes."""
        blocks = cost.tome_blocks(self)
        if blocks is None:
            return 0
        total = 0
        for t, t_out in blocks:
            r = t - t_out
            if r > 0:
                total += 2 * ((t + 1) // 2) * (t // 2) * cost.vision_head_dim + 2 * (t // 2) * r * (cost.vision_width + 1)
        return cost.batch * total

    def schedule(self, n_tokens: int, n_blocks: int, class_token: bool) -> list[int]:
        """Per-block ``r`` for ``n_blocks`` blocks on ``n_tokens`` patches (CLS not counted)."""
        return per_block_r(self.r, n_tokens, self.n_keep(n_tokens), n_blocks, class_token)

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        raise NotImplementedError("tome merges inside the vision tower: the adapter runs it (bench.models.vision_merge)")
