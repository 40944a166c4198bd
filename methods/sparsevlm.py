"""SparseVLM (Zhang et al., ICML'25, https://arxiv.org/abs/2410.04417): text-guided in-LLM sparsification.

Official code: ``Gumpest/SparseVLMs``, in ``llava/model/language_model/``: ``modelling_sparse_llama.py``
(``LlamaDynamicvitModel.forward``), ``score.py::attn_postprocess_topk``, ``utils.py::cluster_and_merge``. v1.5:

* *raters*: the text tokens (every token after the image) whose ``m = softmax_text(V T^T).mean(over visual)`` on
  the LLM input embeddings exceeds ``mean(m)``;
* at the scoring layers ``2, 6, 15`` (run on the full sequence) the raters' head-mean attention to the current
  visual block, averaged over raters, scores it, and the layer's *output* keeps ``topk(min(k_s, n_vis - 1))``,
  sorted: the pruned layers here are ``3, 7, 16`` (``Stage.layer`` = scoring layer + 1);
* *recycling*: the top ``int(0.3 * n_dropped) + 1`` dropped tokens by score are clustered (DPC-kNN, ``int(n / 10)
  + 1`` clusters, density jitter ``1e-6 * rand`` seeded per sample) and the cluster means follow the kept visual
  tokens, as visual tokens of the next stages (scored, kept or dropped like the others);
* positions are renumbered (``arange``); the KV cache of later layers holds only the kept tokens.

Official "192" keeps 300/200/110 selected + 9/4/3 merged -> 309/204/113 (32-layer mean 206.5). ``version: "2.0"`` (a
documented reconstruction, :mod:`methods.sparsevlm_parts`) keeps the original position ids, divides the rater
attention by RoPE's own, averages the 14 most text->visual heads and does not merge. Attention rows are recomputed
under SDPA from the layer's captured q/k (the text rows after the image), never the official full ``T x T`` map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.inllm import InLLMMethod, Stage, StageOut, StageView, scale_layer
from methods.ranking import topk_rank, topk_sorted
from methods.sparsevlm_parts import (  # noqa: F401 (density_jitter, pairwise_dist re-exported)
    VersionOptions, cluster_and_merge, density_jitter, merge_counts, padded_text_raters, pairwise_dist, recycle_inputs,
    recycling_flops, recycling_setup, scheduled_selected, scores_v2, stage_counts)

#: official selected counts per stage, by budget (v1.5 / v2.0)
SCHEDULES = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 64: (66, 34, 20)},
}


def text_raters(embeds: torch.Tensor, vis_start: torch.Tensor, n_vis: int, n_text: int, uniform_start: int | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """SparseVLM's raters: ``(B, T, D)`` LLM input embeddings -> ``(B, Q)`` bool over the last ``Q = n_text`` positions
    (text after the image): ``m = softmax_text(V T^T).mean(visual)``, a rater has ``m > mean(m)``. ``uniform_start``:
    the (host) image start shared by every sample (``None``: a left-padded batch, :func:`padded_text_raters`);
    ``dtype``: the raters as 1.0 / 0.0 weights of that dtype."""
    if uniform_start is None:
        return padded_text_raters(embeds, vis_start, n_vis, n_text, dtype)
    v = embeds.narrow(1, uniform_start, n_vis)
    m = (v @ embeds[:, embeds.shape[1] - n_text :].transpose(1, 2)).softmax(2).mean(1)  # (B, Q)
    mean = m.mean(1, keepdim=True)
    return m > mean if dtype is None else torch.gt(m, mean, out=m.new_empty(m.shape, dtype=dtype))  # no cast


@dataclass
class SparseVLM(VersionOptions, InLLMMethod):
    """SparseVLM: rater-guided selection at three LLM layers, with token recycling (v1.5).

    Parameters
    ----------
    version : {"1.5", "2.0"}
        ``"1.5"`` (default): renumbered positions, recycling. ``"2.0"``: original ids, RoPE-bias division, no merging.
    scoring_layers : list[int]
        Layers whose attention scores the tokens; their outputs are pruned (for ``ref_layers`` = 32).
    budget : str
        ``official`` (default): the published schedule of ``B = round(N (1 - ratio))`` (192/128/64; others scale the
        nearest by ``B / B_ref``), whose layer means with the recycled tokens are 206.5 / 145.4 / 82.3: recorded as
        ``budget_met: false`` with that mean. ``layer_mean`` / ``after_prune``: the nearest published shape scaled so
        the mean over layers (merged tokens included) / the count after the first pruned layer is ``B``.
    merge, renumber_positions : bool or None
        Recycling, renumbered positions (``None``: the version's, :attr:`merging`, :attr:`renumber`).
    n_heads : int
        Heads kept by 2.0's head selection.
    """

    version: str = "1.5"
    scoring_layers: list[int] = None  # type: ignore[assignment]
    merge: bool | None = None
    n_heads: int = 14
    renumber_positions: bool | None = None

    capture_offsets: ClassVar[tuple[int, ...]] = (-1,)
    official_measure: ClassVar[str] = "layer_mean"
    official_is_table: ClassVar[bool] = True
    #: visual tokens ``SCHEDULES`` count from (LLaVA-1.5's 576); on a model with another ``N`` they scale by ``N / 576``
    ref_tokens: ClassVar[int] = 576

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalise_options(tuple(SCHEDULES), [2, 6, 15])

    def selection_flops(self, cost) -> int:
        """Rater matrix ``V T^T`` (once), rows after the image from the captured q/k at each stage, v2.0's RoPE-only
        bias, and the recycling (:func:`methods.sparsevlm_parts.recycling_flops`)."""
        d, q, stages = cost.llm_width, cost.after_image_rows, list(cost.llm_stages(self))
        total = 2 * cost.n_visual * q * d if stages else 0  # the raters, once
        for _, st, t, n_vis in stages:
            total += cost.attention_rows(t, q, False) + (2 * q * cost.llm_head_dim * t if self.version == "2.0" else 0)
            total += recycling_flops(n_vis, st.n_selected, st.n_keep - st.n_selected, d)
        return cost.batch * total

    def layers_for(self, n_layers: int) -> list[int]:
        """Pruned layers (scoring layer + 1), scaled for the model depth."""
        return [min(scale_layer(x, n_layers, self.ref_layers) + 1, n_layers - 1) for x in self.scoring_layers]

    def selected_counts(self, n_vis: int, n_layers: int) -> list[int]:
        """Selected tokens per stage: the published schedule nearest the budget (``SCHEDULES``), scaled (``budget``)."""
        return scheduled_selected(SCHEDULES[self.version], self.ref_tokens, n_vis, self.layers_for(n_layers), n_layers,
                                  self.target(n_vis), self.budget, self.merging, self._warn_infeasible)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0:
            return []
        counts = stage_counts(self.selected_counts(n_vis, n_layers), n_vis, self.merging)
        return [Stage(layer, k + c, self.renumber, n_select=k) for layer, (k, _, c) in zip(self.layers_for(n_layers), counts)]

    def runtime_setup(self, plan: list[Stage], prepared, device) -> dict:
        """The recycling's per-stage density jitter (seeded per sample) and cluster ids, built once outside the forward."""
        return recycling_setup(plan, prepared, device) if self.merging else {}

    def scores(self, view: StageView, layer: int) -> torch.Tensor:
        """``(B, n_vis)`` rater-averaged head-mean attention of ``layer`` to the current visual block."""
        attn, _ = view.attn_rows(layer, "after_image")  # (B, H, Q, T)
        w, count = self.raters(view, attn.shape[2])
        if self.version == "2.0":
            return scores_v2(view, layer, attn, w, count, self.n_heads)
        a = view.visual(attn.mean(1), dim=-1)  # (B, Q, n), the model's dtype
        return (a * w.unsqueeze(-1)).sum(1) / count  # fp32: ``w`` promotes the product (no separate cast)

    def raters(self, view: StageView, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Q)`` fp32 rater weights and ``(B, 1)`` their count, once per prefill (the input embeddings')."""
        if "sparsevlm_raters" not in view.state:
            e = view.input_embeds()
            n0 = e.shape[1] - (view.hidden.shape[1] - view.n_vis)  # original visual count (stage 0: n_vis)
            w = text_raters(e, view.vis_start, n0, n_text, view.vis_start_min if view.uniform_start else None, torch.float32)
            view.state["sparsevlm_raters"] = (w, w.sum(1, keepdim=True).clamp(min=1))
        return view.state["sparsevlm_raters"]

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        s = self.scores(view, stage.layer - 1)
        k = stage.n_selected
        m = stage.n_keep - k
        if m <= 0:
            return StageOut(topk_sorted(s, k))
        cand, _ = merge_counts(view.n_vis, k)
        # kept sorted by index, then the candidates in the official topk order (it orders the jitter and ties)
        keep, recycled = topk_rank(s, k, cand)
        x = view.visual(view.hidden).gather(1, recycled.unsqueeze(-1).expand(-1, -1, view.hidden.shape[-1]))
        return StageOut(keep, cluster_and_merge(x, m, *recycle_inputs(view.static, i, x.dtype)))
