"""HoloV: holistic visual token pruning, a budget split over spatial chunks by attention and diversity.

Paper: https://arxiv.org/abs/2510.02912 (code: obananas/HoloV, ``llava/model/utils.py::HoloV``,
called at ``llava/model/llava_arch.py:239`` with ``num_patches=16, new_image_token_num=64``).

What the official code does, per image, on the projected tokens ``x`` (``(N, D)``, model dtype) and the head-mean
CLS attention ``a`` of CLIP layer -2 (patch columns, ``.float()``):

* the ``N`` tokens are cut into ``C = 16`` chunks of consecutive raster tokens (36 each on LLaVA-1.5; when ``C``
  does not divide ``N`` the first ``N % C`` chunks get one more);
* in a chunk of ``n`` tokens: cosine similarities ``S`` (``x / (|x| + 1e-6)``, in ``x``'s dtype) with the diagonal
  zeroed; ``var_i = sum_j (S_ij - mean_i)^2 / (n - 1)`` with ``mean_i = sum_j S_ij / (n - 1)`` (the zeroed
  diagonal entry included in the variance sum); token score ``1e3 a_i + 0.09 var_i * mean|1e3 a| / (mean|var| +
  1e-6)`` and chunk score = its mean;
* quotas ``floor(w_c T)`` with ``w = score / (sum + 1e-6)``; the ``T - sum`` left over go one each to the chunks
  of largest ``w``;
* a chunk whose quota is below its size keeps its ``quota`` tokens of highest attention, in *descending
  attention* order (``topk``); a chunk whose quota reaches its size keeps all its tokens in raster order and the
  excess quota is lost;
* output chunk by chunk, then all-zero rows up to ``T``: the LLM receives those zero rows as image tokens
  (faithful default, ``overflow: zero_pad``). ``overflow: drop`` is the named correction: the zero rows are not
  sent, so fewer than ``T`` tokens may reach the LLM (recorded per sample).

The official ``new_image_token_num = 64`` is hard-coded; here ``T = round(N (1 - prune_ratio))``. The official loop
runs per sample; here it is batched (same arithmetic per chunk). The output is not a raster-ordered selection:
``kept_index`` is ``None`` and ``extras["source_index"]`` holds each row's token index (``-1``: a zero row). The
Qwen2.5-VL port (no [CLS]: received attention, its own chunk count) is :mod:`methods.holov_ports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext, VisualSelection, keep_all
from methods.holov_parts import chunk_layout, chunk_mean
from methods.holov_ports import HoloVQwenPort, received_attention_flops


def holov_select(x: torch.Tensor, attn: torch.Tensor, budget: int, chunks: int = 16, alpha: float = 0.09, eps: float = 1e-6) -> torch.Tensor:
    """The HoloV rule: ``(B, N, D)`` tokens and ``(B, N)`` fp32 attention -> ``(B, T)`` kept indices in output order
    (chunk by chunk); ``-1`` marks the zero rows that pad the output to ``T``."""
    b, n, d = x.shape
    idx, valid = chunk_layout(n, chunks, x.device)  # (C, M)
    c, m = idx.shape
    size = valid.sum(dim=1)  # (C,)
    even = n % chunks == 0
    xc = x[:, idx]  # (B, C, M, D)
    ac = attn[:, idx]  # (B, C, M)
    fn = xc / (xc.norm(dim=-1, keepdim=True) + eps)
    s = fn @ fn.transpose(-1, -2)  # (B, C, M, M)
    pair = (valid.unsqueeze(-1) & valid.unsqueeze(-2)) & ~torch.eye(m, dtype=torch.bool, device=x.device)
    s = s * pair.to(s.dtype)
    den = (size - 1).view(1, c, 1).to(s.dtype)
    mean = s.sum(dim=-1) / den
    var = (((s - mean.unsqueeze(-1)) ** 2) * valid.view(1, c, 1, m).to(s.dtype)).sum(dim=-1) / den  # (B, C, M)
    a_scaled = ac * 1e3
    mean_abs_a = chunk_mean(a_scaled.abs(), valid, even)  # (B, C), fp32
    mean_abs_v = chunk_mean(var.abs(), valid, even) + eps
    scaling = (mean_abs_a / mean_abs_v).to(var.dtype)  # official: a 0-dim fp32 factor on an x-dtype vector
    token = a_scaled + alpha * (var * scaling.unsqueeze(-1))
    chunk_score = chunk_mean(token, valid, even)  # (B, C)
    w = chunk_score / (chunk_score.sum(dim=-1, keepdim=True) + eps)
    alloc = (w * budget).floor().long()
    rest = budget - alloc.sum(dim=-1, keepdim=True)  # (B, 1), < C
    rank = w.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    alloc = alloc + (rank < rest).long()
    take = torch.minimum(alloc, size.view(1, c))  # (B, C)
    # in a chunk: descending attention when the quota is below its size, raster order when it is not
    by_attn = ac.masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    raster = torch.arange(m, device=x.device).expand(b, c, m)
    order = torch.where((alloc >= size.view(1, c)).unsqueeze(-1), raster, by_attn)  # (B, C, M)
    tok = idx.expand(b, c, m).gather(2, order)
    kept = torch.arange(m, device=x.device).view(1, 1, m) < take.unsqueeze(-1)
    # kept slots first, chunk-major; the rest of the first T rows are the zero padding
    pos = (~kept).flatten(1).to(torch.int8).sort(dim=1, stable=True).indices[:, :budget]
    out = tok.flatten(1).gather(1, pos)
    return torch.where(kept.flatten(1).gather(1, pos), out, -1)


@dataclass
class HoloV(HoloVQwenPort, PruningMethod):
    """HoloV with the official defaults (16 chunks, alpha 0.09, CLS attention of CLIP layer -2).

    Parameters
    ----------
    chunks : int
        Chunks of consecutive raster tokens (official ``num_patches = 16``).
    alpha : float
        Weight of the similarity-variance term (official 0.09).
    layer : int
        CLIP layer of the CLS attention (-2, LLaVA's feature layer).
    overflow : {"zero_pad", "drop"}
        ``zero_pad`` (official): quota lost to full chunks becomes all-zero rows sent to the LLM;
        ``drop``: those rows are not sent (fewer tokens reach the LLM).
    qwen_order : {"window", "raster"}, qwen_chunks : {"official", "fixed"}
        The no-[CLS] (Qwen2.5-VL) port's score order and chunk count (:mod:`methods.holov_ports`).
    """

    chunks: int = 16
    alpha: float = 0.09
    layer: int = -2
    overflow: str = "zero_pad"
    qwen_order: str = "window"
    qwen_chunks: str = "official"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "overflow": ("zero_pad", "drop"), "qwen_order": ("window", "raster"), "qwen_chunks": ("official", "fixed")}
    positive: ClassVar[tuple[str, ...]] = ("chunks",)

    @property
    def graph_safe(self) -> bool:  # type: ignore[override]
        return self.overflow == "zero_pad"  # drop: the kept count is read back to the host

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"cls_attn:{self.layer}"})

    def reduce(self, vis: torch.Tensor, ctx: VisionContext) -> VisualSelection:
        """``(B, N, D)`` projected tokens -> ``(B, T, D)``: kept tokens chunk by chunk, then zero rows."""
        b, n, d = vis.shape
        if self.prune_ratio == 0.0:
            return keep_all(vis)
        self.check_compatible(ctx)
        t = self.n_keep(n)
        chunks = self.n_chunks(n, t, ctx.has_cls)
        if n < 2 * chunks:
            raise ConfigError(f"holov: {n} visual tokens cannot be cut into {chunks} chunks of at least 2")
        idx = holov_select(vis, self.attention(ctx), t, chunks, float(self.alpha))
        real = idx >= 0
        feats = vis.gather(1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, d)) * real.unsqueeze(-1).to(vis.dtype)
        n_kept = torch.full((b,), idx.shape[1], dtype=torch.long) if self.overflow == "zero_pad" else real.sum(dim=1).cpu()
        return VisualSelection(feats, None, n_kept, {"source_index": idx})

    def selection_flops(self, cost) -> int:
        """Per image: the CLS row of the layer (no [CLS]: the last tower block's ``q, k, v`` recomputed and its
        ``L x L`` scores over the ``L = m^2 N`` patches), and the ``M x M`` cosine matrix of every chunk of projected
        tokens (``M = ceil(N / C)``, padded slots included)."""
        if self.prune_ratio == 0.0:
            return 0
        has_cls = getattr(cost, "has_cls", True)
        c = self.n_chunks(cost.n_visual, self.n_keep(cost.n_visual), has_cls)
        m = -(-cost.n_visual // c)
        extras = cost.vision_extras(self.needs) if has_cls else received_attention_flops(cost)
        return cost.batch * (extras + c * 2 * m * m * cost.llm_width)
