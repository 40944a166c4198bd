"""LLaVA-PruMerge and PruMerge+: adaptive CLS-attention pruning with key-similarity merging.

Paper: https://arxiv.org/abs/2403.15388 (code: 42Shawn/LLaVA-PruMerge,
``llava/model/multimodal_encoder/clip_encoder.py::token_prune_merge_advanced(_plus)``, ``outlier_dectection``).

methods.md 1 and 1b: the official code hooks CLIP layer 23's ``q_proj``/``k_proj`` (the last layer;
its input is the layer -2 features) and computes a *single-head* full-width attention
``softmax(q k^T / sqrt(C))`` (``C`` = the feature width, 1024), CLS row, CLS column dropped. Kept tokens
are the top-``L`` by that score, **in descending-score order** (not raster). Each kept token ``i``
becomes ``x_i + sum_j w_j x_j`` over its 32 most key-similar other tokens (cosine of the layer-23
keys, the kept and the pruned ones alike), ``w`` the unnormalised CLS weights; one extra token
``sum_{pruned} w x`` is appended. Everything happens on the layer -2 features, then the projector.

Budget (``budget`` field, recorded in the resolved config):

* ``adaptive`` (the official mode): ``L = int(N * ratio)`` with ``ratio`` the share of IQR outliers
  (``> Q3 + 1.5 IQR``, linear-interpolated percentiles as ``np.percentile``, here in float64) of
  *each sample's* scores; ``prune_ratio`` is then ignored except that 0 reproduces the unpruned model.
  PruMerge+ adds the spatial samples ``arange(0, N - 1, int(int(1 / ratio) / 3))`` not already kept.
* ``fixed`` (for equal-ratio tables; the default here): the LLM sees exactly ``T = round(N(1 - prune_ratio))``
  tokens: PruMerge keeps the top ``T - 1`` plus the extra token; PruMerge+ reproduces the official fixed mode
  (``if_adaptive=False``, duplicates and the tokens its ``complement_idx`` loses included) at the budget asked
  for, or with ``spatial: dedup`` the corrected variant (:mod:`methods.prumerge_parts`).
Official defects handled per sample (methods.md policy): the outlier ratio is computed over the whole
batch flattened and PruMerge+'s "not already kept" filter uses the whole batch's indices (here: per
sample); adaptive PruMerge+ crashes without outliers (here ``int(1 / ratio)`` is taken as ``N``, and
the top-k part is empty) and for ``ratio > 1/3`` (stride 0; here the stride is at least 1).
Adaptive outputs differ in length per sample: rows past ``n_kept`` are zero padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext, VisualSelection
from methods.prumerge_parts import adaptive_plus_samples, official_plus_fixed, plus_split, spatial_fill  # noqa: F401 (plus_split re-exported)


def prumerge_cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(B, S, C)`` raw ``q_proj``/``k_proj`` outputs -> ``(B, S - 1)`` single-head CLS-row scores."""
    c = q.shape[-1]
    attn = torch.softmax((q[:, :1] @ k.transpose(-2, -1)) * c**-0.5, dim=-1)
    return attn[:, 0, 1:]


def outlier_ratio(scores: torch.Tensor) -> float:
    """Share of ``(N,)`` scores above ``Q3 + 1.5 * IQR`` (linear percentiles)."""
    v = scores.detach().float().double()
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=torch.float64, device=v.device)).tolist()
    upper = q3 + 1.5 * (q3 - q1)
    return int((v > upper).sum()) / v.numel()


def merge_centres(feats: torch.Tensor, keys: torch.Tensor, cls: torch.Tensor, idx: torch.Tensor, n_neighbors: int = 32,
                  rest: torch.Tensor | None = None) -> torch.Tensor:
    """PruMerge's centre update and extra token.

    Parameters
    ----------
    feats : torch.Tensor
        ``(B, N, C)`` layer -2 patch features.
    keys : torch.Tensor
        ``(B, N, C)`` layer-23 keys of the patches (CLS row removed).
    cls : torch.Tensor
        ``(B, N)`` CLS-row scores (the merge weights).
    idx : torch.LongTensor
        ``(B, L)`` kept tokens in output order (PruMerge+'s official fixed mode may repeat a token).
    rest : torch.LongTensor, optional
        ``(B, R)`` the tokens left out (official ``complement_idx``); default: every token not in ``idx``.

    Returns
    -------
    torch.Tensor
        ``(B, L + 1, C)``: ``x_i + sum_{j in nn32(i)} w_j x_j`` for each kept entry ``i`` (its neighbours are
        taken among the *other entries* of ``idx`` and ``rest``, as the official per-token loop does), then
        ``sum_{rest} w x``.
    """
    b, n, c = feats.shape
    l = idx.shape[1]
    if rest is None:
        free = torch.ones(b, n, dtype=torch.bool, device=feats.device).scatter_(1, idx, False)
        rest = free.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, : n - l]
    pool = torch.cat([idx, rest], dim=1)  # (B, P): every candidate entry, the kept ones first
    p = pool.shape[1]
    w_pool = cls.gather(1, pool)
    extra = (w_pool[:, l:].unsqueeze(1) @ feats.to(cls.dtype).gather(1, rest.unsqueeze(-1).expand(-1, -1, c))).to(feats.dtype)
    if l == 0:
        return extra
    kn = F.normalize(keys, p=2, dim=-1)
    kp = kn.gather(1, pool.unsqueeze(-1).expand(-1, -1, c))
    sim = kp[:, :l] @ kp.transpose(1, 2)  # (B, L, P)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # every other entry is a candidate (a duplicate too)
    nb = sim.topk(min(n_neighbors, p - 1), dim=2).indices
    w = torch.zeros(b, l, p, dtype=feats.dtype, device=feats.device)
    w.scatter_(2, nb, w_pool.gather(1, nb.flatten(1)).view_as(nb).to(feats.dtype))
    fp = feats.gather(1, pool.unsqueeze(-1).expand(-1, -1, c))
    return torch.cat([fp[:, :l] + w @ fp, extra], dim=1)


@dataclass
class PruMerge(PruningMethod):
    """LLaVA-PruMerge (see the module docstring).

    Parameters
    ----------
    budget : {"fixed", "adaptive"}
        ``fixed``: exactly ``round(N * (1 - prune_ratio))`` tokens; ``adaptive``: the official IQR budget.
    attn_layer : int
        CLIP layer whose ``q_proj``/``k_proj`` outputs score and match tokens (-1 = layer 23 of 24).
    feature_layer : int
        Layer whose output is merged (-2, LLaVA's feature layer).
    n_neighbors : int
        Tokens merged into each kept token (32).
    spatial : {"official", "dedup"}
        PruMerge+'s fixed-mode spatial samples: ``official`` (default) the official stride samples of all
        tokens, duplicates kept; ``dedup`` spread over the not-yet-kept tokens (module docstring). Unused by
        PruMerge and by the adaptive budget.
    """

    merges: ClassVar[bool] = True

    budget: str = "fixed"
    attn_layer: int = -1
    feature_layer: int = -2
    n_neighbors: int = 32
    spatial: str = "official"

    requires_cls: ClassVar[bool] = True
    plus: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget not in ("fixed", "adaptive"):
            raise ConfigError(f"{self.name}: budget must be 'fixed' or 'adaptive', got {self.budget!r}")
        if self.spatial not in ("official", "dedup"):
            raise ConfigError(f"{self.name}: spatial must be 'official' or 'dedup', got {self.spatial!r}")

    def selection_flops(self, cost) -> int:
        """Layer ``attn_layer``'s q/k, the single-head CLS row, the extra token, key similarity of the ``L``
        kept tokens to all ``N``, their neighbour merge (``(L x N) @ (N x C)``) and the projector on ``L + 1``."""
        if self.prune_ratio == 0.0:
            return 0
        d, n = cost.vision_width, cost.n_visual
        s = n + int(cost.has_cls)
        total = 0
        for kept in cost.kept:  # adaptive budgets differ per sample; L = kept - 1 (the extra token)
            l = kept - 1
            total += 2 * s * d + 2 * n * d + (4 * l * n * d if l > 0 else 0) + kept * cost.projector_per_token
        return cost.batch * cost.vision_extras({f"q_proj:{self.attn_layer}"}) + total

    @property
    def projects_own_tokens(self) -> bool:  # type: ignore[override]
        """The official ``token_prune_merge_advanced(_plus)`` returns the merged tower tokens and only those reach
        the projector: the adapter skips projecting all ``N`` (``reduce`` projects its own)."""
        return self.prune_ratio > 0.0

    @property
    def budget_mode(self) -> str:  # type: ignore[override]
        """``adaptive``: the official IQR budget (the kept count is the method's, not ``n_keep(N)``)."""
        return "pre_llm_exact" if self.budget == "fixed" else "adaptive"

    @property
    def graph_safe(self) -> bool:  # type: ignore[override]
        """Fixed budgets are CUDA-graph capturable; the adaptive budget reads each sample's IQR
        outlier count on the host and has a value-dependent output length, so it stays eager."""
        return self.budget == "fixed"

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"q_proj:{self.attn_layer}", f"k_proj:{self.attn_layer}", f"hidden:{self.feature_layer}", "projector"})

    def kept_indices(self, cls: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Kept tokens in output order: ``(B, L)`` (fixed) or a list of ``(L_b,)`` (adaptive)."""
        b, n = cls.shape
        if self.budget == "fixed":
            if self.plus and self.spatial == "official":
                return official_plus_fixed(cls, self.n_keep(n))[0]
            m = self.n_keep(n) - 1  # the extra summary token is part of the budget
            n_top = math.ceil(m / 2) if self.plus else m
            top = cls.topk(n_top, dim=1).indices
            return torch.cat([top, spatial_fill(top, n, m - n_top)], dim=1) if self.plus else top
        out = []
        for i in range(b):
            ratio = outlier_ratio(cls[i])
            top = cls[i : i + 1].topk(int(n * ratio), dim=1).indices[0]
            out.append(torch.cat([top, adaptive_plus_samples(top, ratio, n)]) if self.plus else top)
        return out

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        b, n, _ = vis.shape
        if self.prune_ratio == 0.0:
            return VisualSelection(vis, torch.arange(n, device=vis.device).expand(b, n), torch.full((b,), n, dtype=torch.long))
        self.check_compatible(ctx)
        q, k = ctx.get(f"q_proj:{self.attn_layer}"), ctx.get(f"k_proj:{self.attn_layer}")
        feats = ctx.get(f"hidden:{self.feature_layer}")[:, 1:]
        if feats.shape[1] != n:
            raise ValueError(f"{self.name}: layer features have {feats.shape[1]} patches, expected {n}")
        cls = prumerge_cls_attention(q, k)
        keys = k[:, 1:]
        proj = ctx.get("projector")
        if self.plus and self.budget == "fixed" and self.spatial == "official":
            idx, rest = official_plus_fixed(cls, self.n_keep(n))
        else:
            idx, rest = self.kept_indices(cls), None
        if isinstance(idx, torch.Tensor):
            merged = merge_centres(feats, keys, cls, idx, int(self.n_neighbors), rest)
            out = proj(merged).to(vis.dtype)
            return VisualSelection(out, None, torch.full((b,), out.shape[1], dtype=torch.long))
        rows = [proj(merge_centres(feats[i : i + 1], keys[i : i + 1], cls[i : i + 1], ix.unsqueeze(0), int(self.n_neighbors)))[0] for i, ix in enumerate(idx)]
        kmax = max(r.shape[0] for r in rows)
        out = vis.new_zeros(b, kmax, rows[0].shape[-1])
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r.to(vis.dtype)
        return VisualSelection(out, None, torch.tensor([r.shape[0] for r in rows], dtype=torch.long))


@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus uniformly spread spatial samples (see the module docstring)."""

    plus: ClassVar[bool] = True
