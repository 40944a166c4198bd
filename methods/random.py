"""Random pruning: keep a uniformly random subset of the visual tokens.

The trivial baseline of methods.md section 1 ("Random: ``randperm(576)[:B]``, sorted"), which
UniPruneBench found to be a strong one. FastV with K=0 is the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import PruningMethod, VisionContext


@dataclass
class RandomPruning(PruningMethod):
    """Keep ``round(N * (1 - prune_ratio))`` tokens drawn by ``randperm(N)[:K]``, sorted.

    Each sample draws from its own generator seeded by ``ctx.sample_seeds[b]`` (derived from the run
    seed and the sample's identity), so a sample keeps the same tokens alone or in any batch.
    """

    def selection_flops(self, cost) -> int:
        """A seeded permutation: no matrix product."""
        return 0

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        b, n, _ = vis.shape
        k = self.n_keep(n)
        gen = torch.Generator(device="cpu")
        rows = []
        for s in ctx.sample_seeds.tolist():  # one generator per sample: batch-invariant by construction
            gen.manual_seed(int(s))
            rows.append(torch.randperm(n, generator=gen)[:k])
        return torch.stack(rows).sort(dim=1).values.to(vis.device)
