"""DivPrune: diversity-based visual token pruning as a max-min diversity problem.

Paper: https://arxiv.org/abs/2503.02175 (code: vbdi/divprune, ``llava_arch.py::DivPrune``).
methods.md 1b: on the projected image tokens, ``D = 1 - cos``. The first pick is the column whose
second-smallest distance is largest (the most isolated token); every later pick is
``argmax_j min_{i in S} D[i, j]`` with first-index ties (already-selected tokens are not masked: their
self-distance of about 0 keeps them out). Kept tokens go to the LLM in raster order.

Official defects handled per sample here (documented, methods.md policy): the image start is
hard-coded at sequence position 35 (the adapter gives the real span), and batch element 0's
selection is applied to the whole batch (here every sample selects its own tokens).

The greedy loop keeps a running ``(B, N)`` min-distance vector, so a step is one argmax, one row
gather and one ``minimum`` for the whole batch, with no host synchronisation. ``min`` is exact, so the
running minimum equals the official ``min`` over the selected rows bit for bit. On CUDA the whole loop
is one kernel launch (:mod:`kernels.divprune`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from kernels import fast_path
from methods.base import PruningMethod, VisionContext


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, D)`` -> ``(B, N, N)`` ``1 - cos``, in ``x``'s dtype (as the official code)."""
    xn = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - torch.bmm(xn, xn.transpose(1, 2))


def first_pick(dist: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the column whose second-smallest entry is largest (``topk(2, largest=False)[1]``)."""
    return dist.topk(2, dim=1, largest=False).values[:, 1, :].argmax(dim=1)


@fast_path("kernels.divprune:greedy_maxmin")
def greedy_maxmin(dist: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N, N)`` distances -> ``(B, k)`` picks in pick order; batched, no host sync."""
    b, n, _ = dist.shape
    j = first_pick(dist)
    picks = [j]
    mind = dist.gather(1, j.view(b, 1, 1).expand(b, 1, n)).squeeze(1)
    for _ in range(k - 1):
        j = mind.argmax(dim=1)  # first index among ties, as torch.argmax in the official loop
        picks.append(j)
        mind = torch.minimum(mind, dist.gather(1, j.view(b, 1, 1).expand(b, 1, n)).squeeze(1))
    return torch.stack(picks, dim=1)


@dataclass
class DivPrune(PruningMethod):
    """Greedy max-min diversity selection of ``round(N * (1 - prune_ratio))`` projected tokens.

    Per sample, on purpose: the official ``LlavaMetaForCausalLM.DivPrune`` selects on batch element 0 and
    applies that choice to every image of the batch; here each sample selects its own tokens (a sample's
    kept tokens do not depend on its batch neighbours). Recorded in every run (``method_deviations``).

    Parameters
    ----------
    backend : {"auto", "torch", "triton"}
        Implementation of the greedy loop (identical picks); ``auto`` = the Triton kernel on CUDA.
    """

    backend: str = "auto"

    deviations: ClassVar[tuple[str, ...]] = (
        "per_sample_selection: the official code selects on batch element 0 and applies that choice to the whole batch; "
        "here every sample selects its own tokens",
    )
    graph_safe: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"divprune: backend must be auto, torch or triton, got {self.backend!r}")

    def selection_flops(self, cost) -> int:
        """The ``N x N`` cosine matrix of the projected tokens (``bmm`` of LLM-wide rows)."""
        return 0 if self.prune_ratio == 0.0 else cost.batch * 2 * cost.n_visual * cost.n_visual * cost.llm_width

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, D)`` projected tokens -> ``(B, K)`` sorted indices of the greedy max-min set."""
        k = self.n_keep(vis.shape[1])
        dist = cosine_distance(vis)
        return greedy_maxmin.run(self.backend, dist, k).sort(dim=1).values
