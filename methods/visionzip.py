"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity.

Paper: https://arxiv.org/abs/2412.04467 (code: dvlab-research/VisionZip, ``visionzip/clip_encoder.py``,
``visionzip/utils.py::CLIPAttention_forward``).

methods.md 1 and 1b, at CLIP layer ``layer`` (-2, index 22 of 24):

* *Dominant*: ``s = sum_heads A[:, :, CLS, 1:]``; the CLS token plus the top-``(D - 1)`` patches,
  emitted in raster order (CLS first). ``D`` counts the CLS token: 192 = CLS + 161 + 30.
* *Contextual*: the ``R = S - D`` remaining tokens (raster order) are compared by their head-averaged
  layer keys (computed from that layer's input), L2-normalised. Targets are chosen *by position*: every
  ``max(1, R // C)``-th remaining token, the first ``C`` of them. Every other token joins the target of
  highest cosine (first-index ties, ``argmax``), and a contextual token is ``h_target + mean(h_assigned)``
  (target *plus* the mean, counts clamped at 1), on the layer's output (:func:`methods.visionzip_ports.contextual_merge`).
* *Output*: ``[dominant; contextual]`` through the projector (merging happens in the tower's space); only
  these ``D + C`` tokens are projected, as officially (:attr:`VisionZip.projects_own_tokens`).

Budget split: the official 162+30, 108+20, 54+10 all give ``C = T * 30 / 192``; for any budget ``T``, here
``C = round(T * contextual_share)`` and ``D = T - C``, unless ``dominant`` and ``contextual`` are given.
On Qwen2.5-VL (no [CLS]) the same rule runs on received attention and the merged tokens: :mod:`methods.visionzip_ports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext, VisualSelection, keep_all
from methods.visionzip_ports import (
    KEYS_KEY, SCORE_KEY, VisionZipQwenPort, contextual_merge, visionzip_received, visionzip_received_flops)


def visionzip_merge(cls_attn: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int,
                    return_index: bool = False):
    """The VisionZip rule on one layer's tensors -> ``(B, D + C, C_vis)``: CLS and dominant patches in raster
    order, then the contextual tokens.

    ``cls_attn`` ``(B, H, S)`` per-head CLS-row attention (CLS column first); ``keys`` ``(B, S, d)`` head-averaged
    keys of that layer; ``hidden`` ``(B, S, C_vis)`` its output (CLS row first); ``dominant`` ``D`` (CLS
    included, ``>= 1``) and ``contextual`` ``C``. With ``return_index`` also ``(B, D + C)`` long: each row's token
    (``0`` = CLS, ``1..N`` the patches) for the dominant rows, ``-1`` for the contextual ones.
    """
    b, s, c = hidden.shape
    dev = hidden.device
    top = cls_attn.sum(dim=1)[:, 1:].topk(dominant - 1, dim=1).indices + 1
    keep = torch.zeros(b, s, dtype=torch.bool, device=dev)
    keep[:, 0] = True
    keep.scatter_(1, top, True)
    # stable sort of the mask lists kept tokens first, each group in raster order (the masked_select order)
    order = (~keep).to(torch.int8).sort(dim=1, stable=True).indices
    dom_idx, rem_idx = order[:, :dominant], order[:, dominant:]
    dom = hidden.gather(1, dom_idx.unsqueeze(-1).expand(-1, -1, c))
    index = torch.cat([dom_idx, dom_idx.new_full((b, max(contextual, 0)), -1)], dim=1)
    if contextual <= 0:
        return (dom, index) if return_index else dom
    metric = keys.gather(1, rem_idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    tokens, _ = contextual_merge(metric, hidden.gather(1, rem_idx.unsqueeze(-1).expand(-1, -1, c)), contextual)
    out = torch.cat([dom, tokens], dim=1)
    return (out, index) if return_index else out


@dataclass
class VisionZip(VisionZipQwenPort, PruningMethod):
    """VisionZip on LLaVA: ``T = round(N * (1 - prune_ratio))`` tokens = ``D`` dominant (CLS included) + ``C`` contextual.

    Parameters
    ----------
    layer : int
        CLIP layer for attention, keys and features (``-2``).
    contextual_share : float
        ``C / T`` when the counts are not given (``30 / 192``, the official split).
    dominant, contextual : int or None
        Explicit ``D`` and ``C`` (both or neither); they override the ratio.
    """

    merges: ClassVar[bool] = True

    layer: int = -2
    contextual_share: float = 30 / 192
    dominant: int | None = None
    contextual: int | None = None

    requires_cls: ClassVar[bool] = True
    graph_safe: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.dominant is None) != (self.contextual is None):
            raise ConfigError("visionzip: give both dominant and contextual, or neither")
        if not 0.0 <= float(self.contextual_share) < 1.0:
            raise ConfigError(f"visionzip: contextual_share must be in [0, 1), got {self.contextual_share}")

    def selection_flops(self, cost) -> int:
        """CLS row and keys of the layer, contextual-token similarity and merge, the projector on the ``D + C`` tokens."""
        if self.prune_ratio == 0.0 and self.dominant is None:
            return 0
        dom, ctxn = self.counts(cost.n_visual)
        if not getattr(cost, "has_cls", True):
            return cost.batch * visionzip_received_flops(cost, dom, ctxn)
        total = cost.vision_extras(self.needs) + (dom + ctxn) * cost.projector_per_token
        if ctxn > 0:
            r = cost.n_visual + int(cost.has_cls) - dom
            n_tgt = len(range(0, r, max(1, r // ctxn))[:ctxn])  # as contextual_merge
            # key cosine of the others to the targets, then their one-hot assignment sums (a bmm)
            total += 2 * (r - n_tgt) * n_tgt * cost.vision_head_dim + 2 * n_tgt * (r - n_tgt) * cost.vision_width
        return cost.batch * total

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"cls_attn:{self.layer}", f"keys:{self.layer}", f"hidden:{self.layer}", "projector"})

    @property
    def projects_own_tokens(self) -> bool:  # type: ignore[override]
        """The official ``CLIPVisionTower_VisionZip.forward`` returns the ``D + C`` merged tower tokens and only
        those reach the projector: the adapter skips projecting all ``N`` (``reduce`` projects its own)."""
        return not (self.prune_ratio == 0.0 and self.dominant is None)

    def counts(self, n: int) -> tuple[int, int]:
        """``(D, C)`` for ``n`` visual tokens."""
        if self.dominant is not None:
            return int(self.dominant), int(self.contextual)
        t = self.n_keep(n)
        c = min(int(round(t * float(self.contextual_share))), t - 1)
        return t - c, c

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        b, n, _ = vis.shape
        if self.prune_ratio == 0.0 and self.dominant is None:
            return keep_all(vis)
        self.check_compatible(ctx)
        d, c = self.counts(n)
        if not ctx.has_cls:
            feats, pos = visionzip_received(ctx.get(SCORE_KEY), ctx.get(KEYS_KEY), vis, d, c)
            return VisualSelection(feats, None, torch.full((b,), feats.shape[1], dtype=torch.long), {"source_index": pos})
        hidden = ctx.get(f"hidden:{self.layer}")
        if hidden.shape[1] != n + 1:
            raise ValueError(f"visionzip: layer features have {hidden.shape[1]} rows, expected CLS + {n}")
        merged, index = visionzip_merge(ctx.get(f"cls_attn:{self.layer}"), ctx.get(f"keys:{self.layer}"), hidden, d, c, return_index=True)
        feats = ctx.get("projector")(merged).to(vis.dtype)
        # source_index: each row's token (0 = CLS, 1..N patches; -1 contextual), for layouts that place rows by patch
        return VisualSelection(feats, None, torch.full((b,), d + c, dtype=torch.long), {"source_index": index})
