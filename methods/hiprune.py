"""HiPrune: hierarchical attention pruning (anchors and buffers from an object layer, registers from a deep layer).

Paper: https://arxiv.org/abs/2508.00553 (code: Danielement321/HiPrune, ``LLaVA/llava/model/llava_arch.py::encode_images``).

methods.md 1b: the attention maps of layer ``object_layer - 1`` (``attentions[8]``) and of layer -2 are
averaged over heads and over all query rows (CLS query included), then the CLS key column is dropped.
Anchors: top ``round(T * alpha / 5)`` (Python ``round``) at the object layer; buffers: the anchors'
``+-1`` and ``+-W`` neighbours (``W`` = grid width), where ``+-1`` wraps across rows and clamping to
``[0, N - 1]`` can add tokens 0 and ``N - 1``; duplicates removed, so the number of registers varies per
image; registers fill the rest of the budget from the deep layer's ranking (taken tokens get their
score lowered by 1, as the official code does). Output in raster order.

Official defects handled here: the budget is divided by the batch size (here every sample keeps ``T``),
and ``.cuda()`` is hard-coded (here the tensors stay on their device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext


def sorted_true_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N)`` bool mask with ``k`` true entries per row -> ``(B, k)`` their ascending indices (no host sync)."""
    return (~mask).to(torch.int8).sort(dim=1, stable=True).indices[:, :k]


def hiprune_select(shallow: torch.Tensor, deep: torch.Tensor, n_keep: int, alpha: float, width: int) -> torch.Tensor:
    """``(B, N)`` object-layer and deep-layer scores -> ``(B, n_keep)`` sorted kept indices."""
    b, n = shallow.shape
    n_anchor = round(n_keep * alpha / 5)
    buf = torch.zeros(b, n, dtype=torch.bool, device=shallow.device)
    if n_anchor > 0:
        a = shallow.topk(n_anchor, dim=1).indices
        cand = torch.cat([a, a - 1, a + 1, a - width, a + width], dim=1).clamp(0, n - 1)
        buf.scatter_(1, cand, True)
    n_buf = buf.sum(dim=1)
    deep = deep - buf.to(deep.dtype)
    top = deep.topk(n_keep, dim=1).indices
    take = torch.arange(n_keep, device=deep.device).unsqueeze(0) < (n_keep - n_buf).unsqueeze(1)
    reg = torch.zeros_like(buf).scatter_(1, top, take)
    return sorted_true_indices(buf | reg, n_keep)


@dataclass
class HiPrune(PruningMethod):
    """HiPrune with the official defaults (alpha 0.1, object layer 9, deep layer -2).

    Per sample, on purpose: the official ``encode_images`` divides the token budget by the batch size (a batch
    of ``B`` images shares one budget ``T``); here every sample keeps its own ``T``, so a sample's tokens do not
    depend on its batch. Recorded in every run (``method_deviations``).

    Parameters
    ----------
    alpha : float
        Anchor share: ``round(T * alpha / 5)`` anchors.
    object_layer : int
        1-based object layer ``l`` (the official ``HIPRUNE_OBJECT_LAYER``); attention of encoder layer ``l - 1``.
    ref_layers : int
        Depth of the tower ``object_layer`` refers to (24, CLIP ViT-L); on a tower of another depth
        the layer index is scaled by ``depth / ref_layers`` (``bench.models.clip_extras``), identity on ViT-L.
    deep_layer : int
        Encoder layer of the register ranking (-2, the LLaVA feature layer).
    """

    alpha: float = 0.1
    object_layer: int = 9
    deep_layer: int = -2
    ref_layers: int = 24

    deviations: ClassVar[tuple[str, ...]] = (
        "per_sample_budget: the official code divides the budget by the batch size (the batch shares one budget); "
        "here every sample keeps its own budget",
    )
    graph_safe: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.object_layer) < 1:
            raise ConfigError(f"hiprune: object_layer is 1-based, got {self.object_layer}")

    def selection_flops(self, cost) -> int:
        """The full attention maps of the two layers, recomputed from their q/k (``bench.measure.flops.CostModel``)."""
        return 0 if self.prune_ratio == 0.0 else cost.batch * cost.vision_extras(self.needs)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"attn_colmean:{int(self.object_layer) - 1}@{int(self.ref_layers)}", f"attn_colmean:{self.deep_layer}"})

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, K)`` sorted indices."""
        n = vis.shape[1]
        shallow = ctx.get(f"attn_colmean:{int(self.object_layer) - 1}@{int(self.ref_layers)}")
        deep = ctx.get(f"attn_colmean:{self.deep_layer}")
        if ctx.has_cls:
            shallow, deep = shallow[:, 1:], deep[:, 1:]
        if shallow.shape[1] != n:
            raise ValueError(f"hiprune: {shallow.shape[1]} attention columns for {n} visual tokens")
        return hiprune_select(shallow, deep, self.n_keep(n), float(self.alpha), ctx.grid[1])
