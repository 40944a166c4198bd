"""FastV (Chen et al., ECCV'24, https://arxiv.org/abs/2403.06764): drop visual tokens inside the LLM.

Official code: ``pkunlp-icler/FastV``, ``LlamaModel.forward`` (``USE_FAST_V and FASTV_INPLACE``) and
``src/FastV/lmms-eval/fastv_kvcache.py``. What it does (``docs/methods.md`` 1 and 1b):

* score at layer ``K-1`` = head-mean of the **last prompt token's** attention row, over the image span;
* keep ``topk`` of those scores, sorted, from layer ``K`` on (0-indexed; ``K=2`` by default);
* position ids of the kept tokens stay the original ones;
* ``K=0`` drops tokens at random (seeded per sample);
* the KV-cache variant prunes once at prefill (the default here); the official in-place mode runs
  ``generate`` without a cache and re-prunes at every step, scored by the newest token
  (``reprune_every_step: true``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.inllm import InLLMMethod, Stage, StageOut, StageView, scale_layer, visual_columns
from methods.ranking import topk_sorted


def fastv_scores(attn_last: torch.Tensor, vis_start: torch.Tensor, n_vis: int) -> torch.Tensor:
    """FastV's score: head-mean of the last token's attention to each visual token.

    Parameters
    ----------
    attn_last : torch.Tensor
        ``(B, H, T)`` attention probabilities of the last token at layer ``K-1``.
    vis_start : torch.LongTensor
        ``(B,)`` first visual position.
    n_vis : int

    Returns
    -------
    torch.Tensor
        ``(B, n_vis)`` scores.
    """
    return visual_columns(attn_last.mean(dim=1), vis_start, n_vis)


def view_scores(view, attn_last: torch.Tensor) -> torch.Tensor:
    """:func:`fastv_scores` through the view (a slice instead of a gather when every image starts alike)."""
    visual = getattr(view, "visual", None)
    if visual is None:
        return fastv_scores(attn_last, view.vis_start, view.n_vis)
    return visual(attn_last.mean(dim=1), dim=-1)


def random_keep(seeds: torch.Tensor, n: int, k: int, device) -> torch.Tensor:
    """``(B,) seeds -> (B, k)``: ``randperm(n)[:k]`` per sample, sorted (FastV with ``K = 0``)."""
    gen = torch.Generator(device="cpu")
    rows = []
    for s in seeds.tolist():
        gen.manual_seed(int(s))
        rows.append(torch.randperm(n, generator=gen)[:k])
    return torch.stack(rows).sort(dim=1).values.to(device)


def one_stage_count(budget: str, target: int, n: int, layer: int, n_layers: int) -> int:
    """Tokens kept after a single pruning ``layer`` for the budget mode (``layer_mean`` solves the mean)."""
    if budget in ("after_prune", "official"):
        return max(1, min(n, target))
    keep = (n_layers * target - layer * n) / max(n_layers - layer, 1)
    return int(max(1, min(n, math.floor(keep + 0.5))))


@dataclass
class FastV(InLLMMethod):
    """FastV: prune by the last token's attention at layer ``K-1``.

    Parameters
    ----------
    k_layer : int
        ``K``: tokens are dropped from layer ``K`` on (scaled for LLMs shallower than ``ref_layers``).
        ``0`` drops at random before the first layer.
    reprune_every_step : bool
        Official in-place mode: ``generate`` without KV cache, re-pruning at each step (off: prune once).
    renumber_positions : bool
        Renumber the kept tokens' position ids (off: keep the original ids, as the official code).
    budget : str
        ``official`` (default; = ``after_prune``: keep ``B = round(N (1 - ratio))`` from layer ``K`` on, as
        the official code's ``topk(round(N (1 - R)))``), ``after_prune``, or ``layer_mean`` (the kept count
        makes the mean over layers ``B``: equal LLM compute with a pre-LLM method).
    """

    k_layer: int = 2
    reprune_every_step: bool = False
    renumber_positions: bool = False

    capture_offsets: ClassVar[tuple[int, ...]] = (-1,)

    def selection_flops(self, cost) -> int:
        """Last token's row at layer ``K-1`` from its captured q/k (``K = 0``: random, free)."""
        return cost.batch * sum(cost.attention_rows(t, 1, False) for _, st, t, _ in cost.llm_stages(self) if st.layer > 0)

    def layers_for(self, n_layers: int) -> list[int]:
        return [0 if self.k_layer == 0 else scale_layer(self.k_layer, n_layers, self.ref_layers)]

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0:
            return []
        (layer,) = self.layers_for(n_layers)
        target = self.target(n_vis)
        keep = one_stage_count(self.budget, target, n_vis, layer, n_layers)
        if self.budget == "layer_mean":
            self._warn_infeasible((layer * n_vis + (n_layers - layer) * keep) / n_layers, target, n_layers)
        return [Stage(layer, keep, self.renumber_positions)]

    def runtime_setup(self, plan: list[Stage], prepared, device) -> dict:
        """``K = 0``: the seeded random kept sets, drawn once outside the forward (no host copy inside it)."""
        if not plan or plan[0].layer != 0:
            return {}
        spans = prepared.extras["image_spans"]
        seeds = prepared.extras.get("sample_seeds", torch.zeros(spans.shape[0], dtype=torch.long))
        return {"random_keep": random_keep(seeds, int(spans[0, 1] - spans[0, 0]), plan[0].n_keep, device)}

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        if stage.layer == 0:
            keep = view.static.get("random_keep") if isinstance(getattr(view, "static", None), dict) else None
            if keep is None:
                keep = random_keep(view.sample_seeds, view.n_vis, stage.n_keep, view.hidden.device)
            return StageOut(keep)
        attn, _ = view.attn_rows(stage.layer - 1, "last")
        return StageOut(topk_sorted(view_scores(view, attn[:, :, -1]), stage.n_keep))
