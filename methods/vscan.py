"""VScan: global and local scans with token merging before the LLM, then text-guided pruning inside it.

Paper: https://arxiv.org/abs/2505.22654 (TMLR 2026; code: ``Tencent/SelfEvolvingAgent``, folder ``VScan/``:
``llava/model/llava_arch.py::encode_images``, ``window_cls_selection``, ``token_merging`` and
``llava/model/modeling_llama_x.py::LlamaModel.forward_x`` / ``layer_prune``).

What the official code does on LLaVA-1.5, for a pre-LLM budget ``P`` (``--visual_token_num``):

* **scores**: the head-mean CLS row of the CLIP attention (patch columns, model dtype) at layer 5 (*shallow*) and
  layer -2 (*deep*, LLaVA's feature layer);
* **local scan**: 6 x 6 windows of the 24 x 24 map (16) each give their ``int(P * 0.5) // 16`` tokens of highest
  shallow attention (``torch.topk`` per window);
* **global scan**: the local picks' deep attention set to 0, the ``P - int(P * 0.5)`` of highest deep attention.
  No top-up: fewer than ``P`` reach the LLM where ``int(P * 0.5)`` is no multiple of the window count (``P = 144``:
  64 + 72 = 136, recorded);
* **merging**, on the projected tokens: every dropped token goes to the kept token of highest
  ``F.cosine_similarity`` (first index on ties); a kept token becomes ``(kept + sum of its dropped) / (1 + their
  count)``. Kept tokens stay in raster order, with contiguous position ids;
* **second stage** (``layer_list = [16]``, ``image_token_list = [32]``): PyramidDrop's ``layer_prune``, one stage:
  before LLM layer 16, its own projections and RoPE on its input give the **last prompt token**'s attention row
  (float32 softmax, cast back), head mean over the image tokens; ``topk(min(32, tokens present))``, sorted, renumbered.

Budget modes (officially 96 before the LLM and 32 from layer 16 on) and the ports' differences from the official code:
:mod:`methods.vscan_parts`; the Qwen2.5-VL port (``port: qwen25vl``): :mod:`methods.vscan_ports`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import VisionContext, VisualSelection, keep_all
from methods.fastv import view_scores
from methods.inllm import InLLMMethod, Stage, StageOut, StageView
from methods.ranking import topk_sorted
from methods.vscan_parts import VScanBudget, check_window, common_count, nearest_matmul
from methods.vscan_ports import vscan_qwen_keep_mask, window_greedy_picks  # noqa: F401 (window_greedy_picks re-exported)


def window_picks(attn: torch.Tensor, grid: tuple[int, int], k: int, window: int) -> torch.Tensor:
    """Local scan: ``(B, N)`` attention -> ``(B, W * k)`` raster indices, the ``k`` best (``torch.topk`` on the
    row-major flattened window, as the official loop) of every ``window x window`` window, in row-major window order."""
    b, n = attn.shape
    h, w = grid
    wh, ww = h // window, w // window
    m = attn.view(b, h, w)[:, : wh * window, : ww * window]
    win = m.reshape(b, wh, window, ww, window).permute(0, 1, 3, 2, 4).reshape(b, wh * ww, window * window)
    top = win.topk(k, dim=-1).indices  # (B, W, k)
    wi = torch.arange(wh * ww, device=attn.device).view(1, -1, 1)
    y = (wi // ww) * window + top // window
    x = (wi % ww) * window + top % window
    return (y * w + x).flatten(1)


def vscan_keep_mask(shallow: torch.Tensor, deep: torch.Tensor, grid: tuple[int, int], budget: int, window: int = 6, global_ratio: float = 0.5) -> torch.Tensor:
    """Global and local scans: ``(B, N)`` shallow and deep CLS attention -> ``(B, N)`` kept mask: ``int(budget * (1 -
    global_ratio)) // W`` per window by shallow attention, then the rest of ``budget`` by deep attention."""
    n_local = int(budget * (1 - global_ratio))
    local = window_picks(shallow, grid, n_local // ((grid[0] // window) * (grid[1] // window)), window)
    deep = deep.scatter(1, local, 0)
    picks = torch.cat([local, deep.topk(budget - n_local, dim=1).indices], dim=1)
    return torch.zeros_like(shallow, dtype=torch.bool).scatter(1, picks, True)


def merge_into_kept(x: torch.Tensor, keep: torch.Tensor, dropped: torch.Tensor, similarity: str = "cosine_similarity") -> torch.Tensor:
    """One image's merge (module docstring): ``(N, D)`` tokens, kept and dropped raster indices -> ``(K, D)`` merged
    kept tokens, summed with ``scatter_add_`` and divided in ``x``'s dtype as the official ``token_merging``
    (``scaling = 1``); ``similarity``: the official ``cosine_similarity`` over ``(N - K, K, D)``, or ``matmul``."""
    kept, rest = x[keep].unsqueeze(0), x[dropped].unsqueeze(0)  # (1, K, D), (1, N - K, D)
    if rest.shape[1] == 0:
        return kept[0]
    near = (nearest_matmul(rest, kept) if similarity == "matmul"  # (1, N - K)
            else F.cosine_similarity(rest.unsqueeze(2), kept.unsqueeze(1), dim=3).argmax(dim=2))
    count = torch.zeros(kept.shape[:2], device=x.device, dtype=torch.int)
    merged = torch.zeros_like(kept)
    merged += kept * 1
    merged.scatter_add_(1, near.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rest)
    count.scatter_add_(1, near, torch.ones_like(near, dtype=count.dtype))
    merged /= 1 + count.unsqueeze(2)
    return merged[0]


@dataclass
class VScan(VScanBudget, InLLMMethod):
    """VScan with the official settings (a pre-LLM selection with merging, then one in-LLM stage); every option is
    documented in ``conf/method/vscan.yaml``. ``merge_similarity: matmul`` (:func:`methods.vscan_parts.nearest_matmul`)
    and ``llm_span: image`` (``bench.models.llava_next_inllm``) are named deviations; ``budget``:
    :mod:`methods.vscan_parts`; ``port`` and ``qwen_*``: :mod:`methods.vscan_ports`.
    """

    visual_token_num: int = 96
    image_token_list: list[int] = field(default_factory=lambda: [32])
    layer_list: list[int] = field(default_factory=lambda: [16])
    global_ratio: float = 0.5
    window_size: int = 6
    shallow_layer: str = "5@24"
    deep_layer: int = -2
    merge_similarity: str = "cosine_similarity"
    llm_span: str = "official"
    # layer_mean by default: the official setting (96 / 32) is one table whatever the ratio (recorded by its layer mean)
    budget: str = "layer_mean"
    port: str = "auto"
    qwen_image_token_ratio: float = 0.167
    qwen_image_token_ratio_list: list[float] = field(default_factory=lambda: [0.333])
    qwen_layer_list: list[int] = field(default_factory=lambda: [14])
    qwen_ref_layers: int = 28
    qwen_window_size: int = 4

    requires_cls: ClassVar[bool] = True
    pre_llm_selection: ClassVar[bool] = True
    official_measure: ClassVar[str] = "layer_mean"
    official_is_table: ClassVar[bool] = True

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        """``(B, N, D)`` projected tokens -> the ``(B, K, D)`` merged kept tokens in raster order."""
        b, n, d = vis.shape
        if self.prune_ratio == 0.0 and self.budget != "official":
            return keep_all(vis)
        self.check_compatible(ctx)
        w = check_window(ctx.grid, int(self.qwen_window_size if self.qwen else self.window_size))
        p = self.qwen_pre_count(n) if self.qwen else self.counts(n)[0]
        if p >= n:
            return keep_all(vis)
        if self.qwen:
            mask = vscan_qwen_keep_mask(*(ctx.get(k) for k in self.QWEN_NEEDS), ctx.grid, p, w)
        else:
            shallow = ctx.get(f"cls_attn:{self.shallow_layer}")[:, :, 1:].mean(dim=1)
            deep = ctx.get(f"cls_attn:{self.deep_layer}")[:, :, 1:].mean(dim=1)
            mask = vscan_keep_mask(shallow, deep, ctx.grid, p, w, float(self.global_ratio))
        kk = common_count(mask)
        order = (~mask).to(torch.int8).sort(dim=1, stable=True).indices  # kept, then dropped, each in raster order
        feats = torch.stack([merge_into_kept(vis[i], order[i, :kk], order[i, kk:], self.merge_similarity) for i in range(b)])
        return VisualSelection(feats, order[:, :kk], torch.full((b,), kk, dtype=torch.long))

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        # layer ℓ's own projections on its input (PyramidDrop's rule); the Qwen2.5-VL port rotates nothing
        attn, _ = view.attn_rows(stage.layer, "last", rope=False) if self.qwen else view.attn_rows(stage.layer, "last")
        return StageOut(topk_sorted(view_scores(view, attn[:, :, -1]), stage.n_keep))

    def selection_flops(self, cost) -> int:
        """Per image: the two recomputed CLS rows (their layers' q/k); per stage: the last token's row with that layer's
        k/q projections run on its input. The merge's cosines are elementwise (``F.cosine_similarity``), uncounted
        like every elementwise op (``2 (N - K) K D``: 0.4 GFLOPs at 96 of 576 on LLaVA-1.5-7B)."""
        if self.prune_ratio == 0.0 and self.budget != "official":
            return 0
        total = self.qwen_tower_flops(cost) if self.qwen else cost.batch * cost.vision_extras(self.needs)
        return total + sum(self.last_row_flops(cost, kept) for kept in cost.kept)
