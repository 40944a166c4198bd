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

The official Qwen2-VL port (``port: qwen25vl``, ``auto`` on Qwen2.5-VL) and LLaVA-NeXT code (``port: llava_next``,
``auto`` on LLaVA-NeXT: this rule on every tile, then an LLM stage at layer 1) are described, with their plumbing,
in :mod:`methods.flowcut_ports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.flowcut_ports import (  # noqa: F401 (re-exported)
    PORTS,
    FlowCutPorts,
    qwen_llm_scores,
    qwen_tower_scores,
    qwen_tower_step,
)
from methods.inllm import InLLMMethod


def flowcut_scores(cls_row: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's patch scores: ``cls_row`` ``(B, H, S)`` attention probabilities of the CLS query (CLS column
    first), ``values`` ``(B, H, S, d)`` -> ``(B, S - 1)`` head-mean CLS attention of the patches and their scores."""
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
class FlowCut(FlowCutPorts, InLLMMethod):
    """FlowCut: on a CLIP tower (``port: llava``) ``target_num = round(N (1 - prune_ratio))`` patches reach the
    projector; the Qwen2.5-VL and LLaVA-NeXT ports: :mod:`methods.flowcut_ports`.

    Parameters
    ----------
    port : {"auto", "llava", "qwen25vl", "llava_next"}
        Which official code the rule follows; ``auto``: ``llava``, resolved by the Qwen2.5-VL / LLaVA-NeXT adapters.
    budget : {"official", "after_prune", "layer_mean"}
        The ports only: ``official`` / ``after_prune`` (the same here): ``target_num`` tokens from LLM layer 2 on;
        ``layer_mean`` (Qwen port): ``target_num`` solved for the layer mean.
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
    # the ports' LLM stage scores with the attention of the layer before its boundary, values included
    capture_offsets: ClassVar[tuple[int, ...]] = (-1,)
    capture_values: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.port not in PORTS:
            raise ConfigError(f"flowcut: port must be one of {', '.join(PORTS)}, got {self.port!r}")
        if int(self.qwen_tower_tokens) < 1 or int(self.qwen_llm_layer) < 0:
            raise ConfigError("flowcut: qwen_tower_tokens must be >= 1 and qwen_llm_layer >= 0")

    def after_block(self, i: int, n_blocks: int, x: torch.Tensor, cls_row: torch.Tensor, values: torch.Tensor, state: dict) -> torch.Tensor:
        """Decide after block ``i`` (of the ``n_blocks`` up to the feature layer).

        ``x`` ``(B, 1 + N', C)`` is the block's output (CLS row first; B images, or one image's tiles), ``cls_row``
        ``(B, H, 1 + N')`` and ``values`` ``(B, H, 1 + N', d)`` its attention; ``state`` carries the patches to keep
        (``"keep"``), the accumulated scores (``"cum"``) and the surviving patches' original indices (``"kept"``,
        ``(B, N')``) between blocks. Returns the tokens that enter the next block.
        """
        target = state["keep"] + 1
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
        if self.next_port:
            return self._next_selection_flops(cost)
        if self.prune_ratio == 0.0 or cost.shapes.vision_tokens is None:
            return 0
        return self._clip_rows_flops(cost, self.n_keep(cost.n_visual), every_cls_row=True)

    def _clip_rows_flops(self, cost, target: int, every_cls_row: bool = False) -> int:
        """Every block that scores (its input holds more than ``target`` patches): the recomputed CLS attention row
        and the ``v_cls . v^T`` row over its tokens (``every_cls_row``: the CLS row of the blocks that do not score
        too, as the adapter computes it in every block it runs). The patches entering each block come from the run
        (``cost.shapes.vision_tokens``, per sample)."""
        cls, w = int(cost.has_cls), cost.vision_width
        return sum((2 if t > target else int(every_cls_row)) * 2 * (t + cls) * w for row in cost.shapes.vision_tokens or () for t in row)
