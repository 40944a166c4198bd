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

* Ties: both rankings are the official ``argsort(dim=-1, descending=True)`` (torch's non-stable sort) on
  tensors of the official shapes, so exact ties (common with fp16 scores) break as the official code's on the
  same device and torch build: on the CPU not index order; on CUDA rows of 33-4096 entries sort stably (ties
  to the lower index), rows of up to 32 in a bitonic network. The CUDA kernel (:mod:`kernels.vispruner`)
  ranks stably, so it runs only the rounds whose sort is stable on CUDA and hands the residual list to these
  torch rounds from the first round that sorts 32 or fewer maxima (GPU-tested on tied inputs).
* Official defects handled (methods.md policy): it crashes when ``int(T * r)`` is odd (the even half then
  has one more token, used as such here); its ``prepare_inputs`` merges a batch of images into one
  sequence (every sample is separate here).
* The rounds' sizes depend on lengths only (:func:`dedup_rounds`): no host sync, CUDA-graph capturable.
  The cosines of all token pairs are one GEMM that every round indexes (the official code runs one GEMM per
  round on the gathered halves: the same dot products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from kernels import fast_path
from methods.base import PruningMethod, VisionContext
from methods.vispruner_parts import CUDA_BITONIC_MAX, dedup_rounds, handover_length  # noqa: F401 (re-exported)


def dedup(sim: torch.Tensor, res: torch.Tensor, n_div: int, step: int) -> torch.Tensor:
    """The de-duplication rounds on ``(B, N, N)`` similarities: ``(B, R)`` residual list -> ``(B, n_div)`` survivors.

    Batched, fixed shapes per round, no host synchronisation (CUDA-graph capturable). The max-cosine
    ranking is the official ``scores.argsort(dim=-1, descending=True)`` (torch's non-stable sort: ties
    break as the official code's do on the same device).
    """
    if n_div == 0:
        return res[:, :0]
    bi = torch.arange(res.shape[0], device=res.device).view(-1, 1, 1)
    for r in dedup_rounds(res.shape[1], n_div, step):
        ev, od = res[:, ::2], res[:, 1::2]
        best = sim[bi, ev.unsqueeze(-1), od.unsqueeze(1)].amax(dim=-1)
        survivors = best.argsort(dim=-1, descending=True)[:, r:]
        res = torch.cat([ev.gather(1, survivors), od], dim=1)
    return res


@fast_path("kernels.vispruner:head_rounds", on=("score", "sim"), nvrtc=True, name="cuda")
def head_rounds(score: torch.Tensor, sim: torch.Tensor, n_imp: int, n_list: int, step: int) -> torch.Tensor:
    """The score ranking and the de-duplication rounds down to ``n_list`` residual tokens.

    Returns ``(B, n_imp + n_list)``: the ``n_imp`` best scores (important) ascending, then the residual list
    (the rest in descending-score order of the official ``argsort(dim=-1, descending=True)``, non-stable:
    ties as the official code's on this device) after the rounds that bring it down to ``n_list``, in list
    order (:func:`dedup`).
    """
    order = score.contiguous().argsort(dim=-1, descending=True)
    return torch.cat([order[:, :n_imp].sort(dim=1).values, dedup(sim, order[:, n_imp:], n_list, step)], dim=1)


def vispruner_select(score: torch.Tensor, sim: torch.Tensor, n_imp: int, n_div: int, step: int = 8, backend: str = "auto") -> torch.Tensor:
    """``(B, N)`` scores and ``(B, N, N)`` cosine similarities -> ``(B, n_imp + n_div)`` sorted kept indices.

    :func:`head_rounds` (the CUDA kernel where ``backend`` allows) down to :func:`handover_length`, then the
    rounds left in torch (:func:`dedup`): the same as running every round in torch.
    """
    n_list = handover_length(score.shape[1] - n_imp, n_div, step)
    head = head_rounds.run(backend, score, sim, n_imp, n_list, step)
    return torch.cat([head[:, :n_imp], dedup(sim, head[:, n_imp:], n_div, step)], dim=1).sort(dim=1).values


def cosine_similarity(feats: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, N, N)`` cosine similarities of every token pair, in ``feats``' dtype."""
    xn = feats / feats.norm(dim=-1, keepdim=True)
    return xn @ xn.transpose(1, 2)


#: values of ``VisPruner.backend``
BACKENDS = ("auto", "torch", "cuda")


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
    backend : {"auto", "torch", "cuda"}
        Implementation (identical picks): ``cuda``, the selection after the similarity GEMM in one
        NVRTC-compiled kernel (:mod:`kernels.vispruner`), is ``auto``'s choice on CUDA; ``torch``
        (batched torch ops, a few kernels a round) everywhere else.
    """

    important_ratio: float = 0.5
    layer: int = -2
    step: int = 8
    backend: str = "auto"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"backend": BACKENDS}
    positive: ClassVar[tuple[str, ...]] = ("step",)
    requires_cls: ClassVar[bool] = True
    graph_safe: ClassVar[bool] = True
    select_reads_shape_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.important_ratio) <= 1.0:
            raise ConfigError(f"vispruner: important_ratio must be in [0, 1], got {self.important_ratio}")

    def selection_flops(self, cost) -> int:
        """The CLS row and the cosine matrix of all ``N`` patch features (one GEMM whose entries every round
        then indexes; the official code runs one smaller GEMM per round instead)."""
        if self.prune_ratio == 0.0:
            return 0
        return cost.batch * (cost.vision_extras(self.needs) + 2 * cost.n_visual * cost.n_visual * cost.vision_width)

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
        keep = self.n_keep(n)
        n_imp = int(keep * float(self.important_ratio))
        return vispruner_select(score, cosine_similarity(feats), n_imp, keep - n_imp, int(self.step), self.backend)
