"""SparseVLM's recycling (DPC-kNN cluster-and-merge of dropped tokens), its schedule under the harness's budget
modes, and v2.0's RoPE-only bias and head selection, in plain torch.

The rule that calls them is :class:`methods.sparsevlm.SparseVLM`; the official recycling is
``Gumpest/SparseVLMs``, ``llava/model/language_model/utils.py::cluster_and_merge``.
"""

from __future__ import annotations

from typing import Callable

import torch

from bench.errors import ConfigError
from methods.inllm import per_layer_counts, solve_monotone
from methods.ranking import dpc_scores, smallest_sorted


def merge_counts(n_vis: int, k: int) -> tuple[int, int]:
    """``(candidates, clusters)`` recycled when ``k`` of ``n_vis`` tokens are selected (official formulas)."""
    dropped = n_vis - k
    if dropped <= 0:
        return 0, 0
    cand = int(dropped * 0.3) + 1
    return cand, int(cand / 10) + 1


def stage_counts(selected: list[int], n_vis: int, merge: bool) -> list[tuple[int, int, int]]:
    """Per stage ``(selected, candidates, clusters)``; selection is capped at ``n_vis - 1`` as officially."""
    out, v = [], n_vis
    for s in selected:
        k = max(1, min(int(s), v - 1))
        cand, c = merge_counts(v, k) if merge else (0, 0)
        out.append((k, cand, c))
        v = k + c
    return out


def scheduled_selected(table: dict[int, tuple[int, ...]], ref_tokens: int, n_vis: int, layers: list[int], n_layers: int,
                       target: int, budget: str, merging: bool, warn: Callable[[float, float, int], None]) -> list[int]:
    """Selected counts per stage from the published ``table`` (``{budget: counts}`` counted from ``ref_tokens``
    visual tokens, scaled by ``N / ref_tokens``), its entry nearest ``target``: under ``budget: official`` as
    published (other budgets scale it by ``target / B_ref``); for ``after_prune`` / ``layer_mean`` times the one
    factor that meets ``target`` (recycled tokens counted), ``warn(achieved, target, n_layers)`` where none does."""
    ref_b = min(table, key=lambda x: (abs(x * n_vis / ref_tokens - target), x))
    shape, scale_n = table[ref_b], n_vis / ref_tokens
    if budget == "official":
        if round(ref_b * scale_n) == target:
            return [max(1, round(s * scale_n)) for s in shape]
        return [max(1, round(s * target / ref_b)) for s in shape]

    def counts(alpha: float) -> list[tuple[int, int, int]]:
        return stage_counts([max(1, round(s * scale_n * alpha)) for s in shape], n_vis, merging)

    if budget == "after_prune":
        def first(alpha: float) -> float:
            k, _, c = counts(alpha)[0]
            return k + c
        alpha = solve_monotone(first, target, 0.0, n_vis / shape[0])
    else:
        def mean(alpha: float) -> float:
            per = [(layer, k + c) for layer, (k, _, c) in zip(layers, counts(alpha))]
            return sum(per_layer_counts(per, n_vis, n_layers)) / n_layers
        alpha = solve_monotone(mean, target, 0.0, n_vis / min(shape))
        per = [(layer, k + c) for layer, (k, _, c) in zip(layers, counts(alpha))]
        warn(sum(per_layer_counts(per, n_vis, n_layers)) / n_layers, target, n_layers)
    return [k for k, _, _ in counts(alpha)]


def pairwise_dist(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, M, C) -> (B, M, M)`` fp64 Euclidean distances (in ``dtype`` when given: the fp64 square root
    rounded once on store, what ``.to(dtype)`` of the fp64 result gives, in the same kernel): the official ``(x1 - x2).norm()`` without its
    ``(B, M, M, C)`` difference tensor, from one fp64 GEMM (``|a|^2 + |b|^2 - 2 a.b``).

    Why fp64 is as faithful as summing the exact differences in fp32 (``cdist``'s
    ``donot_use_mm_for_euclid_dist``, ~1.7 ms at batch 16 on an H100): the inputs (fp16/bf16/fp32) are
    exact in fp64 and every product and sum is rounded at 2^-53, so ``|a|^2 + |b|^2 - 2 a.b`` is off by at
    most ~``C * 2^-53 * (|a|^2 + |b|^2)`` (1e-12 of the squared norms for C = 4096, typically far less): the
    distance is then closer to the exact one than the fp32 direct sum (rounded at 6e-8) unless two tokens
    are ~300x closer than their norms, and both round to the same model-dtype value except where the exact
    distance sits within ~1e-7 of a rounding midpoint (CPU check, random fp16/bf16/fp32 inputs with
    C = 4096: the fp64 distances equal the exact ones rounded to the dtype in 260/300 matrices, the fp32
    ``cdist`` ones in 133/300). The cancellation the expansion is known for in fp32 is what fp64 removes.
    Self-distances are exactly 0 (the squared norms are the Gram diagonal, so ``2 G_ii - 2 G_ii = 0``), as in
    the official code; tiny negatives from rounding are clamped. Six small kernels (cast, GEMM, two adds, clamp, sqrt) instead of a slow ``cdist``.
    """
    xd = x.double()
    gram = torch.bmm(xd, xd.transpose(1, 2))  # (B, M, M); H100 fp64 tensor cores
    sq = gram.diagonal(dim1=1, dim2=2)  # (B, M) squared norms, the very values on the diagonal
    d2 = torch.add(sq.unsqueeze(2) + sq.unsqueeze(1), gram, alpha=-2.0).clamp_min_(0.0)
    if dtype is None or dtype == d2.dtype:
        return d2.sqrt_()
    return torch.sqrt(d2, out=torch.empty(d2.shape, dtype=dtype, device=d2.device))


def cluster_and_merge(x: torch.Tensor, n_clusters: int, jitter: torch.Tensor | None = None,
                      cluster_ids: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """DPC-kNN clustering of ``x`` ``(B, M, C)`` into ``n_clusters`` means, as the official ``cluster_and_merge``.

    ``jitter`` ``(B, M)`` is the density jitter already scaled (``1e-6 * rand`` in ``x``'s dtype, see
    :func:`density_jitter`); ``None``: no jitter. ``cluster_ids``: ``arange(n_clusters)`` on ``x``'s device
    (built once outside the forward; made here when not given); ``zero``: a 0-dim zero in ``x``'s dtype on
    its device (likewise). Clusters are ordered by their centre's
    score (``topk`` order). Every step is a batched tensor op with static shapes (no host sync): the
    official code's masked arithmetic ``dist * mask + max * (1 - mask)`` is written as the equal ``where``.
    """
    b, m, c = x.shape
    if n_clusters == 1:  # every token joins the only cluster: no distances needed, the same weighted mean
        w = (torch.tensor(float(m), dtype=x.dtype) + 1e-6).reciprocal()  # ``weight`` below, as a host scalar
        return x.new_full((b, m, 1), float(w)).transpose(1, 2) @ x
    dist = pairwise_dist(x, x.dtype) / (c**0.5)
    nearest = smallest_sorted(dist, n_clusters)  # ``dist.topk(n, largest=False).values``, one kernel on CUDA
    if zero is None:
        zero = x.new_zeros(())
    # ``0 + (-1) * n * n`` is ``-(n**2)`` in one kernel (the product of two model-dtype values is exact in
    # the fp32 opmath, so both round it once), and the mean of the negated values is the negated mean
    density = torch.addcmul(zero, nearest, nearest, value=-1).mean(-1).exp()
    if jitter is not None:
        density = density + jitter.to(density.dtype)
    # ``density * min(dist to a denser token, else the max dist)``: one kernel on CUDA, bit for bit
    centres = dpc_scores(dist, density).topk(n_clusters, dim=-1).indices  # (B, c)
    assign = dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, m)).argmin(1)  # (B, M)
    if cluster_ids is None:
        cluster_ids = torch.arange(n_clusters, device=x.device)
    assign.scatter_(1, centres, cluster_ids.view(1, -1).expand(b, -1))
    # (B, M, c) 1.0 / 0.0 in x's dtype, written by the comparison itself (no zeros + scatter), no device sync
    onehot = torch.eq(assign.unsqueeze(-1), cluster_ids.view(1, 1, -1), out=x.new_empty(b, m, n_clusters))
    weight = (onehot.sum(1) + 1e-6).reciprocal()  # (B, c); ``1.0 / t`` would add a multiply by 1
    return (onehot * weight.unsqueeze(1)).transpose(1, 2) @ x


def density_jitter(seeds: torch.Tensor, n: int, stage: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``(B, n)`` SparseVLM's density jitter ``rand * 1e-6`` in ``dtype``, seeded per sample and stage."""
    g = torch.Generator(device="cpu")
    rows = []
    for s in seeds.tolist():
        g.manual_seed(int(s) * 1009 + stage)
        rows.append(torch.rand(n, generator=g))
    return torch.stack(rows).to(device).to(dtype) * 1e-6


def rope_only_bias(cos: torch.Tensor, sin: torch.Tensor, q_first: int, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """``softmax(rope(1)_q · rope(1)_k^T * scaling)`` over the allowed keys: ``(B, 1, Q, T)`` (SparseVLM 2.0)."""
    ones = cos + torch.cat((-sin[..., : sin.shape[-1] // 2], sin[..., sin.shape[-1] // 2 :]), dim=-1)  # rope(1) = cos + rot(1)*sin
    logits = (ones[:, q_first:] @ ones.transpose(1, 2)).unsqueeze(1) * scaling
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def scores_v2(view, layer: int, attn: torch.Tensor, w: torch.Tensor, count: torch.Tensor, n_heads: int) -> torch.Tensor:
    """SparseVLM 2.0's scores ``(B, n_vis)``: ``(B, H, Q, T)`` rater-row attention divided by the RoPE-only bias,
    the ``n_heads`` heads of most text->visual attention averaged, then the rater mean (``w`` ``(B, Q)``)."""
    b, h, q, t = attn.shape
    cos, sin = view.rope(layer)
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    allowed = view.rows_allowed("after_image")
    scaling = getattr(view._attn_module(layer), "scaling", cos.shape[-1] ** -0.5)
    bias = rope_only_bias(cos.float(), sin.float(), t - q, allowed, scaling)
    a = view.visual(attn.float() / bias.clamp(min=1e-12), dim=-1)  # (B, H, Q, n)
    per_head = (a * w.view(b, 1, q, 1)).sum((2, 3))  # (B, H) text->visual attention
    heads = per_head.topk(min(n_heads, h), dim=1).indices
    a = a.gather(1, heads.view(b, -1, 1, 1).expand(-1, -1, q, a.shape[-1])).mean(1)
    return (a * w.unsqueeze(-1)).sum(1) / count


def recycling_setup(plan, prepared, device) -> dict:
    """What the recycling stages of ``plan`` read, built once per context outside the forward: per stage the
    ``(B, candidates)`` density jitter (:func:`density_jitter`) and the cluster ids, and a 0-dim zero."""
    seeds = prepared.extras.get("sample_seeds", torch.zeros(prepared.input_ids.shape[0], dtype=torch.long))
    spans = prepared.extras["image_spans"]
    counts = stage_counts([s.n_selected for s in plan], int(spans[0, 1] - spans[0, 0]), True)
    dtype = prepared.inputs_embeds.dtype
    return {"jitter": {i: density_jitter(seeds, cand, i, dtype, device) for i, (_, cand, _) in enumerate(counts)},
            "cluster_ids": {i: torch.arange(c, device=device) for i, (_, _, c) in enumerate(counts)},
            "zero": torch.zeros((), dtype=dtype, device=device)}


def recycle_inputs(static: dict, stage: int, dtype: torch.dtype) -> tuple:
    """``(jitter, cluster_ids, zero)`` of :func:`cluster_and_merge` for ``stage``, from what :func:`recycling_setup`
    built (``None`` for what it did not, or a zero of another dtype: built in the call then)."""
    zero = static.get("zero")
    if zero is not None and zero.dtype != dtype:
        zero = None
    return static.get("jitter", {}).get(stage), static.get("cluster_ids", {}).get(stage), zero


def recycling_flops(n_vis: int, n_selected: int, n_merged: int, width: int) -> int:
    """A stage's recycling: the cluster means ``(c x M) @ (M x D)`` of the ``M`` candidates and, with more than one
    cluster, their pairwise distances (one ``(M x D) @ (D x M)`` fp64 Gram matrix)."""
    if n_merged <= 0:
        return 0
    cand, _ = merge_counts(n_vis, n_selected)
    return 2 * n_merged * cand * width + (2 * cand * cand * width if n_merged > 1 else 0)


def padded_text_raters(embeds: torch.Tensor, vis_start: torch.Tensor, n_vis: int, n_text: int,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`methods.sparsevlm.text_raters` of a batch whose images start apart (left padding): each sample's
    visual block gathered, its softmax and mean over its own text only; positions of the last ``Q`` that lie before
    a sample's text are never raters."""
    t = embeds.shape[1]
    idx = vis_start.view(-1, 1) + torch.arange(n_vis, device=embeds.device).view(1, -1)
    v = embeds.gather(1, idx.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    text_valid = torch.arange(t - n_text, t, device=embeds.device).view(1, -1) >= (vis_start + n_vis).view(-1, 1)
    logits = (v @ embeds[:, t - n_text :].transpose(1, 2)).masked_fill(~text_valid.unsqueeze(1), float("-inf"))
    m = logits.softmax(2).mean(1)  # (B, Q)
    mean = (m * text_valid).sum(1, keepdim=True) / text_valid.sum(1, keepdim=True)
    r = (m > mean) & text_valid
    return r if dtype is None else r.to(dtype)


class VersionOptions:
    """SparseVLM's version-dependent options, mixed into :class:`methods.sparsevlm.SparseVLM`."""

    def normalise_options(self, versions: tuple[str, ...], default_layers: list[int]) -> None:
        """``version`` as a string among ``versions`` (YAML may give ``1.5`` as a float), ``scoring_layers`` as ints
        (``None``: ``default_layers``)."""
        self.version = str(self.version)
        if self.version not in versions:
            raise ConfigError(f"sparsevlm: version must be one of {', '.join(versions)}, got {self.version!r}")
        self.scoring_layers = [int(x) for x in (default_layers if self.scoring_layers is None else self.scoring_layers)]

    @property
    def merging(self) -> bool:
        """Recycling: ``merge``, else on for 1.5 and off for 2.0."""
        return (self.version == "1.5") if self.merge is None else bool(self.merge)

    @property
    def renumber(self) -> bool:
        """Renumbered positions: ``renumber_positions``, else on for 1.5 and off for 2.0."""
        return (self.version == "1.5") if self.renumber_positions is None else bool(self.renumber_positions)
