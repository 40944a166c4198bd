"""LLaVA-PruMerge and PruMerge+: adaptive CLS-attention pruning with key-similarity merging.

Paper: https://arxiv.org/abs/2403.15388 (code: 42Shawn/LLaVA-PruMerge,
``llava/model/multimodal_encoder/clip_encoder.py::token_prune_merge_advanced(_plus)``, ``outlier_dectection``).

methods.md 1 and 1b: the official code hooks CLIP layer 23's ``q_proj``/``k_proj`` (the last layer; its input is the
layer -2 features) and computes a *single-head* full-width attention ``softmax(q k^T / sqrt(C))`` (``C`` = the feature
width, 1024), CLS row, CLS column dropped. Kept tokens are the top-``L`` by that score, **in descending-score order**
(not raster). Each kept token ``i`` becomes ``x_i + sum_j w_j x_j`` over its 32 most key-similar other tokens (cosine
of the layer-23 keys, kept and pruned alike), ``w`` the unnormalised CLS weights; one extra token ``sum_{pruned} w x``
is appended. All on the layer -2 features, then the projector.

Budget (``budget``, recorded in the resolved config):

* ``adaptive`` (the official mode; its official defects handled per sample, :mod:`methods.prumerge_parts`):
  ``L = int(N * ratio)``, ``ratio`` the share of IQR outliers of *each sample's* scores; ``prune_ratio`` is then
  ignored except that 0 reproduces the unpruned model. PruMerge+ adds the spatial samples ``arange(0, N - 1,
  int(int(1 / ratio) / 3))`` not already kept. Lengths differ per sample: rows past ``n_kept`` are zero padding.
* ``fixed`` (for equal-ratio tables; the default here): the LLM sees exactly ``T = round(N(1 - prune_ratio))`` tokens:
  PruMerge the top ``T - 1`` plus the extra token; PruMerge+ the official fixed mode (``if_adaptive=False``, its
  duplicates and the tokens its ``complement_idx`` loses included) at that budget, or ``spatial: dedup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import PruningMethod, VisionContext, VisualSelection, keep_all
from methods.prumerge_parts import (  # noqa: F401 (adaptive_plus_samples, outlier_ratio, plus_split re-exported)
    AdaptiveBudget, adaptive_kept, adaptive_plus_samples, official_plus_fixed, outlier_ratio, padded_selection, plus_fixed, plus_split)


def prumerge_cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(B, S, C)`` raw ``q_proj``/``k_proj`` outputs -> ``(B, S - 1)`` single-head CLS-row scores."""
    attn = torch.softmax((q[:, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    return attn[:, 0, 1:]


def merge_centres(feats: torch.Tensor, keys: torch.Tensor, cls: torch.Tensor, idx: torch.Tensor, n_neighbors: int = 32,
                  rest: torch.Tensor | None = None) -> torch.Tensor:
    """PruMerge's centre update, then the extra token: ``(B, L + 1, C)`` (neighbours among the *other entries* of
    ``idx`` and ``rest``, as the official per-token loop). ``feats`` ``(B, N, C)`` layer -2 patch features; ``keys``
    ``(B, N, C)`` layer-23 keys of the patches (CLS row removed); ``cls`` ``(B, N)`` CLS-row scores (the merge
    weights); ``idx`` ``(B, L)`` kept tokens in output order (PruMerge+'s official fixed mode may repeat one);
    ``rest`` ``(B, R)`` the tokens left out (official ``complement_idx``; default: every token not in ``idx``)."""
    b, n, c = feats.shape
    l = idx.shape[1]
    if rest is None:
        free = torch.ones(b, n, dtype=torch.bool, device=feats.device).scatter_(1, idx, False)
        rest = free.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, : n - l]
    pool = torch.cat([idx, rest], dim=1)  # (B, P): every candidate entry, the kept ones first
    w_pool = cls.gather(1, pool)
    extra = (w_pool[:, l:].unsqueeze(1) @ feats.to(cls.dtype).gather(1, rest.unsqueeze(-1).expand(-1, -1, c))).to(feats.dtype)
    if l == 0:
        return extra
    kn = F.normalize(keys, p=2, dim=-1)
    kp = kn.gather(1, pool.unsqueeze(-1).expand(-1, -1, c))
    sim = kp[:, :l] @ kp.transpose(1, 2)  # (B, L, P)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # every other entry is a candidate (a duplicate too)
    nb = sim.topk(min(n_neighbors, pool.shape[1] - 1), dim=2).indices
    w = torch.zeros(b, l, pool.shape[1], dtype=feats.dtype, device=feats.device)
    w.scatter_(2, nb, w_pool.gather(1, nb.flatten(1)).view_as(nb).to(feats.dtype))
    fp = feats.gather(1, pool.unsqueeze(-1).expand(-1, -1, c))
    return torch.cat([fp[:, :l] + w @ fp, extra], dim=1)


@dataclass
class PruMerge(AdaptiveBudget, PruningMethod):
    """LLaVA-PruMerge (see the module docstring).

    Parameters
    ----------
    budget : {"fixed", "adaptive"}
        ``fixed``: exactly ``round(N * (1 - prune_ratio))`` tokens; ``adaptive``: the official IQR budget.
    attn_layer, feature_layer : int
        CLIP layer whose ``q_proj``/``k_proj`` score and match tokens (-1: 23 of 24); layer merged (-2, LLaVA's).
    n_neighbors : int
        Tokens merged into each kept token (32).
    spatial : {"official", "dedup"}
        PruMerge+'s fixed-mode samples: ``official`` (default) strided over all tokens, duplicates kept; ``dedup``
        spread over the not-yet-kept tokens.
    """

    budget: str = "fixed"
    attn_layer: int = -1
    feature_layer: int = -2
    n_neighbors: int = 32
    spatial: str = "official"

    merges: ClassVar[bool] = True
    requires_cls: ClassVar[bool] = True
    plus: ClassVar[bool] = False
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"budget": ("fixed", "adaptive"), "spatial": ("official", "dedup")}

    def selection_flops(self, cost) -> int:
        """Layer ``attn_layer``'s q/k, the single-head CLS row, the extra token (the ``N - L`` others), key similarity
        of the ``L`` kept tokens to all ``N``, their neighbour merge (``(L x N) @ (N x C)``), the projector on ``L + 1``."""
        if self.prune_ratio == 0.0:
            return 0
        d, n, s = cost.vision_width, cost.n_visual, cost.n_visual + int(cost.has_cls)
        kl = [(k, max(k - 1, 0)) for k in cost.kept]  # adaptive budgets differ per sample; L = kept - 1 (the extra token)
        total = sum(2 * s * d + 2 * (n - l) * d + 4 * l * n * d + k * cost.projector_per_token for k, l in kl)
        return cost.batch * cost.vision_extras({f"q_proj:{self.attn_layer}"}) + total

    @property
    def projects_own_tokens(self) -> bool:  # type: ignore[override]
        """Only the merged tower tokens reach the projector, as in the official ``token_prune_merge_advanced(_plus)``."""
        return self.prune_ratio > 0.0

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"q_proj:{self.attn_layer}", f"k_proj:{self.attn_layer}", f"hidden:{self.feature_layer}", "projector"})

    def kept_indices(self, cls: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Kept tokens in output order: ``(B, L)`` (fixed) or a list of ``(L_b,)`` (adaptive)."""
        if self.budget == "adaptive":
            return adaptive_kept(cls, self.plus)
        if self.plus:
            return plus_fixed(cls, self.n_keep(cls.shape[1]), self.spatial)[0]
        return cls.topk(self.n_keep(cls.shape[1]) - 1, dim=1).indices  # the extra summary token is part of the budget

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        b, n, _ = vis.shape
        if self.prune_ratio == 0.0:
            return keep_all(vis)
        self.check_compatible(ctx)
        q, k = ctx.get(f"q_proj:{self.attn_layer}"), ctx.get(f"k_proj:{self.attn_layer}")
        feats = ctx.get(f"hidden:{self.feature_layer}")[:, 1:]
        if feats.shape[1] != n:
            raise ValueError(f"{self.name}: layer features have {feats.shape[1]} patches, expected {n}")
        cls, keys, proj = prumerge_cls_attention(q, k), k[:, 1:], ctx.get("projector")
        fixed_plus = self.plus and self.budget == "fixed"  # its official mode also names the complement it merges
        idx, rest = plus_fixed(cls, self.n_keep(n), self.spatial) if fixed_plus else (self.kept_indices(cls), None)
        if isinstance(idx, list):  # adaptive: one length per sample, zero-padded to the longest
            rows = [proj(merge_centres(feats[i : i + 1], keys[i : i + 1], cls[i : i + 1], ix.unsqueeze(0), int(self.n_neighbors)))[0]
                    for i, ix in enumerate(idx)]
            return padded_selection(rows, vis)
        out = proj(merge_centres(feats, keys, cls, idx, int(self.n_neighbors), rest)).to(vis.dtype)
        return VisualSelection(out, None, torch.full((b,), out.shape[1], dtype=torch.long))


@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus uniformly spread spatial samples (see the module docstring)."""

    plus: ClassVar[bool] = True
