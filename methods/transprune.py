"""TransPrune (Li et al., CVPR'26, https://arxiv.org/abs/2507.20630): token transition + instruction attention.

Official code: ``liaolea/TransPrune``, ``llava/model/modeling_llama_transprune.py`` (``LlamaModel.transprune_forward``,
``transprune_rank_drop``, ``LlamaDecoderLayer_TransPrune.compute_transf_weight``) and its scripts
(``--accmulating_layer_list [7..12] --pruning_layer_list [7,9,12] --image_token_ratio_list [0.875,0.625,0.125]``).
What it does (``docs/methods.md`` 1 and 1b):

* *TTV* (token transition variation): for the attention and the FFN sublayer of every accumulating layer (rank
  ``r`` = layer ``r - 1`` for ``r`` in 7..12), ``(‖out‖ / ‖in‖) · softmax_seq(1 - cos(in, out))`` with ``in`` the
  sublayer's normed input and ``out`` its output; the softmax runs over **all** tokens of the sequence (here: of
  the sample, padding excluded); the two are summed, and the per-token values accumulate over layers **without
  reset across stages** (carried over to the kept tokens at each stage);
* *IGA*: before layer ``ℓ`` (= rank), that layer's input norm, q/k and RoPE (current, renumbered positions) score
  the rows of **all tokens after the image**; head-mean, then query-mean, of their attention to the image tokens;
* both normalised to sum 1 over the image tokens (``+1e-8``); ``score = TTV + IGA``; keep ``int(N r_s)`` (``r =
  0.875, 0.625, 0.125``: 504/360/72, 236.25 on average), sorted; positions renumbered (shifted by the dropped
  count when decoding).

The hooks keep each sublayer's input and output; at each stage :func:`sublayer_stats` and :func:`transprune_score`
turn them into the score (on CUDA fp16/bf16 two Triton launches, :mod:`kernels.transprune`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kernels import HALF, fast_path
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, scale_layer, visual_block, visual_columns
from methods.ranking import topk_sorted
from methods.transprune_parts import install_ttv_hooks, stage_counts, sublayer_stats, token_stats

_EPS = 1e-8
BACKENDS = ("auto", "torch", "triton")


def _transition_from_stats(n_in: torch.Tensor, n_out: torch.Tensor, dot: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(..., T)`` TTV from per-token ``‖in‖``, ``‖out‖`` and ``in·out`` (fp32); softmax over ``valid`` tokens."""
    cos = dot / (n_in.clamp(min=_EPS) * n_out.clamp(min=_EPS))
    e = torch.exp(1 - cos)
    if valid is not None:
        e = e * valid
    return (n_out / n_in) * (e / e.sum(-1, keepdim=True))


def transition_weight(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(B, T)``: ``(‖out‖/‖in‖) · exp(1 - cos) / Σ_seq exp(1 - cos)`` (sum over each sample's valid tokens)."""
    return _transition_from_stats(*token_stats(x_in, x_out), valid)


@fast_path("kernels.transprune:transprune_score", on=("head_mean",), auto_dtypes=HALF)
def transprune_score(stats: torch.Tensor | None, valid: torch.Tensor | None, vis_start: torch.Tensor, prev,
                     head_mean: torch.Tensor, q_valid: torch.Tensor, n: int, uniform: bool = False):
    """The stage's accumulated TTV ``(B, n)`` (``None`` without TTV layers so far) and score ``(B, n)``.

    ``stats`` ``(3, L, B, T)``: :func:`sublayer_stats` of the sublayers since the last stage (or ``None``);
    ``valid`` ``(B, T)`` False on left padding (``None``: none); ``vis_start`` ``(B,)``: the visual block is
    ``[vis_start, vis_start + n)``; ``prev``: ``(ttv, keep)`` of the previous stage, its accumulated TTV
    ``(B, n_prev)`` and kept indices ``(B, n)`` (or ``None``); ``head_mean`` ``(B, Q, T)``: head-mean attention of
    the rows after the image, ``q_valid`` ``(B, Q)`` marking those after each sample's own image; ``uniform``: every
    image starts alike (every row valid), so the query mean is a plain mean.
    """
    a = visual_columns(head_mean, vis_start, n).float()  # (B, Q, n)
    if uniform:
        iga = a.mean(1)
    else:
        w = q_valid.to(a.dtype)
        iga = (a * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    iga = iga / (iga.sum(1, keepdim=True) + _EPS)
    ttv = None if prev is None else prev[0].gather(1, prev[1])  # carried over to the kept tokens
    if stats is not None:
        w = visual_block(_transition_from_stats(*stats, valid).sum(0), vis_start, n)
        ttv = w if ttv is None else ttv + w
    score = iga if ttv is None else iga + ttv / (ttv.sum(1, keepdim=True) + _EPS)
    return ttv, score


@dataclass
class TransPrune(InLLMMethod):
    """TransPrune: keep the visual tokens with the largest TTV + IGA, in three stages.

    Parameters
    ----------
    pruning_layer_list : list[int]
        Pruned layers (``rank_layer``: the input of that layer is pruned), for ``ref_layers`` = 32.
    accmulating_layer_list : list[int]
        Ranks whose layer (``rank - 1``) contributes TTV.
    image_token_ratio_list : list[float]
        Kept fraction of the original ``N`` after each stage (``int(N r)``): the official scripts', the only one published.
    budget : str
        ``official`` (default): the official stages and ratios, scaled by one factor so the layer mean (the count
        TransPrune's setting is described by) is ``B = round(N (1 - ratio))``; at ``B = 236`` the ratios as published.
        ``layer_mean``: the same schedule (named apart so runs say which was asked for); ``after_prune``: scaled so
        the first stage keeps ``B``. A budget below what the first pruning layer allows (126.8 at 7/9/12 of 32) is refused.
    renumber_positions : bool
        Official: renumber (True).
    backend : {"auto", "torch", "triton"}
        Statistics and scoring: ``auto`` runs the Triton kernels (:mod:`kernels.transprune`) on CUDA fp16/bf16 and
        torch elsewhere; ``torch`` / ``triton`` force one (``triton`` needs CUDA, or ``TRITON_INTERPRET=1`` on CPU).
        Both compute the same fp32 quantities up to summation order (selections agree but for exact ties).
    """

    pruning_layer_list: list[int] = field(default_factory=lambda: [7, 9, 12])
    accmulating_layer_list: list[int] = field(default_factory=lambda: [7, 8, 9, 10, 11, 12])
    image_token_ratio_list: list[float] = field(default_factory=lambda: [0.875, 0.625, 0.125])
    renumber_positions: bool = True
    backend: str = "auto"

    official_measure: ClassVar[str] = "layer_mean"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"backend": BACKENDS}

    def selection_flops(self, cost) -> int:
        """Rows of every token after the image at each stage's layer (its k/q projections run again)."""
        return cost.batch * sum(cost.attention_rows(t, cost.after_image_rows, True) for _, _, t, _ in cost.llm_stages(self))

    def layers_for(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, self.ref_layers) for x in self.pruning_layer_list]

    def ttv_layers(self, n_layers: int) -> list[int]:
        last = max(self.layers_for(n_layers))
        return sorted({scale_layer(r, n_layers, self.ref_layers) - 1 for r in self.accmulating_layer_list} & set(range(last)))

    def counts(self, n_vis: int, n_layers: int) -> list[int]:
        """Visual tokens kept after each stage: the published ratios scaled to the budget mode (``budget``)."""
        return stage_counts([float(r) for r in self.image_token_ratio_list], self.layers_for(n_layers), n_vis, n_layers,
                            self.target(n_vis), self.budget, self._warn_infeasible)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0:
            return []
        return [Stage(layer, c, self.renumber_positions) for layer, c in zip(self.layers_for(n_layers), self.counts(n_vis, n_layers))]

    def install_hooks(self, lm, runner) -> list:
        """Hooks keeping the (input, output) of every TTV sublayer for the stage that reads them."""
        return install_ttv_hooks(lm, runner, self.ttv_layers(len(lm.layers)), self.layers_for(len(lm.layers)))

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        attn, q_valid = view.attn_rows(stage.layer, "after_image")  # (B, H, Q, T), layer ℓ on its input
        pairs = view.state.pop(("tp_io", view.layer), None)  # (input, output) of the sublayers since the last stage
        stats = sublayer_stats.run(self.backend, pairs) if pairs and all(p is not None for p in pairs) else None
        prev = view.state.get("tp_ttv")  # (accumulated TTV, kept indices) of the previous stage
        valid = None if getattr(view, "no_padding", False) else view.valid
        ttv, score = transprune_score.run(self.backend, stats, valid, view.vis_start, prev, attn.mean(1), q_valid,
                                          view.n_vis, bool(getattr(view, "uniform_start", False)))
        keep = topk_sorted(score, stage.n_keep)
        if ttv is not None:  # accumulated without reset: the next stage carries it over to the kept tokens
            view.state["tp_ttv"] = (ttv, keep)
        return StageOut(keep)
