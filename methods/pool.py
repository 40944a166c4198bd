"""2-D average pooling of the patch grid (the downsampling baseline of VTC-Bench).

methods.md section 1: "2-D average pooling of the 24x24 grid. 144 (12x12) and 64 (8x8) are exact;
for 192 use 16x12". For a general ratio the output grid ``(h, w)`` is the one whose ``h * w`` is
nearest ``round(N * (1 - prune_ratio))`` without elongated windows (see ``pooled_grid``), so the kept count can differ by a
few tokens from the nominal one; records state the measured count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import PruningMethod, VisionContext, VisualSelection


def pooled_grid(grid: tuple[int, int], target: int) -> tuple[int, int]:
    """Output grid ``(h, w)``, ``h <= H``, ``w <= W``, trading count error against squareness.

    Minimises ``|h*w - target| + |h - w| / 2`` (ties: the taller grid), so exact counts win unless the
    grid gets very elongated: 192 -> 16x12, 144 -> 12x12, 64 -> 8x8, 58 -> 8x7 rather than 19x3.
    """
    gh, gw = grid
    best: tuple[float, int] | None = None
    out = (gh, gw)
    for h in range(1, gh + 1):
        w = min(gw, max(1, int(round(target / h))))
        key = (abs(h * w - target) + abs(h - w) / 2, -h)
        if best is None or key < best:
            best, out = key, (h, w)
    return out


@dataclass
class Pool(PruningMethod):
    """Average-pool the ``(H, W)`` grid of projected features to ``pooled_grid(...)``.

    ``reduce`` maps ``(B, N, D) -> (B, h*w, D)``; tokens are merged, so ``kept_index`` is ``None``.
    """

    merges: ClassVar[bool] = True

    needs_grid: ClassVar[bool] = True

    def selection_flops(self, cost) -> int:
        """Average pooling: no matrix product."""
        return 0

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return pooled_grid(grid, self.n_keep(grid[0] * grid[1]))

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        b, n, d = vis.shape
        gh, gw = ctx.grid
        if n != gh * gw:
            raise ValueError(f"pool: {n} visual tokens do not form the {gh}x{gw} grid the adapter reports")
        if self.prune_ratio == 0.0:
            return VisualSelection(vis, torch.arange(n, device=vis.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
        h, w = self.output_grid(ctx.grid)
        x = vis.transpose(1, 2).reshape(b, d, gh, gw)
        # adaptive_avg_pool2d averages the same windows as the official 2-D pooling when the sizes
        # divide (24 -> 12, 8, 6); otherwise it uses PyTorch's standard overlapping windows.
        # pooled one sample at a time: batched kernels may sum windows in another order, and a sample's
        # tokens must not depend on its batch neighbours (bit for bit)
        y = torch.cat([F.adaptive_avg_pool2d(x[i : i + 1].float().contiguous(), (h, w)) for i in range(b)]).to(vis.dtype)
        feats = y.reshape(b, d, h * w).transpose(1, 2).contiguous()
        return VisualSelection(feats, None, torch.full((b,), h * w, dtype=torch.long))
