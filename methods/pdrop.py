"""PyramidDrop (Xing et al., CVPR'25, https://arxiv.org/abs/2410.17247): multi-stage in-LLM pruning.

Official code: ``Cooperx521/PyramidDrop``, ``llava/model/modeling_llama_pdrop.py``
(``pdrop_forward``, ``pdrop_rank_drop``). What it does (``docs/methods.md`` 1 and 1b):

* after layers ``ℓ = 8, 16, 24`` (``layer_list``; the pruning happens before layer ``ℓ`` runs), the
  hidden states go through layer ``ℓ``'s ``input_layernorm``, ``q_proj``/``k_proj`` and RoPE on the
  current (renumbered) positions, and one query row is scored: the **last instruction token**'s
  ``softmax(q K^T / sqrt(d) + causal)``, head-mean, restricted to the image tokens;
* stage ``s`` keeps ``int(N * λ^s)`` of the original ``N`` image tokens (``λ = 0.5``: 288/144/72),
  top-k, sorted; positions are renumbered, and shifted by the dropped count during decoding.

Budget: the official scripts run ``λ = 0.5`` (``image_token_ratio_list [0.5, 0.25, 0.125]``); the schedules
behind the published 192 / 128 / 64 rows are not in the repository. ``budget: official`` reads a budget
``B`` as PyramidDrop's own knob: ``λ = B / N``, the first stage keeps ``B`` (at ``ratio = 0.5``: the
official scripts exactly; the paper's FLOPs at ``λ = 0.4 / 0.5 / 0.6`` are ``ratio = 0.6 / 0.5 / 0.4``,
``tests/test_flops.py``). ``lambda_`` set explicitly overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods.fastv import view_scores
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, per_layer_counts, scale_layer, solve_monotone
from methods.ranking import topk_sorted


def pdrop_counts(n: int, lam: float, n_stages: int) -> list[int]:
    """Official per-stage counts ``int(N * λ^s)``, ``s = 1..n_stages`` (at least 1)."""
    return [max(1, int(round(n * lam**s, 9))) for s in range(1, n_stages + 1)]


@dataclass
class PyramidDrop(InLLMMethod):
    """PyramidDrop: drop ``1 - λ`` of the image tokens at each stage, ranked by the last token's attention.

    Parameters
    ----------
    layer_list : list[int]
        Pruning layers (before these layers run), for a ``ref_layers``-deep LLM.
    lambda_ : float or None
        Per-stage keep ratio λ; stage ``s`` keeps ``int(N λ^s)``. ``None`` (default): ``1 - ratio`` with
        ``budget: official``; a number is used as-is with ``budget: official`` (the first stage then keeps
        ``int(N λ)``, recorded against ``B``).
    budget : str
        ``official`` (default): λ = ``lambda_`` or ``1 - ratio`` (module docstring); ``layer_mean``: λ solved
        so the mean over layers equals ``B = round(N (1 - ratio))`` (refused where the pruning layers cannot
        bring it that low: 144.75 at best with layers 8/16/24 of 32); ``after_prune``: the first stage keeps
        ``B`` and λ = B / N.
    renumber_positions : bool
        Official: renumber (True).
    """

    layer_list: list[int] = field(default_factory=lambda: [8, 16, 24])
    lambda_: float | None = None
    renumber_positions: bool = True

    def selection_flops(self, cost) -> int:
        """Last token's row at each stage's layer, with that layer's k/q projections run on its input."""
        return cost.batch * sum(cost.attention_rows(t, 1, True) for _, _, t, _ in cost.llm_stages(self))

    def layers_for(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, self.ref_layers) for x in self.layer_list]

    def schedule_lambda(self, n_vis: int, n_layers: int) -> float:
        layers = self.layers_for(n_layers)
        if self.budget == "official":
            return 1.0 - self.prune_ratio if self.lambda_ is None else float(self.lambda_)
        target = self.target(n_vis)
        if self.budget == "after_prune":
            return target / n_vis

        def mean(lam: float) -> float:
            counts = pdrop_counts(n_vis, lam, len(layers))
            return sum(per_layer_counts(list(zip(layers, counts)), n_vis, n_layers)) / n_layers

        lam = solve_monotone(mean, target, 0.0, 1.0)
        self._warn_infeasible(mean(lam), target, n_layers)
        return lam

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0 and not (self.budget == "official" and self.lambda_ is not None):
            return []
        layers = self.layers_for(n_layers)
        lam = self.schedule_lambda(n_vis, n_layers)
        counts = pdrop_counts(n_vis, lam, len(layers))
        if self.budget == "after_prune":
            counts[0] = self.target(n_vis)
        counts = [min(c, n_vis) for c in counts]
        for i in range(1, len(counts)):
            counts[i] = min(counts[i], counts[i - 1])
        return [Stage(layer, c, self.renumber_positions) for layer, c in zip(layers, counts)]

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        attn, _ = view.attn_rows(stage.layer, "last")  # layer ℓ's own projections on its input
        return StageOut(topk_sorted(view_scores(view, attn[:, :, -1]), stage.n_keep))
