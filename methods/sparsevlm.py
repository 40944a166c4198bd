"""SparseVLM (Zhang et al., ICML'25, https://arxiv.org/abs/2410.04417): text-guided in-LLM sparsification.

Official code: ``Gumpest/SparseVLMs``, ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaDynamicvitModel.forward``), ``score.py::attn_postprocess_topk`` and
``utils.py::cluster_and_merge``. What v1.5 does (``docs/methods.md`` 1 and 1b):

* *raters*: on the LLM input embeddings, ``m = softmax_text(V T^T).mean(over visual)``; the text
  tokens (every token after the image) with ``m > mean(m)`` rate the visual tokens;
* at the scoring layers ``2, 6, 15`` the layer runs on the full sequence; its attention (head mean)
  from the rater rows to the current visual block, averaged over raters, scores the visual tokens,
  and the layer's *output* keeps ``topk(min(k_s, n_vis - 1))`` of them (sorted) — so layers
  ``3, 7, 16`` are the pruned ones here (``Stage.layer`` = scoring layer + 1);
* *recycling*: of the dropped tokens, the top ``int(0.3 * n_dropped) + 1`` by score are clustered
  (DPC-kNN, ``int(n / 10) + 1`` clusters, density jitter ``1e-6 * rand`` seeded per sample from the
  run seed) and the cluster means are placed right after the kept visual tokens; they are visual
  tokens of the next stages (scored, kept or dropped like the others);
* positions are renumbered (``arange``); the KV cache of later layers holds only the kept tokens.

Counts: official "192" keeps 300/200/110 selected + 9/4/3 merged -> 309/204/113 (32-layer mean 206.5).

SparseVLM 2.0 (``version: "2.0"``) keeps the original position ids, divides the rater attention by
the attention that RoPE alone would give (``softmax(rope(1)·rope(1)^T/sqrt(d))``), averages only the
14 heads with the most text->visual attention, and does not merge. The official 2.0 code was not in
the reference index; this branch follows ``methods.md``'s description (documented reconstruction).

Attention rows are recomputed under SDPA from the scoring layer's captured q/k (only the text rows
after the image), never the full ``T x T`` map the official "sdpa" class materializes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, scale_layer
from methods.ranking import topk_rank, topk_sorted
from methods.sparsevlm_parts import (  # noqa: F401 (merge_counts, pairwise_dist re-exported)
    cluster_and_merge,
    density_jitter,
    recycling_setup,
    merge_counts,
    pairwise_dist,
    scaled_selected,
    scores_v2,
    stage_counts,
)

#: official selected counts per stage, by budget (v1.5 / v2.0)
SCHEDULES = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 64: (66, 34, 20)},
}


def text_raters(embeds: torch.Tensor, vis_start: torch.Tensor, n_vis: int, n_text: int, uniform_start: int | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """SparseVLM's raters: ``(B, Q)`` bool over the last ``Q = n_text`` positions (text after the image).

    ``m = softmax_text(V T^T).mean(visual)``; a rater has ``m > mean(m)`` over the sample's own text.
    Positions of the last ``Q`` that lie before a (left padded) sample's text are never raters.
    ``uniform_start``: the (host) image start shared by every sample, if any (a slice, not a gather).
    ``dtype``: return the raters as 1.0 / 0.0 weights of that dtype (the comparison writes them: no cast).
    """
    b, t, _ = embeds.shape
    dev = embeds.device
    if uniform_start is not None:
        v = embeds.narrow(1, uniform_start, n_vis)
        text_valid = None
    else:
        idx = vis_start.view(-1, 1) + torch.arange(n_vis, device=dev).view(1, -1)
        v = embeds.gather(1, idx.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        text_valid = torch.arange(t - n_text, t, device=dev).view(1, -1) >= (vis_start + n_vis).view(-1, 1)
    txt = embeds[:, t - n_text :]
    logits = v @ txt.transpose(1, 2)  # (B, N, Q)
    if text_valid is not None:
        logits = logits.masked_fill(~text_valid.unsqueeze(1), float("-inf"))
    m = logits.softmax(2).mean(1)  # (B, Q)
    if text_valid is None:
        mean = m.mean(1, keepdim=True)
        return m > mean if dtype is None else torch.gt(m, mean, out=m.new_empty(m.shape, dtype=dtype))
    mean = (m * text_valid).sum(1, keepdim=True) / text_valid.sum(1, keepdim=True)
    r = (m > mean) & text_valid
    return r if dtype is None else r.to(dtype)


@dataclass
class SparseVLM(InLLMMethod):
    """SparseVLM: rater-guided selection at three LLM layers, with token recycling (v1.5).

    Parameters
    ----------
    version : {"1.5", "2.0"}
        ``"1.5"`` (default): renumbered positions, recycling. ``"2.0"``: original ids, RoPE-bias
        division, top ``n_heads`` heads, no merging.
    scoring_layers : list[int]
        Layers whose attention scores the tokens; their outputs are pruned (for ``ref_layers`` = 32).
    budget : str
        ``official`` (default): the published schedule of the budget ``B = round(N (1 - ratio))``
        (192/128/64; other budgets scale the nearest published one by ``B / B_ref``). SparseVLM names its
        budgets by the layer-averaged count, which with the recycled tokens is 206.5 / 145.4 / 82.3: recorded
        as ``budget_met: false`` with that mean (a published table is not re-solved). ``layer_mean``: the
        nearest published shape scaled so the mean over layers (merged tokens included) is ``B``;
        ``after_prune``: the same shape scaled so the count after the first pruned layer is ``B``.
    merge : bool or None
        Recycling on/off (``None``: on for 1.5, off for 2.0).
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
    #: visual tokens the published schedules (``SCHEDULES``) count from: LLaVA-1.5's 576, the official
    #: reference; on a model with another ``N`` (``n_vis``, from the adapter) the counts scale by ``N / ref_tokens``
    ref_tokens: ClassVar[int] = 576

    def __post_init__(self) -> None:
        super().__post_init__()
        self.version = str(self.version)
        if self.version not in SCHEDULES:
            raise ConfigError(f"sparsevlm: version must be '1.5' or '2.0', got {self.version!r}")
        if self.scoring_layers is None:
            self.scoring_layers = [2, 6, 15]
        self.scoring_layers = [int(x) for x in self.scoring_layers]

    def selection_flops(self, cost) -> int:
        """Rater matrix ``V T^T`` (once), rows after the image from the captured q/k at each stage, v2.0's
        RoPE-only bias, the recycled candidates' Gram matrix for their distances (``(M x D) @ (D x M)``, stages
        with more than one cluster) and their cluster means (``(c x M) @ (M x D)``)."""
        d, q = cost.llm_width, cost.after_image_rows
        total = 0
        for j, (_, st, t, n_vis) in enumerate(cost.llm_stages(self)):
            if j == 0:
                total += 2 * cost.n_visual * q * d
            total += cost.attention_rows(t, q, False)
            if self.version == "2.0":
                total += 2 * q * cost.llm_head_dim * t
            m = st.n_keep - st.n_selected
            if m > 0:
                cand, _ = merge_counts(n_vis, st.n_selected)
                total += 2 * m * cand * d
                if m > 1:  # the candidates' pairwise distances: one (M x D) @ (D x M) Gram matrix (fp64)
                    total += 2 * cand * cand * d
        return cost.batch * total

    @property
    def merging(self) -> bool:
        return (self.version == "1.5") if self.merge is None else bool(self.merge)

    @property
    def renumber(self) -> bool:
        return (self.version == "1.5") if self.renumber_positions is None else bool(self.renumber_positions)

    def layers_for(self, n_layers: int) -> list[int]:
        """Pruned layers (scoring layer + 1), scaled for the model depth."""
        return [min(scale_layer(x, n_layers, self.ref_layers) + 1, n_layers - 1) for x in self.scoring_layers]

    # -------------------------------------------------------------- schedule
    def _shape(self, target: int, n_vis: int) -> tuple[int, tuple[int, ...]]:
        table = SCHEDULES[self.version]
        ref_b = min(table, key=lambda x: (abs(x * n_vis / self.ref_tokens - target), x))
        return ref_b, table[ref_b]

    def selected_counts(self, n_vis: int, n_layers: int) -> list[int]:
        target = self.target(n_vis)
        ref_b, shape = self._shape(target, n_vis)
        scale_n = n_vis / self.ref_tokens
        if self.budget == "official":
            if round(ref_b * scale_n) == target:
                return [max(1, round(s * scale_n)) for s in shape]
            return [max(1, round(s * target / ref_b)) for s in shape]
        return scaled_selected(shape, scale_n, n_vis, self.layers_for(n_layers), n_layers, target, self.budget, self.merging,
                               self._warn_infeasible)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0:
            return []
        layers = self.layers_for(n_layers)
        sel = self.selected_counts(n_vis, n_layers)
        out = []
        for layer, (k, _, c) in zip(layers, stage_counts(sel, n_vis, self.merging)):
            out.append(Stage(layer, k + c, self.renumber, n_select=k))
        return out

    def runtime_setup(self, plan: list[Stage], prepared, device) -> dict:
        """Per stage, built once outside the forward: the density jitter (``1e-6 * rand`` in the official
        code, seeded per sample from its seed) and the cluster ids (:func:`recycling_setup`)."""
        return recycling_setup(plan, prepared, device) if self.merging else {}

    # -------------------------------------------------------------- selection
    def scores(self, view: StageView, layer: int) -> torch.Tensor:
        """``(B, n_vis)`` rater-averaged head-mean attention of ``layer`` to the current visual block."""
        attn, q_valid = view.attn_rows(layer, "after_image")  # (B, H, Q, T)
        raters = view.state.get("sparsevlm_raters")
        if raters is None:  # once per prefill: rater weights and their count
            e = view.input_embeds()
            n0 = e.shape[1] - (view.hidden.shape[1] - view.n_vis)  # original visual count (stage 0: n_vis)
            w = text_raters(e, view.vis_start, n0, attn.shape[2], view.vis_start_min if view.uniform_start else None,
                            dtype=torch.float32)
            raters = view.state["sparsevlm_raters"] = (w, w.sum(1, keepdim=True).clamp(min=1))
        w, count = raters
        if self.version == "2.0":
            return scores_v2(view, layer, attn, w, count, self.n_heads)
        a = view.visual(attn.mean(1), dim=-1)  # (B, Q, n), the model's dtype
        return (a * w.unsqueeze(-1)).sum(1) / count  # fp32: ``w`` promotes the product (no separate cast)

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        s = self.scores(view, stage.layer - 1)
        k = stage.n_selected
        m = stage.n_keep - k
        if m <= 0:
            return StageOut(topk_sorted(s, k))
        cand, _ = merge_counts(view.n_vis, k)
        # the kept (sorted by index), then the recycled candidates by descending score (the order of the
        # official ``topk``: it orders the clustering's jitter and ties); one kernel on CUDA
        keep, recycled = topk_rank(s, k, cand)
        x = view.visual(view.hidden).gather(1, recycled.unsqueeze(-1).expand(-1, -1, view.hidden.shape[-1]))
        static = view.static
        jitter = static.get("jitter", {}).get(i)
        zero = static.get("zero")
        if zero is not None and zero.dtype != x.dtype:
            zero = None
        return StageOut(keep, cluster_and_merge(x, m, jitter, static.get("cluster_ids", {}).get(i), zero))
