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

Budget (``budget``): the official run keeps 96 before the LLM and 32 from layer 16 on, a mean of 64 over
the 32 layers. ``layer_mean`` (default) scales both counts by one factor so that this nominal mean is
``round(N (1 - ratio))``: 96/32 at 64, 216/72 at 144, 432/144 at 288 (the real mean is lower when the
local scan floors, as in the official code). ``after_prune``: ``P = round(N (1 - ratio))`` and the LLM
counts in the official proportion. ``official``: ``visual_token_num`` and ``image_token_list`` as given
(the ratio is not used).

Ports (documented): the official code runs one image per batch (its merge stacks per-sample tensors);
here the selection is batched and the merge runs per sample. Its CLIP attention is the eager one of
``output_attentions``; here the CLS rows are recomputed from the layer's q/k (``bench.models.clip_extras``,
tested equal). The official ``window_cls_selection`` asserts a 24 x 24 grid; here any grid with at least
one full window runs (windows that do not fit are left out, as the official loop's ``H // window_size``).
The merge uses the official ``scatter_add_``: on CUDA its float atomics make the merged features' last
bits run-dependent, as in the official code (the kept indices are deterministic).

Qwen2.5-VL port (``port: qwen25vl``; ``auto`` resolves to it when the Qwen2.5-VL adapter accepts the method),
following ``VScan/qwen/model/qwen2_5_vl_custom.py`` + ``qwen2_5_vl_utils.py``:

* **scores** (no [CLS]): the attention each patch *receives* (head sum, mean over all query patches) in the
  tower's first full-attention block (*local* scan, block 7 of 32) and its last block (*global*), averaged
  over the 2x2 patches of each merged token and reordered to raster order; served by the adapter
  (``merged_attn_received@first_full:raster``, ``merged_attn_received:raster``);
* **budget**: ``K = int(image_token_ratio * N)`` merged tokens (official ``0.167``), ``K // 2`` local and
  ``K - K // 2`` global;
* **local scan** (``window_selection``): ``4 x 4`` windows of merged tokens (``H // 4`` by ``W // 4``; the rows and
  columns past the last full window belong to it); tokens are visited by descending local score and a token is
  taken while its window holds fewer than ``ceil(K_local / windows)``, until ``K // 2`` are taken;
* **global scan**: the local picks' global score set to 0, then ``topk(K - K // 2)``; kept tokens sorted, the
  dropped ones merged into them (the same ``token_merging``); kept tokens keep their 3-D M-RoPE positions;
* **second stage** (``layer_list = [14]`` of 28, ``image_token_ratio_list = [0.333]``): before layer 14 runs, its
  ``input_layernorm``, ``q_proj``/``k_proj`` *without RoPE* (the official rotation is commented out) give the
  last token's ``softmax(q K^T / sqrt(d))`` (fp32, cast back), head mean over the image tokens;
  ``topk(int(0.333 * n))``, sorted; the kept tokens keep their original positions (no renumbering).

``budget: official`` runs ``0.167`` / ``[0.333]`` as given; ``layer_mean`` (default) scales the pre-LLM ratio so that
the nominal layer mean (``K`` before layer 14, ``int(0.333 K)`` after) is ``round(N (1 - ratio))``; ``after_prune``:
``K = round(N (1 - ratio))``. The head sum of the scores is computed as a head mean (the same ranking). Port
differences: a stage keeps at least one token (the official ``int(0.333 n)`` drops every image token when
``n < 4``); a merged grid smaller than one ``4 x 4`` window is refused (the official loop divides by zero windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.errors import ConfigError, IncompatibleMethodError
from methods.base import VisionContext, VisualSelection
from methods.fastv import view_scores
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, per_layer_counts, scale_layer
from methods.ranking import topk_sorted


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


def window_greedy_picks(attn: torch.Tensor, grid: tuple[int, int], k: int, window: int) -> torch.Tensor:
    """Local scan of the Qwen2.5-VL port (official ``window_selection``): ``(B, N)`` scores -> ``(B, k)`` raster
    indices in visiting order (descending score; stable on ties).

    Windows are ``window x window`` tokens, ``H // window`` by ``W // window`` of them, the leftover rows and
    columns joining the last window of their row / column; a token is taken while its window holds fewer than
    ``ceil(k / windows)``. Whether a token is taken depends only on the tokens of its window visited before it,
    so the greedy loop is the first ``k`` tokens, in visiting order, of rank ``< limit`` inside their window.
    """
    b, n = attn.shape
    h, w = grid
    wh, ww = h // window, w // window
    order = attn.argsort(dim=1, descending=True, stable=True)  # (B, N)
    wid = (order // w // window).clamp(max=wh - 1) * ww + (order % w // window).clamp(max=ww - 1)
    onehot = F.one_hot(wid, wh * ww)  # (B, N, W)
    rank = (onehot.cumsum(dim=1) * onehot).sum(dim=-1) - 1  # visits of the token's window up to it, minus one
    limit = math.ceil(k / (wh * ww))
    pos = (rank >= limit).to(torch.int8).sort(dim=1, stable=True).indices[:, :k]
    return order.gather(1, pos)


def vscan_qwen_keep_mask(local: torch.Tensor, glob: torch.Tensor, grid: tuple[int, int], budget: int, window: int = 4) -> torch.Tensor:
    """Qwen2.5-VL port's scans: ``(B, N)`` local and global received attention -> ``(B, N)`` kept mask
    (``budget // 2`` by :func:`window_greedy_picks`, then the ``budget - budget // 2`` best global scores with
    the local picks zeroed)."""
    picks_local = window_greedy_picks(local, grid, budget // 2, window)
    glob = glob.scatter(1, picks_local, 0)
    picks = torch.cat([picks_local, glob.topk(budget - budget // 2, dim=1).indices], dim=1)
    return torch.zeros_like(local, dtype=torch.bool).scatter(1, picks, True)


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
class VScan(InLLMMethod):
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
        ``cosine_similarity`` (official): the broadcast ``F.cosine_similarity``, which materialises
        ``(N - K) x K x D`` products (about 1 GB of memory traffic per LLaVA-1.5 image); ``matmul``: one
        product of normalised rows (named deviation: assignments can differ on last-bit ties).
    llm_span : {"official", "image"}
        The in-LLM stage's visual block where the tokens sent outnumber ``P`` (LLaVA-NeXT: ``P`` per tile).
        ``official``: as ``layer_prune``, the first ``min(P, tokens sent)`` tokens of the image block, scored by the
        row ``prompt_len + min(P, tokens sent) - 1`` (on LLaVA-NeXT the base tile's tokens, and a row before the
        last prompt token); ``image`` (named correction): the whole block, scored by the last prompt token. The
        two coincide on LLaVA-1.5 (``bench.models.llava_next_inllm``).
    budget : {"layer_mean", "after_prune", "official"}
        Module docstring.
    port : {"auto", "llava", "qwen25vl"}
        Which official code the rule follows: ``llava`` (CLS attention, ``llava_arch.py``), ``qwen25vl`` (the
        Qwen2.5-VL port, module docstring); ``auto``: ``llava``, resolved to ``qwen25vl`` by the Qwen2.5-VL adapter.
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
        if len(self.layer_list) != len(self.image_token_list) or not self.layer_list:
            raise ConfigError(f"vscan: layer_list {self.layer_list} and image_token_list {self.image_token_list} need one count per layer")
        if int(self.visual_token_num) < 1 or any(int(c) < 1 for c in self.image_token_list):
            raise ConfigError("vscan: visual_token_num and image_token_list must be >= 1")
        if not 0.0 <= float(self.global_ratio) <= 1.0 or int(self.window_size) < 1:
            raise ConfigError(f"vscan: global_ratio must be in [0, 1] and window_size >= 1, got {self.global_ratio}, {self.window_size}")
        if self.llm_span not in ("official", "image"):
            raise ConfigError(f"vscan: llm_span must be official or image, got {self.llm_span!r}")
        if self.port not in ("auto", "llava", "qwen25vl"):
            raise ConfigError(f"vscan: port must be auto, llava or qwen25vl, got {self.port!r}")
        if len(self.qwen_layer_list) != len(self.qwen_image_token_ratio_list) or not self.qwen_layer_list:
            raise ConfigError("vscan: qwen_layer_list and qwen_image_token_ratio_list need one ratio per layer")
        if not 0.0 < float(self.qwen_image_token_ratio) <= 1.0 or any(not 0.0 < float(r) <= 1.0 for r in self.qwen_image_token_ratio_list):
            raise ConfigError("vscan: the Qwen2.5-VL port's ratios must be in (0, 1]")
        if self.merge_similarity not in ("cosine_similarity", "matmul"):
            raise ConfigError(f"vscan: merge_similarity must be cosine_similarity or matmul, got {self.merge_similarity!r}")

    @property
    def qwen(self) -> bool:
        """Whether the Qwen2.5-VL port's rule runs (``port: qwen25vl``)."""
        return self.port == "qwen25vl"

    #: the Qwen2.5-VL port's scores, served by the adapter
    QWEN_NEEDS: ClassVar[tuple[str, ...]] = ("merged_attn_received@first_full:raster", "merged_attn_received:raster")

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

    # -------------------------------------------------------------- the Qwen2.5-VL port's budget
    def qwen_layers(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, int(self.qwen_ref_layers)) for x in self.qwen_layer_list]

    def qwen_stage_counts(self, k: int) -> list[int]:
        """Official ``next = int(ratio * current)`` per stage, from ``k`` tokens entering the LLM."""
        out, cur = [], k
        for r in self.qwen_image_token_ratio_list:
            cur = int(float(r) * cur)
            out.append(cur)
        return out

    def qwen_pre_count(self, n: int) -> int:
        """``K`` merged tokens kept before the LLM out of ``n`` (module docstring, ``budget``)."""
        if self.budget == "official":
            return max(1, int(float(self.qwen_image_token_ratio) * n))
        target = self.target(n)
        if self.budget == "after_prune":
            return max(1, min(n, target))
        # layer_mean: the pre-LLM ratio scaled so that the nominal layer mean of the official schedule is the target
        n_layers = int(self.qwen_ref_layers)
        layers = self.qwen_layers(n_layers)
        frac = [1.0]
        for r in self.qwen_image_token_ratio_list:
            frac.append(frac[-1] * float(r))
        mean_per_token = sum(per_layer_counts(list(zip(layers, frac[1:])), 1.0, n_layers)) / n_layers
        k = max(1, min(n, round(target / mean_per_token)))
        mean = sum(per_layer_counts(list(zip(layers, self.qwen_stage_counts(k))), k, n_layers)) / n_layers
        self._warn_infeasible(mean, target, n_layers)
        return k

    # -------------------------------------------------------------- budget
    def counts(self, n: int) -> tuple[int, list[int]]:
        """Nominal ``(P, [in-LLM counts])`` for ``n`` visual tokens, solved on the ``ref_layers``-deep LLM the
        layer indices refer to (the pre-LLM selection runs before the LLM's depth is known to the method)."""
        n_layers = int(self.ref_layers)
        p0, qs0 = int(self.visual_token_num), [int(c) for c in self.image_token_list]
        if self.budget == "official":
            return min(p0, n), [min(q, p0, n) for q in qs0]
        target = self.target(n)
        if self.budget == "after_prune":
            scale = target / p0
        else:
            layers = self.layers_for(n_layers)
            scale = target * n_layers / sum(per_layer_counts(list(zip(layers, qs0)), p0, n_layers))
        p = max(1, min(n, round(p0 * scale)))
        qs = [max(1, min(p, round(q * scale))) for q in qs0]
        if self.budget == "layer_mean" and p == n:  # P capped at N: the in-LLM counts carry the rest of the mean
            layers = self.layers_for(n_layers)
            rest = sum(per_layer_counts(list(zip(layers, qs0)), 0, n_layers))
            scale_q = (target * n_layers - layers[0] * n) / max(rest, 1)
            qs = [max(1, min(n, round(q * scale_q))) for q in qs0]
        if self.budget == "layer_mean":
            mean = sum(per_layer_counts(list(zip(self.layers_for(n_layers), qs)), p, n_layers)) / n_layers
            self._warn_infeasible(mean, target, n_layers)
        return p, qs

    def layers_for(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, self.ref_layers) for x in self.layer_list]

    def planned_counts(self, n_vis: int, n_layers: int) -> list[int]:
        """Visual tokens entering each layer: ``P`` from the first layer (the pre-LLM selection), then the stages."""
        if self.prune_ratio == 0.0 and self.budget != "official":
            return [n_vis] * n_layers
        p = min(self.qwen_pre_count(n_vis) if self.qwen else self.counts(n_vis)[0], n_vis)
        return per_layer_counts([(s.layer, s.n_keep) for s in self.plan_for(n_vis, p, n_layers)], p, n_layers)

    def measure(self, per_layer: list[float], n_vis: int, n_layers: int) -> float:
        """``after_prune`` counts the tokens the pre-LLM selection keeps (``P``, entering the first layer)."""
        if self.budget_measure == "after_prune":
            return float(per_layer[0])
        return super().measure(per_layer, n_vis, n_layers)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        """Stages for ``n_vis`` visual tokens entering the LLM when the tower gave ``n_vis`` (no pre-LLM loss)."""
        return self.plan_for(n_vis, n_vis, n_layers)

    def plan_for(self, n_grid: int, n_in: int, n_layers: int) -> list[Stage]:
        """In-LLM stages after the pre-LLM selection kept ``n_in`` of the tower's ``n_grid`` tokens: the
        official ``min(image_token_list[s], tokens present)``."""
        if self.prune_ratio == 0.0 and self.budget != "official":
            return []
        if self.qwen:  # original 3-D positions kept; counts from the tokens present (official int(ratio * n))
            return [Stage(layer, max(1, q), False) for layer, q in zip(self.qwen_layers(n_layers), self.qwen_stage_counts(n_in))]
        _, qs = self.counts(n_grid)
        out, cur = [], n_in
        for layer, q in zip(self.layers_for(n_layers), qs):
            cur = min(q, cur)
            out.append(Stage(layer, cur, True))
        return out

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
        if self.qwen:  # two tower blocks' q, k, v recomputed and their L x L scores (L = m^2 N patches)
            patches, w = cost.n_visual * getattr(cost, "vision_merge", 2) ** 2, cost.vision_width
            blocks = getattr(cost, "received_attention_blocks", 2)  # one where the first full-attention block is the last
            total = cost.batch * blocks * (2 * patches * w * 3 * w + 2 * patches * patches * w)
        else:
            total = cost.batch * cost.vision_extras(self.needs)
        t = cost.shapes.seq_len  # the sequence entering the first stage: the LLM input as prepared
        for kept in cost.kept:
            cur_t, cur = t, kept
            for st in self.plan_for(cost.n_visual, kept, int(self.qwen_ref_layers if self.qwen else self.ref_layers)):  # counts only: any depth
                total += cost.attention_rows(cur_t, 1, True)
                cur_t, cur = cur_t - (cur - st.n_keep), st.n_keep
        return total
