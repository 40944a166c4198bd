"""The unpruned baseline: every visual token reaches the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import PruningMethod, Stage, VisionContext, VisualSelection


@dataclass
class NoPruning(PruningMethod):
    """Keep all ``N`` visual tokens. ``prune_ratio`` must be 0."""

    stage: ClassVar[Stage] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_ratio != 0.0:
            from bench.errors import ConfigError

            raise ConfigError(f"method=none keeps every token; it only runs at ratio=0, got ratio={self.prune_ratio}")

    def selection_flops(self, cost) -> int:
        """No selection."""
        return 0

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        b, n, _ = vis.shape
        idx = torch.arange(n, device=vis.device).expand(b, n)
        return VisualSelection(vis, idx, torch.full((b,), n, dtype=torch.long))
