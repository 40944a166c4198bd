"""VisPruner: important tokens by CLS attention, then diverse tokens by iterative de-duplication.

Paper: https://arxiv.org/abs/2412.01818v2 (ICCV'25, "Beyond Text-Visual Attention"; code:
Theia-4869/VisPruner, ``llava/model/llava_arch.py::encode_images``).

methods.md 1b: important tokens are the top ``int(T * r)`` by the FasterVLM score (head-mean CLS
attention at CLIP layer -2, CLS column dropped). The remaining tokens are processed in score-sorted
order (``argsort(descending)``), not raster: each round splits that list into even and odd positions,
drops the ``min(8, R - T_div)`` even-position tokens with the highest max-cosine to the odd set
(normalised layer -2 patch features, before the projector), and puts the surviving even tokens, in
descending-score order of that argsort, in front of the odd ones for the next round, until
``T - int(T * r)`` remain. Kept tokens reach the LLM in raster order.

Official defects handled here (methods.md policy): it crashes when the residual list has odd length
(``int(T * r)`` odd): the even half then has one more token, which is used as such; and the official
``prepare_inputs`` merges a batch of images into one sequence: every sample is separate here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext


def vispruner_select(score: torch.Tensor, feats: torch.Tensor, n_keep: int, important_ratio: float, step: int = 8) -> torch.Tensor:
    """``(B, N)`` scores and ``(B, N, C)`` patch features -> ``(B, n_keep)`` sorted kept indices."""
    b, n, c = feats.shape
    n_imp = int(n_keep * important_ratio)
    n_div = n_keep - n_imp
    order = score.argsort(dim=-1, descending=True)
    imp, res = order[:, :n_imp], order[:, n_imp:]
    xn = feats / feats.norm(dim=-1, keepdim=True)
    while True:
        r_len = res.shape[1]
        r = min(step, r_len - n_div)
        if r <= 0:
            break
        tok = xn.gather(1, res.unsqueeze(-1).expand(-1, -1, c))
        a, bb = tok[:, ::2], tok[:, 1::2]
        best = (a @ bb.transpose(-1, -2)).max(dim=-1).values
        survivors = best.argsort(dim=-1, descending=True)[:, r:]
        res = torch.cat([res[:, ::2].gather(1, survivors), res[:, 1::2]], dim=1)
    return torch.cat([imp, res], dim=1).sort(dim=1).values


@dataclass
class VisPruner(PruningMethod):
    """Keep ``T = round(N * (1 - prune_ratio))`` tokens: ``int(T * important_ratio)`` important + the rest diverse.

    Parameters
    ----------
    important_ratio : float
        ``r``, the share of important tokens (0.5 official default; the README uses 0.75 at 64).
    layer : int
        CLIP layer of the CLS attention and of the features used for similarity (-2).
    step : int
        Even-position tokens dropped per de-duplication round (8).
    """

    important_ratio: float = 0.5
    layer: int = -2
    step: int = 8

    requires_cls: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.important_ratio) <= 1.0:
            raise ConfigError(f"vispruner: important_ratio must be in [0, 1], got {self.important_ratio}")
        if int(self.step) < 1:
            raise ConfigError("vispruner: step must be >= 1")

    @property
    def name(self) -> str:
        return "vispruner"

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"cls_attn:{self.layer}", f"hidden:{self.layer}"})

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, K)`` sorted indices (features come from ``hidden:<layer>``, CLS dropped)."""
        n = vis.shape[1]
        score = ctx.get(f"cls_attn:{self.layer}").mean(dim=1)[:, 1:]
        feats = ctx.get(f"hidden:{self.layer}")[:, 1:]
        if feats.shape[1] != n or score.shape[1] != n:
            raise ValueError(f"vispruner: tower tensors do not match the {n} visual tokens")
        return vispruner_select(score, feats, self.n_keep(n), float(self.important_ratio), int(self.step))
