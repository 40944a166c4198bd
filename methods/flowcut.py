"""FlowCut: progressive pruning inside the CLIP layers, each layer's cut set by its attention entropy.

Paper: https://arxiv.org/abs/2505.19536 (code: TungChintao/FlowCut, ``flowcut/modeling_clip_flowcut.py``
``CLIPEncoderLayer_forward``/``CLIPAttention_forward``, ``flowcut/utils_flowcut.py``, ``flowcut/main.py``).

What the official code does on LLaVA-1.5 (``flowcut(model, target_num)``, the only argument;
``target = target_num + 1`` tokens with the CLS token, ``select_layer = 24 - 2 = 22``):

* every CLIP layer ``i`` runs on the current tokens; *after* its MLP, while more than ``target`` tokens
  remain, it scores the patches from its own attention: ``a`` = head-mean CLS-row attention
  probabilities (patch columns, no renormalisation), ``s`` = head-mean ``softmax(v_cls . v^T)`` (values,
  no scaling), ``score = (a / sum a + s / sum s) * |mean_heads(v)|_1``, accumulated as
  ``c = 0.5 c + 0.5 score`` (the first scored layer sets ``c = score``);
* with ``rpl = select_layer - i - 1`` remaining layers, layers with an even ``rpl`` cut: ``rpl = 0``
  (layer 21) cuts to ``target``; otherwise the cut is
  ``round((N' - target_num) / sqrt(rpl) * (1 - (H(a) / log N')^2))`` tokens (``H`` = entropy of ``a``
  normalised, ``N'`` = current patches), never below ``target``; the kept patches are the top-``c`` ones,
  re-sorted (raster order survives), the CLS token stays in front;
* LLaVA takes layer 22's output (CLS dropped) through the projector: ``target_num`` tokens.

Here ``target_num = round(N (1 - prune_ratio))`` and ``select_layer`` is the number of blocks up to
LLaVA's feature layer minus one (22 on CLIP ViT-L with feature layer -2). The adapter
(``bench.models.vision_prune``) runs the blocks and hands each block's CLS attention row and values
to :meth:`FlowCut.after_block`.

Port (documented deviations): the official cut is the *batch maximum* of the per-image counts; the
adapter runs the tower one image at a time, so every image gets its own count (a sample's tokens do
not depend on its batch neighbours). The entropy uses ``xlogy`` (``0 log 0 = 0``) where the official
``p log p`` would give NaN and crash on an attention probability that underflowed to 0.

Qwen2.5-VL port (``port: qwen25vl``; ``auto`` resolves to it on the Qwen2.5-VL adapter), following the official
``FlowCut_Qwen`` (written for Qwen2-VL, "also applicable to Qwen2.5-VL"; the rule: :mod:`methods.flowcut_ports`):
the tower keeps ``2 target_num`` merged tokens (``8 target_num`` patches, global-query relation attention times the
values' L1 norm, accumulated, entropy-set cuts at even remaining blocks), the merger merges runs of 4 surviving
patches, those tokens take the first ``2 target_num`` positions of the image block, and LLM layer 1's last-token
relation + semantic attention keeps ``target_num`` of them from layer 2 on. ``target_num = round(N (1 - ratio))``
(``N`` merged tokens of the image): the tokens entering layers 2+, the official argument (``budget: official``
counts it, after the LLM stage); ``budget: layer_mean`` solves ``target_num`` so that the mean over the LLM's layers
is ``round(N (1 - ratio))``. Qwen2.5-VL's tower (windows, which Qwen2-VL has not) is handled by the adapter
(``Qwen25VLAdapter.encode_flowcut``): each surviving patch stays in its window, windows shrink as patches go, and the
merged tokens are not un-permuted from the window order (a run of 4 survivors is no 2x2 group; the official Qwen2-VL
code has no permutation to undo). Port differences: batched (the official port supports batch 1 only; here the tower
runs per image and the LLM stage per group of equal token counts), and a negative entropy cut is clamped at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError, IncompatibleMethodError
from methods.base import PruningMethod, VisionContext
from methods.flowcut_ports import qwen_llm_scores, qwen_tower_scores, qwen_tower_step
from methods.inllm import InLLMMethod, Stage, StageOut, StageView


def flowcut_scores(cls_row: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's patch scores.

    Parameters
    ----------
    cls_row : torch.Tensor
        ``(B, H, S)`` attention probabilities of the CLS query (CLS column first).
    values : torch.Tensor
        ``(B, H, S, d)`` the layer's values per head.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(B, S - 1)`` head-mean CLS attention of the patches, and ``(B, S - 1)`` FlowCut scores.
    """
    a = cls_row[:, :, 1:].mean(dim=1)
    sem = (values[:, :, :1] @ values.transpose(-1, -2)).softmax(dim=-1).squeeze(2).mean(dim=1)[:, 1:]
    v = values.mean(dim=1)[:, 1:]
    score = (a / a.sum(dim=-1, keepdim=True) + sem / sem.sum(dim=-1, keepdim=True)) * v.norm(p=1, dim=-1)
    return a, score


def entropy_cut(a: torch.Tensor, rpl: int, target_patches: int) -> int:
    """Tokens to cut at a layer ``rpl`` layers before the last cut: ``(B, N')`` attention -> the batch max."""
    n = a.shape[-1]
    p = a / a.sum(dim=-1, keepdim=True)
    ent = -torch.xlogy(p, p).sum(dim=-1) / torch.log(torch.tensor(n))
    r = (n - target_patches) / rpl**0.5 * (1 - ent**2)
    # clamped at 0: near-uniform attention (random weights) in fp16 can round the entropy ratio above 1, and a
    # negative cut would ask topk for more tokens than exist, where the official code stops with an error
    return max(int(r.max().round()), 0)


@dataclass
class FlowCut(InLLMMethod):
    """FlowCut: on a CLIP tower (``port: llava``) ``target_num = round(N (1 - prune_ratio))`` patches reach the
    projector; on Qwen2.5-VL (``port: qwen25vl``) the official Qwen port's two stages (module docstring).

    Parameters
    ----------
    port : {"auto", "llava", "qwen25vl"}
        Which official code the rule follows; ``auto``: ``llava``, resolved to ``qwen25vl`` by the Qwen2.5-VL adapter.
    budget : {"official", "after_prune", "layer_mean"}
        Qwen port only: ``official`` / ``after_prune`` (the same here): ``target_num`` tokens from LLM layer 2 on;
        ``layer_mean``: ``target_num`` solved for the layer mean.
    qwen_tower_tokens : int
        Qwen port: merged tokens leaving the tower per ``target_num`` (official 2: ``visual.target_num = 2 target_num``).
    qwen_llm_layer : int
        Qwen port: the LLM layer whose attention scores the image (official 1, on any depth); layers after it see
        ``target_num`` tokens.
    """

    port: str = "auto"
    qwen_tower_tokens: int = 2
    qwen_llm_layer: int = 1

    requires_cls: ClassVar[bool] = True
    # the Qwen port's LLM stage scores with the attention of the layer before its boundary, values included
    capture_offsets: ClassVar[tuple[int, ...]] = (-1,)
    capture_values: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.port not in ("auto", "llava", "qwen25vl"):
            raise ConfigError(f"flowcut: port must be auto, llava or qwen25vl, got {self.port!r}")
        if int(self.qwen_tower_tokens) < 1 or int(self.qwen_llm_layer) < 0:
            raise ConfigError("flowcut: qwen_tower_tokens must be >= 1 and qwen_llm_layer >= 0")

    @property
    def qwen(self) -> bool:
        """Whether the Qwen port's rule runs (``port: qwen25vl``)."""
        return self.port == "qwen25vl"

    @property
    def stage(self) -> str:  # type: ignore[override]
        return "in_llm" if self.qwen else "in_vision"

    @property
    def pre_llm_selection(self) -> bool:  # type: ignore[override]
        """The Qwen port's LLM stage follows the tower's cut (its counts depend on the image's merged grid)."""
        return self.qwen

    # -------------------------------------------------------------- budget (the CLIP rule: the pre-LLM convention)
    @property
    def budget_mode(self) -> str:  # type: ignore[override]
        return InLLMMethod.budget_mode.fget(self) if self.qwen else PruningMethod.budget_mode.fget(self)

    def budget_fields(self, n_vis: int, n_layers: int, kept: float | None, per_layer: list[float] | None) -> dict:
        if self.qwen:
            return InLLMMethod.budget_fields(self, n_vis, n_layers, kept, per_layer)
        return PruningMethod.budget_fields(self, n_vis, n_layers, kept, per_layer)

    def check_budget(self, n_vis: int, n_layers: int) -> None:
        if self.qwen:
            InLLMMethod.check_budget(self, n_vis, n_layers)

    def check_compatible(self, ctx: VisionContext) -> None:
        if not self.qwen:
            if self.budget != "official":
                raise IncompatibleMethodError(f"flowcut: budget={self.budget} applies to the Qwen2.5-VL port only; the CLIP rule keeps round(N (1 - ratio)) patches")
            return super().check_compatible(ctx)
        if ctx.has_cls:
            raise IncompatibleMethodError(f"method {self.name!r} with port=qwen25vl runs on Qwen2.5-VL's tower only")

    # -------------------------------------------------------------- the Qwen port
    def qwen_target(self, n: int, n_layers: int) -> int:
        """``target_num`` for an image of ``n`` merged tokens in an ``n_layers``-deep LLM (module docstring)."""
        b = self.target(n)
        if self.budget != "layer_mean":
            return b
        # layers 0..qwen_llm_layer see min(n, tower tokens), the rest target_num: the closest mean to b
        head = min(int(self.qwen_llm_layer) + 1, n_layers)
        def mean(t: int) -> float:
            return (head * min(n, int(self.qwen_tower_tokens) * t) + (n_layers - head) * min(t, n)) / n_layers
        return min(range(1, n + 1), key=lambda t: (abs(mean(t) - b), t))

    def layers_for(self, n_layers: int) -> list[int]:
        return [int(self.qwen_llm_layer) + 1] if self.qwen else []

    def qwen_tower_target(self, n: int, n_layers: int, merge_area: int) -> int:
        """Patches the tower keeps at most: ``qwen_tower_tokens * target_num`` merged tokens of ``merge_area`` patches."""
        return int(self.qwen_tower_tokens) * self.qwen_target(n, n_layers) * merge_area

    def tower_step(self, i: int, n_blocks: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, target: int, state: dict) -> torch.Tensor | None:
        """After tower block ``i``: the kept patches' sorted indices into the current ones (``None``: all kept).
        ``q``/``k``/``v`` ``(H, L, d)`` the block's rotated queries and keys and its values, one image."""
        attn, score = qwen_tower_scores(q, k, v)
        return qwen_tower_step(i, n_blocks, attn, score, target, state)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        """The LLM stage when the tower gave ``n_vis`` (no tower cut)."""
        return self.plan_for(n_vis, n_vis, n_layers)

    def plan_for(self, n_grid: int, n_in: int, n_layers: int) -> list[Stage]:
        """``target_num`` of the image's ``n_grid`` merged tokens from layer ``qwen_llm_layer + 1`` on, when the
        ``n_in`` tokens entering the LLM outnumber it (official ``visual_token_num > target_num``)."""
        if self.prune_ratio == 0.0 or not self.qwen:
            return []
        t = self.qwen_target(n_grid, n_layers)
        layer = int(self.qwen_llm_layer) + 1
        if n_in <= t or layer >= n_layers:
            return []
        return [Stage(layer, t, False)]

    def planned_counts(self, n_vis: int, n_layers: int) -> list[int]:
        """Tokens entering each layer: the tower's ``min(N, qwen_tower_tokens * target_num)``, then the stage."""
        from methods.inllm import per_layer_counts

        if self.prune_ratio == 0.0:
            return [n_vis] * n_layers
        n_in = min(n_vis, int(self.qwen_tower_tokens) * self.qwen_target(n_vis, n_layers))
        return per_layer_counts([(s.layer, s.n_keep) for s in self.plan_for(n_vis, n_in, n_layers)], n_in, n_layers)

    def reduce(self, vis, ctx):
        if self.qwen:  # the Qwen port cuts inside the tower (the adapter's encode_flowcut), not on projected tokens
            raise IncompatibleMethodError("flowcut: the Qwen2.5-VL port selects inside the vision tower, through the adapter")
        return super().reduce(vis, ctx)

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        layer = stage.layer - 1
        q = view.query_rows(layer, "last")  # (B, H, 1, d) rotated
        k = view.visual(view.keys(layer, heads_first=False))  # (B, n, H_kv, d) rotated
        v_all = view.values(layer)  # (B, T, H_kv, d)
        v = view.visual(v_all)
        rep = q.shape[1] // k.shape[2]
        k, v = (x.transpose(1, 2).repeat_interleave(rep, dim=1) for x in (k, v))
        v_last = v_all[:, -1:].transpose(1, 2).repeat_interleave(rep, dim=1)
        score = qwen_llm_scores(q, k, v_last, v)
        return StageOut(score.topk(stage.n_keep, dim=1).indices.sort(dim=1).values)

    def after_block(self, i: int, n_blocks: int, x: torch.Tensor, cls_row: torch.Tensor, values: torch.Tensor, state: dict) -> torch.Tensor:
        """Decide after block ``i`` (of the ``n_blocks`` up to the feature layer).

        ``x`` ``(B, 1 + N', C)`` is the block's output (CLS row first), ``cls_row`` ``(B, H, 1 + N')`` and
        ``values`` ``(B, H, 1 + N', d)`` its attention; ``state`` carries the accumulated scores
        (``"cum"``) and the surviving patches' original indices (``"kept"``, ``(B, N')``) between blocks.
        Returns the tokens that enter the next block.
        """
        target = self.n_keep(state["n"]) + 1
        if x.shape[1] <= target:
            return x
        a, score = flowcut_scores(cls_row, values)
        cum = state.get("cum")
        state["cum"] = cum = score if cum is None else 0.5 * cum + 0.5 * score
        rpl = n_blocks - 2 - i  # the official select_layer - i - 1, select_layer = n_blocks - 1
        if rpl % 2:
            return x
        cut = entropy_cut(a, rpl, target - 1) if rpl else x.shape[1]
        keep = cum.topk(max(x.shape[1] - cut, target) - 1, dim=1).indices.sort(dim=1).values
        state["cum"] = cum.gather(1, keep)
        state["kept"] = state["kept"].gather(1, keep)
        patches = x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)

    def selection_flops(self, cost) -> int:
        if self.qwen:
            return self._qwen_selection_flops(cost)
        return self._clip_selection_flops(cost)

    def _qwen_selection_flops(self, cost) -> int:
        """Every block of a tower that cuts (``L`` patches entering it, ``cost.shapes.vision_tokens``): the global
        query's row over the ``L`` keys, ``2 L d`` (the official attention forward computes it in every block); the
        LLM stage: the last token's query row over the image keys and its value row over the image values,
        ``2 * 2 n H d_head`` for ``n`` tokens (``H d_head`` = the LLM width on Qwen2). Means, norms and softmaxes
        are elementwise (uncounted)."""
        if self.prune_ratio == 0.0:
            return 0
        rows = cost.shapes.vision_tokens or ()
        total = sum(2 * t * cost.vision_width for row in rows for t in row)
        n_layers = cost.config.text_config.num_hidden_layers
        for kept in cost.kept:
            if self.plan_for(cost.n_visual, kept, n_layers):
                total += 2 * 2 * kept * cost.llm_width
        return total

    def _clip_selection_flops(self, cost) -> int:
        """Every block that scores (its input holds more than ``target`` patches): the recomputed CLS
        attention row and the ``v_cls . v^T`` row over its tokens. The patches entering each block come
        from the run (``cost.shapes.vision_tokens``, per sample)."""
        rows = cost.shapes.vision_tokens
        if self.prune_ratio == 0.0 or rows is None:
            return 0
        target, cls = self.n_keep(cost.n_visual), int(cost.has_cls)
        return sum(2 * (2 * (t + cls) * cost.vision_width) for row in rows for t in row if t > target)
