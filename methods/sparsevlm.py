"""SparseVLM (Zhang et al., ICML'25, https://arxiv.org/abs/2410.04417): text-guided in-LLM sparsification.

Official code: ``Gumpest/SparseVLMs``, ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaDynamicvitModel.forward``), ``score.py::attn_postprocess_topk`` and
``utils.py::cluster_and_merge``. What v1.5 does (``docs/methods.md`` 1 and 1b):

* *raters*: on the LLM input embeddings, ``m = softmax_text(V T^T).mean(over visual)``; the text
  tokens (every token after the image) with ``m > mean(m)`` rate the visual tokens;
* at the scoring layers ``2, 6, 15`` the layer runs on the full sequence; its attention (head mean)
  from the rater rows to the current visual block, averaged over raters, scores the visual tokens,
  and the layer's *output* keeps ``topk(min(k_s, n_vis - 1))`` of them (sorted) — so layers
  ``3, 7, 16`` are the pruned ones here (``Stage.layer`` = scoring layer + 1);
* *recycling*: of the dropped tokens, the top ``int(0.3 * n_dropped) + 1`` by score are clustered
  (DPC-kNN, ``int(n / 10) + 1`` clusters, density jitter ``1e-6 * rand`` seeded per sample from the
  run seed) and the cluster means are placed right after the kept visual tokens; they are visual
  tokens of the next stages (scored, kept or dropped like the others);
* positions are renumbered (``arange``); the KV cache of later layers holds only the kept tokens.

Counts: official "192" keeps 300/200/110 selected + 9/4/3 merged -> 309/204/113 (32-layer mean 206.5).

SparseVLM 2.0 (``version: "2.0"``) keeps the original position ids, divides the rater attention by
the attention that RoPE alone would give (``softmax(rope(1)·rope(1)^T/sqrt(d))``), averages only the
14 heads with the most text->visual attention, and does not merge. The official 2.0 code was not in
the reference index; this branch follows ``methods.md``'s description (documented reconstruction).

Attention rows are recomputed under SDPA from the scoring layer's captured q/k (only the text rows
after the image), never the full ``T x T`` map the official "sdpa" class materializes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.inllm import InLLMMethod, Stage, StageOut, StageView, per_layer_counts, scale_layer, solve_monotone
from methods.ranking import dpc_scores, smallest_sorted, topk_rank, topk_sorted

#: official selected counts per stage, by budget (v1.5 / v2.0)
SCHEDULES = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 64: (66, 34, 20)},
}


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


def text_raters(embeds: torch.Tensor, vis_start: torch.Tensor, n_vis: int, n_text: int, uniform_start: int | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """SparseVLM's raters: ``(B, Q)`` bool over the last ``Q = n_text`` positions (text after the image).

    ``m = softmax_text(V T^T).mean(visual)``; a rater has ``m > mean(m)`` over the sample's own text.
    Positions of the last ``Q`` that lie before a (left padded) sample's text are never raters.
    ``uniform_start``: the (host) image start shared by every sample, if any (a slice, not a gather).
    ``dtype``: return the raters as 1.0 / 0.0 weights of that dtype (the comparison writes them: no cast).
    """
    b, t, _ = embeds.shape
    dev = embeds.device
    if uniform_start is not None:
        v = embeds.narrow(1, uniform_start, n_vis)
        text_valid = None
    else:
        idx = vis_start.view(-1, 1) + torch.arange(n_vis, device=dev).view(1, -1)
        v = embeds.gather(1, idx.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        text_valid = torch.arange(t - n_text, t, device=dev).view(1, -1) >= (vis_start + n_vis).view(-1, 1)
    txt = embeds[:, t - n_text :]
    logits = v @ txt.transpose(1, 2)  # (B, N, Q)
    if text_valid is not None:
        logits = logits.masked_fill(~text_valid.unsqueeze(1), float("-inf"))
    m = logits.softmax(2).mean(1)  # (B, Q)
    if text_valid is None:
        mean = m.mean(1, keepdim=True)
        return m > mean if dtype is None else torch.gt(m, mean, out=m.new_empty(m.shape, dtype=dtype))
    mean = (m * text_valid).sum(1, keepdim=True) / text_valid.sum(1, keepdim=True)
    r = (m > mean) & text_valid
    return r if dtype is None else r.to(dtype)


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


@dataclass
class SparseVLM(InLLMMethod):
    """SparseVLM: rater-guided selection at three LLM layers, with token recycling (v1.5).

    Parameters
    ----------
    version : {"1.5", "2.0"}
        ``"1.5"`` (default): renumbered positions, recycling. ``"2.0"``: original ids, RoPE-bias
        division, top ``n_heads`` heads, no merging.
    scoring_layers : list[int]
        Layers whose attention scores the tokens; their outputs are pruned (for ``ref_layers`` = 32).
    budget : str
        ``official`` (default): the published schedule of the budget ``B = round(N (1 - ratio))``
        (192/128/64; other budgets scale the nearest published one by ``B / B_ref``). SparseVLM names its
        budgets by the layer-averaged count, which with the recycled tokens is 206.5 / 145.4 / 82.3: recorded
        as ``budget_met: false`` with that mean (a published table is not re-solved). ``layer_mean``: the
        nearest published shape scaled so the mean over layers (merged tokens included) is ``B``;
        ``after_prune``: the same shape scaled so the count after the first pruned layer is ``B``.
    merge : bool or None
        Recycling on/off (``None``: on for 1.5, off for 2.0).
    n_heads : int
        Heads kept by 2.0's head selection.
    """

    version: str = "1.5"
    scoring_layers: list[int] = None  # type: ignore[assignment]
    merge: bool | None = None
    n_heads: int = 14
    renumber_positions: bool | None = None

    capture_offsets: ClassVar[tuple[int, ...]] = (-1,)
    official_measure: ClassVar[str] = "layer_mean"
    official_is_table: ClassVar[bool] = True
    #: visual tokens the published schedules (``SCHEDULES``) count from: LLaVA-1.5's 576, the official
    #: reference; on a model with another ``N`` (``n_vis``, from the adapter) the counts scale by ``N / ref_tokens``
    ref_tokens: ClassVar[int] = 576

    def __post_init__(self) -> None:
        super().__post_init__()
        self.version = str(self.version)
        if self.version not in SCHEDULES:
            raise ConfigError(f"sparsevlm: version must be '1.5' or '2.0', got {self.version!r}")
        if self.scoring_layers is None:
            self.scoring_layers = [2, 6, 15]
        self.scoring_layers = [int(x) for x in self.scoring_layers]

    def selection_flops(self, cost) -> int:
        """Rater matrix ``V T^T`` (once), rows after the image from the captured q/k at each stage, v2.0's
        RoPE-only bias, the recycled candidates' Gram matrix for their distances (``(M x D) @ (D x M)``, stages
        with more than one cluster) and their cluster means (``(c x M) @ (M x D)``)."""
        d, q = cost.llm_width, cost.after_image_rows
        total = 0
        for j, (_, st, t, n_vis) in enumerate(cost.llm_stages(self)):
            if j == 0:
                total += 2 * cost.n_visual * q * d
            total += cost.attention_rows(t, q, False)
            if self.version == "2.0":
                total += 2 * q * cost.llm_head_dim * t
            m = st.n_keep - st.n_selected
            if m > 0:
                cand, _ = merge_counts(n_vis, st.n_selected)
                total += 2 * m * cand * d
                if m > 1:  # the candidates' pairwise distances: one (M x D) @ (D x M) Gram matrix (fp64)
                    total += 2 * cand * cand * d
        return cost.batch * total

    @property
    def merging(self) -> bool:
        return (self.version == "1.5") if self.merge is None else bool(self.merge)

    @property
    def renumber(self) -> bool:
        return (self.version == "1.5") if self.renumber_positions is None else bool(self.renumber_positions)

    def layers_for(self, n_layers: int) -> list[int]:
        """Pruned layers (scoring layer + 1), scaled for the model depth."""
        return [min(scale_layer(x, n_layers, self.ref_layers) + 1, n_layers - 1) for x in self.scoring_layers]

    # -------------------------------------------------------------- schedule
    def _shape(self, target: int, n_vis: int) -> tuple[int, tuple[int, ...]]:
        table = SCHEDULES[self.version]
        ref_b = min(table, key=lambda x: (abs(x * n_vis / self.ref_tokens - target), x))
        return ref_b, table[ref_b]

    def selected_counts(self, n_vis: int, n_layers: int) -> list[int]:
        target = self.target(n_vis)
        ref_b, shape = self._shape(target, n_vis)
        scale_n = n_vis / self.ref_tokens
        if self.budget == "official":
            if round(ref_b * scale_n) == target:
                return [max(1, round(s * scale_n)) for s in shape]
            return [max(1, round(s * target / ref_b)) for s in shape]
        layers = self.layers_for(n_layers)

        def counts(alpha: float) -> list[tuple[int, int, int]]:
            return stage_counts([max(1, round(s * scale_n * alpha)) for s in shape], n_vis, self.merging)

        if self.budget == "after_prune":
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
            self._warn_infeasible(sum(per_layer_counts(per, n_vis, n_layers)) / n_layers, target, n_layers)
        return [k for k, _, _ in counts(alpha)]

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0:
            return []
        layers = self.layers_for(n_layers)
        sel = self.selected_counts(n_vis, n_layers)
        out = []
        for layer, (k, _, c) in zip(layers, stage_counts(sel, n_vis, self.merging)):
            out.append(Stage(layer, k + c, self.renumber, n_select=k))
        return out

    def runtime_setup(self, plan: list[Stage], prepared, device) -> dict:
        """Per stage, built once outside the forward: the density jitter (``1e-6 * rand`` in the official
        code, seeded per sample from its seed) and the cluster ids."""
        if not self.merging:
            return {}
        seeds = prepared.extras.get("sample_seeds", torch.zeros(prepared.input_ids.shape[0], dtype=torch.long))
        spans = prepared.extras["image_spans"]
        counts = stage_counts([s.n_selected for s in plan], int(spans[0, 1] - spans[0, 0]), True)
        dtype = prepared.inputs_embeds.dtype
        return {"jitter": {i: density_jitter(seeds, cand, i, dtype, device) for i, (_, cand, _) in enumerate(counts)},
                "cluster_ids": {i: torch.arange(c, device=device) for i, (_, _, c) in enumerate(counts)},
                "zero": torch.zeros((), dtype=dtype, device=device)}

    # -------------------------------------------------------------- selection
    def scores(self, view: StageView, layer: int) -> torch.Tensor:
        """``(B, n_vis)`` rater-averaged head-mean attention of ``layer`` to the current visual block."""
        attn, q_valid = view.attn_rows(layer, "after_image")  # (B, H, Q, T)
        raters = view.state.get("sparsevlm_raters")
        if raters is None:  # once per prefill: rater weights and their count
            e = view.input_embeds()
            n0 = e.shape[1] - (view.hidden.shape[1] - view.n_vis)  # original visual count (stage 0: n_vis)
            w = text_raters(e, view.vis_start, n0, attn.shape[2], view.vis_start_min if view.uniform_start else None,
                            dtype=torch.float32)
            raters = view.state["sparsevlm_raters"] = (w, w.sum(1, keepdim=True).clamp(min=1))
        w, count = raters
        if self.version == "2.0":
            return self._scores_v2(view, layer, attn, w, count)
        a = view.visual(attn.mean(1), dim=-1)  # (B, Q, n), the model's dtype
        return (a * w.unsqueeze(-1)).sum(1) / count  # fp32: ``w`` promotes the product (no separate cast)

    def _scores_v2(self, view, layer, attn, w, count):
        b, h, q, t = attn.shape
        cos, sin = view.rope(layer)
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        allowed = view.rows_allowed("after_image")
        scaling = getattr(view._attn_module(layer), "scaling", cos.shape[-1] ** -0.5)
        bias = rope_only_bias(cos.float(), sin.float(), t - q, allowed, scaling)
        a = view.visual(attn.float() / bias.clamp(min=1e-12), dim=-1)  # (B, H, Q, n)
        per_head = (a * w.view(b, 1, q, 1)).sum((2, 3))  # (B, H) text->visual attention
        heads = per_head.topk(min(self.n_heads, h), dim=1).indices
        a = a.gather(1, heads.view(b, -1, 1, 1).expand(-1, -1, q, a.shape[-1])).mean(1)
        return (a * w.unsqueeze(-1)).sum(1) / count

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        s = self.scores(view, stage.layer - 1)
        k = stage.n_selected
        m = stage.n_keep - k
        if m <= 0:
            return StageOut(topk_sorted(s, k))
        cand, _ = merge_counts(view.n_vis, k)
        # the kept (sorted by index), then the recycled candidates by descending score (the order of the
        # official ``topk``: it orders the clustering's jitter and ties); one kernel on CUDA
        keep, recycled = topk_rank(s, k, cand)
        x = view.visual(view.hidden).gather(1, recycled.unsqueeze(-1).expand(-1, -1, view.hidden.shape[-1]))
        static = view.static
        jitter = static.get("jitter", {}).get(i)
        zero = static.get("zero")
        if zero is not None and zero.dtype != x.dtype:
            zero = None
        return StageOut(keep, cluster_and_merge(x, m, jitter, static.get("cluster_ids", {}).get(i), zero))
