"""FasterVLM: keep the patches the CLIP CLS token attends to most ([CLS] attention is all you need).

Paper: https://arxiv.org/abs/2412.01818 (code: Theia-4869/FasterVLM, ``llava_arch.py::encode_images``).
methods.md 1b: scores are the per-head CLS-query attention probabilities of CLIP ``attentions[-2]``,
averaged over heads, CLS key column dropped after the softmax (no renormalisation); top-T, emitted in
raster order (the official boolean mask keeps raster order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import PruningMethod, VisionContext


def cls_patch_attention(cls_attn: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """``(B, H, 1 + N)`` per-head CLS-row probabilities -> ``(B, N)`` head-reduced patch scores."""
    s = cls_attn.mean(dim=1) if reduce == "mean" else cls_attn.sum(dim=1)
    return s[:, 1:]


@dataclass
class FasterVLM(PruningMethod):
    """Top-``K`` patches by head-mean CLS attention at CLIP layer ``layer``, raster order.

    Parameters
    ----------
    layer : int
        Encoder layer whose attention scores the patches (``-2``, the LLaVA feature layer).
    """

    layer: int = -2

    requires_cls: ClassVar[bool] = True
    graph_safe: ClassVar[bool] = True

    def selection_flops(self, cost) -> int:
        """The CLS attention row of layer ``layer``, recomputed from its q/k (``bench.measure.flops.CostModel``)."""
        return 0 if self.prune_ratio == 0.0 else cost.batch * cost.vision_extras(self.needs)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"cls_attn:{self.layer}"})

    def score(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N)`` head-mean CLS attention (the CLS column removed after the softmax)."""
        s = cls_patch_attention(ctx.get(f"cls_attn:{self.layer}"))
        if s.shape[1] != vis.shape[1]:
            raise ValueError(f"fastervlm: {s.shape[1]} attention columns for {vis.shape[1]} visual tokens")
        return s
