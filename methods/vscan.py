"""VScan: global and local scans with token merging before the LLM, then text-guided pruning inside it.

Paper: https://arxiv.org/abs/2505.22654 (TMLR 2026; code: ``Tencent/SelfEvolvingAgent``, folder ``VScan/``:
``llava/model/llava_arch.py::encode_images``, ``window_cls_selection``, ``token_merging`` and
``llava/model/modeling_llama_x.py::LlamaModel.forward_x`` / ``layer_prune``).

What the official code does on LLaVA-1.5, for a pre-LLM budget ``P`` (``--visual_token_num``):

* **scores**: the CLS query row of the CLIP attention (patch columns), averaged over heads, in the
  model's dtype, at layer 5 (*shallow*) and layer -2 (*deep*, LLaVA's feature layer);
* **local scan**: the 24 x 24 map is cut into 6 x 6 windows (16 on LLaVA-1.5); each window gives its
  ``k = int(P * 0.5) // 16`` tokens of highest shallow attention (``torch.topk`` per window);
* **global scan**: the deep attention of the local picks is set to 0, then the ``P - int(P * 0.5)``
  tokens of highest deep attention are picked. There is no top-up: when ``int(P * 0.5)`` is not a
  multiple of the window count, fewer than ``P`` tokens reach the LLM (``P = 144``: 64 + 72 = 136;
  the records hold the real count);
* **merging**, on the projected tokens: every dropped token goes to the kept token of highest
  ``F.cosine_similarity`` (first index on ties); a kept token becomes ``(kept + sum of its dropped) /
  (1 + their count)``. Kept tokens stay in raster order, with contiguous position ids;
* **second stage** (``layer_list = [16]``, ``image_token_list = [32]``): before LLM layer 16 runs, its
  ``input_layernorm``, ``q_proj``/``k_proj`` and RoPE on the current positions give the **last prompt
  token**'s row ``softmax(q K^T / sqrt(d) + causal)`` (float32 softmax, cast back), head mean over the
  image tokens; ``topk(min(32, tokens present))``, sorted; positions renumbered (shifted while
  decoding): PyramidDrop's ``layer_prune``, one stage.

Budget (``budget``, :mod:`methods.vscan_parts`): the official run keeps 96 before the LLM and 32 from layer 16 on
(a layer mean of 64); ``layer_mean`` (default) scales both so that mean is ``round(N (1 - ratio))``.

Ports (documented): the official code runs one image per batch (its merge stacks per-sample tensors);
here the selection is batched and the merge runs per sample. Its CLIP attention is the eager one of
``output_attentions``; here the CLS rows are recomputed from the layer's q/k (``bench.models.clip_extras``,
tested equal). The official ``window_cls_selection`` asserts a 24 x 24 grid; here any grid with at least
one full window runs (windows that do not fit are left out, as the official loop's ``H // window_size``).
The merge uses the official ``scatter_add_``: on CUDA its float atomics make the merged features' last
bits run-dependent, as in the official code (the kept indices are deterministic).

The Qwen2.5-VL port (``port: qwen25vl``: received attention instead of [CLS], a greedy 4 x 4 window scan, an
un-rotated stage at layer 14 of 28 with original positions) lives in :mod:`methods.vscan_ports`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.errors import IncompatibleMethodError
from methods.base import VisionContext, VisualSelection
from methods.fastv import view_scores
from methods.inllm import InLLMMethod, Stage, StageOut, StageView
from methods.ranking import topk_sorted
from methods.vscan_parts import VScanBudget
from methods.vscan_ports import vscan_qwen_keep_mask, window_greedy_picks  # noqa: F401 (window_greedy_picks re-exported)


def window_picks(attn: torch.Tensor, grid: tuple[int, int], k: int, window: int) -> torch.Tensor:
    """Local scan: ``(B, N)`` attention -> ``(B, W * k)`` raster indices, the ``k`` best of every window.

    Windows are ``window x window`` patches in row-major window order (``W = (H // window) * (W // window)``);
    inside a window the picks follow ``torch.topk`` on its row-major flattened values, as the official loop.
    """
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
    """Global and local scans: ``(B, N)`` shallow and deep CLS attention -> ``(B, N)`` kept mask.

    ``int(budget * (1 - global_ratio)) // W`` tokens per window by shallow attention, then the
    ``budget - int(budget * (1 - global_ratio))`` best of the deep attention with the local picks zeroed.
    """
    wins = (grid[0] // window) * (grid[1] // window)
    n_local = int(budget * (1 - global_ratio))
    local = window_picks(shallow, grid, n_local // wins, window)
    deep = deep.scatter(1, local, 0)
    picks = torch.cat([local, deep.topk(budget - n_local, dim=1).indices], dim=1)
    return torch.zeros_like(shallow, dtype=torch.bool).scatter(1, picks, True)


def merge_into_kept(x: torch.Tensor, keep: torch.Tensor, dropped: torch.Tensor, similarity: str = "cosine_similarity") -> torch.Tensor:
    """One image's merge: ``(N, D)`` tokens, kept and dropped raster indices -> ``(K, D)`` merged kept tokens.

    Each dropped token joins the kept token of highest cosine (``argmax``: first on ties); a kept token
    becomes ``(itself + its dropped) / (1 + their count)``, summed with ``scatter_add_`` and divided in
    ``x``'s dtype, as the official ``token_merging`` (``scaling = 1``). ``similarity``:
    ``cosine_similarity`` (official) broadcasts ``F.cosine_similarity`` over ``(N - K, K, D)``, the official
    arithmetic; ``matmul`` is one ``(N - K) x K`` product of normalised rows, the same cosines up to the
    last bits (an assignment may differ where two kept tokens tie that closely).
    """
    kept, rest = x[keep].unsqueeze(0), x[dropped].unsqueeze(0)  # (1, K, D), (1, N - K, D)
    if rest.shape[1] == 0:
        return kept[0]
    if similarity == "matmul":
        kn = kept / kept.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        rn = rest / rest.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        near = (rn @ kn.transpose(1, 2)).argmax(dim=2)
    else:
        near = F.cosine_similarity(rest.unsqueeze(2), kept.unsqueeze(1), dim=3).argmax(dim=2)  # (1, N - K)
    count = torch.zeros(kept.shape[:2], device=x.device, dtype=torch.int)
    merged = torch.zeros_like(kept)
    merged += kept * 1
    merged.scatter_add_(1, near.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rest)
    count.scatter_add_(1, near, torch.ones_like(near, dtype=count.dtype))
    merged /= 1 + count.unsqueeze(2)
    return merged[0]


@dataclass
class VScan(VScanBudget, InLLMMethod):
    """VScan with the official settings (a pre-LLM selection with merging, then one in-LLM stage).

    Parameters
    ----------
    visual_token_num : int
        Official pre-LLM budget ``P`` (96); with ``budget: official`` used as is.
    image_token_list : list[int]
        Official in-LLM counts per stage (``[32]``).
    layer_list : list[int]
        Pruning layers of the in-LLM stages, for a ``ref_layers``-deep LLM (``[16]``).
    global_ratio : float
        Share of ``P`` taken by the global scan (official 0.5; the local scan gets ``int(P (1 - global_ratio))``).
    window_size : int
        Side of the local-scan windows in patches (official 6).
    shallow_layer : str
        CLIP layer of the local scan's attention: ``"5@24"`` = layer 5 of a 24-layer tower (scaled on others).
    deep_layer : int
        CLIP layer of the global scan's attention (-2, LLaVA's feature layer).
    merge_similarity : {"cosine_similarity", "matmul"}
        ``cosine_similarity`` (official; ``(N - K) x K x D`` products, about 1 GB of memory traffic per LLaVA-1.5
        image); ``matmul``: one product of normalised rows (named deviation: last-bit ties may assign differently).
    llm_span : {"official", "image"}
        The in-LLM stage's visual block where the tokens sent outnumber ``P`` (LLaVA-NeXT, ``P`` per tile): ``official``
        (``layer_prune``) the first ``min(P, sent)`` tokens, scored by row ``prompt_len + min(P, sent) - 1``; ``image``
        (named correction) the whole block, scored by the last prompt token (``bench.models.llava_next_inllm``).
    budget : {"layer_mean", "after_prune", "official"}
        Module docstring.
    port : {"auto", "llava", "qwen25vl"}
        ``llava`` (CLS attention, ``llava_arch.py``), ``qwen25vl`` (:mod:`methods.vscan_ports`); ``auto``: ``llava``,
        resolved to ``qwen25vl`` by the Qwen2.5-VL adapter.
    qwen_image_token_ratio, qwen_image_token_ratio_list, qwen_layer_list, qwen_ref_layers, qwen_window_size
        The Qwen2.5-VL port's official settings (``0.167``, ``[0.333]``, ``[14]`` of ``28`` layers, ``4``).
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
    # layer_mean by default (conf/method/vscan.yaml): VScan's official setting is one configuration (96 / 32)
    # whatever the ratio, so its official mode gives every ratio the same run
    budget: str = "layer_mean"
    port: str = "auto"
    qwen_image_token_ratio: float = 0.167
    qwen_image_token_ratio_list: list[float] = field(default_factory=lambda: [0.333])
    qwen_layer_list: list[int] = field(default_factory=lambda: [14])
    qwen_ref_layers: int = 28
    qwen_window_size: int = 4

    requires_cls: ClassVar[bool] = True
    pre_llm_selection: ClassVar[bool] = True
    # the official run is one fixed setting (96 / 32, a layer mean of 64) whatever the ratio: a table, recorded
    # against the budget by its layer mean, never refused
    official_measure: ClassVar[str] = "layer_mean"
    official_is_table: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_settings()

    @property
    def qwen(self) -> bool:
        """Whether the Qwen2.5-VL port's rule runs (``port: qwen25vl``)."""
        return self.port == "qwen25vl"

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        if self.qwen:
            return frozenset(self.QWEN_NEEDS)
        return frozenset({f"cls_attn:{self.shallow_layer}", f"cls_attn:{self.deep_layer}"})

    def check_compatible(self, ctx: VisionContext) -> None:
        """The LLaVA rule needs a [CLS] tower; the Qwen2.5-VL port a tower without one whose adapter serves its scores."""
        if not self.qwen:
            return super().check_compatible(ctx)
        if ctx.has_cls or any(k not in ctx.extras for k in self.QWEN_NEEDS):
            raise IncompatibleMethodError(f"method {self.name!r} with port=qwen25vl runs on Qwen2.5-VL's tower only (received-attention scores, no [CLS])")

    # -------------------------------------------------------------- pre-LLM selection
    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        """``(B, N, D)`` projected tokens -> the ``(B, K, D)`` merged kept tokens in raster order."""
        b, n, d = vis.shape
        if self.prune_ratio == 0.0 and self.budget != "official":
            return VisualSelection(vis, torch.arange(n, device=vis.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
        self.check_compatible(ctx)
        w = int(self.qwen_window_size if self.qwen else self.window_size)
        if ctx.grid[0] < w or ctx.grid[1] < w:
            raise IncompatibleMethodError(f"vscan: a {ctx.grid[0]}x{ctx.grid[1]} patch grid holds no {w}x{w} window")
        p = self.qwen_pre_count(n) if self.qwen else self.counts(n)[0]
        if p >= n:
            return VisualSelection(vis, torch.arange(n, device=vis.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
        if self.qwen:
            local, glob = (ctx.get(k) for k in self.QWEN_NEEDS)
            mask = vscan_qwen_keep_mask(local, glob, ctx.grid, p, w)
        else:
            shallow = ctx.get(f"cls_attn:{self.shallow_layer}")[:, :, 1:].mean(dim=1)
            deep = ctx.get(f"cls_attn:{self.deep_layer}")[:, :, 1:].mean(dim=1)
            mask = vscan_keep_mask(shallow, deep, ctx.grid, p, w, float(self.global_ratio))
        k = mask.sum(dim=1)
        if bool((k != k[0]).any()):  # only when a deep attention underflows to 0 next to the local picks
            raise IncompatibleMethodError(f"vscan: the samples of this batch keep {k.tolist()} tokens (global picks fell on local ones); run it with batch size 1")
        kk = int(k[0])
        order = (~mask).to(torch.int8).sort(dim=1, stable=True).indices  # kept, then dropped, each in raster order
        feats = torch.stack([merge_into_kept(vis[i], order[i, :kk], order[i, kk:], self.merge_similarity) for i in range(b)])
        return VisualSelection(feats, order[:, :kk], torch.full((b,), kk, dtype=torch.long))

    # -------------------------------------------------------------- in-LLM stage
    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        # layer ℓ's own projections on its input (PyramidDrop's rule); the Qwen2.5-VL port rotates nothing
        attn, _ = view.attn_rows(stage.layer, "last", rope=False) if self.qwen else view.attn_rows(stage.layer, "last")
        return StageOut(topk_sorted(view_scores(view, attn[:, :, -1]), stage.n_keep))

    def selection_flops(self, cost) -> int:
        """Per image: the two recomputed CLS rows (their layers' q/k); per stage: the last token's row with that
        layer's k/q projections run on its input. The merge's cosine similarities are elementwise products
        (``F.cosine_similarity``), uncounted like every elementwise op (``2 (N - K) K D``: 0.4 GFLOPs at 96 of 576
        on LLaVA-1.5-7B)."""
        if self.prune_ratio == 0.0 and self.budget != "official":
            return 0
        total = self.qwen_tower_flops(cost) if self.qwen else cost.batch * cost.vision_extras(self.needs)
        t = cost.shapes.seq_len  # the sequence entering the first stage: the LLM input as prepared
        for kept in cost.kept:
            cur_t, cur = t, kept
            for st in self.plan_for(cost.n_visual, kept, int(self.qwen_ref_layers if self.qwen else self.ref_layers)):  # counts only: any depth
                total += cost.attention_rows(cur_t, 1, True)
                cur_t, cur = cur_t - (cur - st.n_keep), st.n_keep
        return total
