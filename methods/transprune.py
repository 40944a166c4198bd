"""TransPrune (Li et al., CVPR'26, https://arxiv.org/abs/2507.20630): token transition + instruction attention.

Official code: ``liaolea/TransPrune``, ``llava/model/modeling_llama_transprune.py``
(``LlamaModel.transprune_forward``, ``transprune_rank_drop``, ``LlamaDecoderLayer_TransPrune.compute_transf_weight``)
and its scripts (``--accmulating_layer_list [7..12] --pruning_layer_list [7,9,12]
--image_token_ratio_list [0.875,0.625,0.125]``). What it does (``shared/docs/methods.md`` 1 and 1b):

* *TTV* (token transition variation): for the attention and the FFN sublayer of every accumulating
  layer (rank ``r`` = layer ``r - 1`` for ``r`` in 7..12), ``(‖out‖ / ‖in‖) · softmax_seq(1 - cos(in, out))``
  with ``in`` the sublayer's normed input and ``out`` its output; the softmax runs over **all**
  tokens of the sequence (here: of the sample, padding excluded); the two are summed, and the
  per-token values accumulate over layers **without reset across stages** (carried over to the kept
  tokens at each stage);
* *IGA*: before layer ``ℓ`` (= rank), that layer's input norm, q/k projections and RoPE (current,
  renumbered positions) score the rows of **all tokens after the image**; head-mean, then
  query-mean, of their attention to the image tokens;
* both normalised to sum 1 over the image tokens (``+1e-8``); ``score = TTV + IGA``; keep
  ``int(N r_s)`` (``r = 0.875, 0.625, 0.125``: 504/360/72, 236.25 on average), sorted; positions
  renumbered (shifted by the dropped count when decoding).

Cost (``scripts/bench_inllm_overhead.py``): on CUDA fp16/bf16 the hooks keep each sublayer's input and
output, the statistics of all the sublayers since the last stage take one Triton launch at the stage, and
each stage one more launch for everything after the head-mean of the attention
rows (then ``topk`` + ``sort``); the torch path (CPU, ``backend=torch``) computes the same in ~4 + ~15 kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

import torch

from bench.errors import ConfigError, IncompatibleMethodError
from methods.fastv import topk_sorted
from methods.inllm import (
    InLLMMethod,
    Stage,
    StageOut,
    StageView,
    per_layer_counts,
    scale_layer,
    solve_monotone,
)

_EPS = 1e-8
BACKENDS = ("auto", "torch", "triton")


def _transition_from_stats(n_in: torch.Tensor, n_out: torch.Tensor, dot: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(..., T)`` TTV from per-token ``‖in‖``, ``‖out‖`` and ``in·out`` (fp32); softmax over ``valid`` tokens."""
    cos = dot / (n_in.clamp(min=_EPS) * n_out.clamp(min=_EPS))
    e = torch.exp(1 - cos)
    if valid is not None:
        e = e * valid
    return (n_out / n_in) * (e / e.sum(-1, keepdim=True))


def _token_stats(x_in: torch.Tensor, x_out: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(3, B, T)``: per-token ``‖in‖``, ``‖out‖``, ``in·out`` in fp32 (products and sums: no fp16 overflow,
    and the same arithmetic as the Triton kernel); written into ``out`` (a ``(3, B, T)`` fp32 slot of the
    stage's statistics buffer) when given."""
    st = x_in.new_empty((3, *x_in.shape[:-1]), dtype=torch.float32) if out is None else out
    torch.linalg.vector_norm(x_in, dim=-1, dtype=torch.float32, out=st[0])
    torch.linalg.vector_norm(x_out, dim=-1, dtype=torch.float32, out=st[1])
    torch.sum(x_in.float() * x_out.float(), dim=-1, out=st[2])  # .float(): a no-op on fp32 (CPU tests)
    return st


def transition_weight(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(B, T)``: ``(‖out‖/‖in‖) · exp(1 - cos) / Σ_seq exp(1 - cos)`` (sum over each sample's valid tokens)."""
    return _transition_from_stats(*_token_stats(x_in, x_out), valid)


# ------------------------------------------------------------------------------------------ Triton
# Batch-1 prefill is launch-bound (each kernel costs 2-4 us even when trivial, also under CUDA-graph
# replay), so on CUDA the bookkeeping runs in two kernels: per sublayer one pass over its input and
# output for the three statistics, and per stage one launch that finishes TTV (softmax over the
# sequence, sum over the sublayers, carried accumulation), the instruction attention's query mean and
# both normalisations. The torch path below computes the same quantities (CPU, no Triton, backend=torch).
#
# Numerics: both paths take the model-dtype inputs and do every product and sum in fp32, in a different
# order, so they agree to fp32 rounding (tested), not bit for bit. That is acceptable because neither is
# bit-equal to the official code anyway: it computes these in the model dtype (``torch.norm`` /
# ``cosine_similarity`` of fp16 tensors), so the fp32 kernel is no further from it than the torch path.

_KERNELS: dict = {}


def _triton_kernels():
    if not _KERNELS:
        import triton
        import triton.language as tl

        @triton.jit
        def _row_stats(a_ptr, b_ptr, out_ptr, r, d, s_a, s_b, s_out, BD: tl.constexpr):
            # ‖a‖, ‖b‖, a·b of row ``r`` over the hidden dim (fp32), one read of each row: ``_stats`` and ``_stats_group``
            offs = tl.arange(0, BD)
            aa = tl.zeros([BD], tl.float32)
            bb = tl.zeros([BD], tl.float32)
            ab = tl.zeros([BD], tl.float32)
            for d0 in range(0, d, BD):
                m = d0 + offs < d
                a = tl.load(a_ptr + r * s_a + d0 + offs, mask=m, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + r * s_b + d0 + offs, mask=m, other=0.0).to(tl.float32)
                aa += a * a
                bb += b * b
                ab += a * b
            tl.store(out_ptr + r, tl.sqrt_rn(tl.sum(aa, axis=0)))
            tl.store(out_ptr + s_out + r, tl.sqrt_rn(tl.sum(bb, axis=0)))
            tl.store(out_ptr + 2 * s_out + r, tl.sum(ab, axis=0))

        # a module global too: Triton's interpreter re-creates kernels from their source with the module's
        # globals only (no closure), and the compiler finds it there as well
        globals()["_row_stats"] = _row_stats

        @triton.jit(do_not_specialize=["d", "s_a", "s_b", "s_out"])
        def _stats(a_ptr, b_ptr, out_ptr, d, s_a, s_b, s_out, BD: tl.constexpr):
            # one program per token row: ‖a‖, ‖b‖, a·b over the hidden dim, one read of each row
            _row_stats(a_ptr, b_ptr, out_ptr, tl.program_id(0).to(tl.int64), d, s_a, s_b, s_out, BD)

        @triton.jit(do_not_specialize=["n_sub", "s_stat", "s_sub", "t_len", "s_vb", "s_vs", "s_pb", "s_kb",
                                       "s_ab", "s_aq", "s_at", "q_len", "s_qb", "s_qq", "n"])
        def _finish(st_ptr, n_sub, s_stat, s_sub, t_len, valid_ptr, s_vb, vs_ptr, s_vs, prev_ptr, s_pb, keep_ptr, s_kb,
                    am_ptr, s_ab, s_aq, s_at, q_len, qv_ptr, s_qb, s_qq, ttv_ptr, score_ptr, n,
                    HAS_VALID: tl.constexpr, HAS_NEW: tl.constexpr, HAS_PREV: tl.constexpr,
                    BT: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr):
            # one program per sample; st: (3, n_sub, B, T) fp32 statistics of the stage's sublayers
            b = tl.program_id(0).to(tl.int64)
            vs = tl.load(vs_ptr + b * s_vs).to(tl.int64)
            j = tl.arange(0, BN)
            jm = j < n
            ttv = tl.zeros([BN], tl.float32)
            if HAS_PREV:  # the accumulation carries over to the kept tokens (no reset across stages)
                src = tl.load(keep_ptr + b * s_kb + j, mask=jm, other=0)
                ttv = tl.load(prev_ptr + b * s_pb + src, mask=jm, other=0.0)
            if HAS_NEW:
                new = tl.zeros([BN], tl.float32)
                tt = tl.arange(0, BT)
                for sub in range(n_sub):
                    row = st_ptr + sub * s_sub + b * t_len
                    den = tl.zeros([BT], tl.float32)
                    for t0 in range(0, t_len, BT):
                        t = t0 + tt
                        tm = t < t_len
                        ni = tl.load(row + t, mask=tm, other=1.0)
                        no = tl.load(row + s_stat + t, mask=tm, other=1.0)
                        dt = tl.load(row + 2 * s_stat + t, mask=tm, other=0.0)
                        e = tl.exp(1 - dt / (tl.maximum(ni, 1e-8) * tl.maximum(no, 1e-8)))
                        if HAS_VALID:
                            tm = tm & (tl.load(valid_ptr + b * s_vb + t, mask=tm, other=0) != 0)
                        den += tl.where(tm, e, 0.0)
                    total = tl.sum(den, axis=0)
                    t = vs + j  # the visual block: image tokens are never padding
                    ni = tl.load(row + t, mask=jm, other=1.0)
                    no = tl.load(row + s_stat + t, mask=jm, other=1.0)
                    dt = tl.load(row + 2 * s_stat + t, mask=jm, other=0.0)
                    e = tl.exp(1 - dt / (tl.maximum(ni, 1e-8) * tl.maximum(no, 1e-8)))
                    new += (no / ni) * (e / total)
                ttv = ttv + new
            # instruction-guided attention: query mean (weighted by the rows after this sample's image)
            iga = tl.zeros([BN], tl.float32)
            wsum = tl.zeros([BQ], tl.float32)
            qq = tl.arange(0, BQ)
            for q0 in range(0, q_len, BQ):
                q = q0 + qq
                qm = q < q_len
                w = tl.where(qm & (tl.load(qv_ptr + b * s_qb + q * s_qq, mask=qm, other=0) != 0), 1.0, 0.0)
                a = tl.load(am_ptr + b * s_ab + q[:, None] * s_aq + (vs + j)[None, :] * s_at,
                            mask=qm[:, None] & jm[None, :], other=0.0).to(tl.float32)
                iga += tl.sum(a * w[:, None], axis=0)
                wsum += w
            # the loop's reduction result must have exactly one use (the line below): a second read of the
            # loop-carried `iga` trips Triton 3.6's OptimizeThreadLocality pass (hasOneUse assert), as it
            # did in VisPruner's kernels
            iga = iga / tl.sum(wsum, axis=0)
            score = iga / (tl.sum(tl.where(jm, iga, 0.0), axis=0) + 1e-8)
            if HAS_NEW or HAS_PREV:
                tl.store(ttv_ptr + b * n + j, ttv, mask=jm)
                score += ttv / (tl.sum(tl.where(jm, ttv, 0.0), axis=0) + 1e-8)
            tl.store(score_ptr + b * n + j, score, mask=jm)

        @triton.jit(do_not_specialize=["d", "s_out", "s_sub", "sa0", "sb0", "sa1", "sb1", "sa2", "sb2", "sa3", "sb3",
                                       "sa4", "sb4", "sa5", "sb5"])
        def _stats_group(a0, b0, sa0, sb0, a1, b1, sa1, sb1, a2, b2, sa2, sb2, a3, b3, sa3, sb3, a4, b4, sa4, sb4,
                         a5, b5, sa5, sb5, out_ptr, d, s_out, s_sub, N_PAIRS: tl.constexpr, BD: tl.constexpr):
            # one program per token row, for every sublayer of a stage at once (up to 6 pairs per launch)
            r = tl.program_id(0).to(tl.int64)
            _row_stats(a0, b0, out_ptr, r, d, sa0, sb0, s_out, BD)
            if N_PAIRS > 1:
                _row_stats(a1, b1, out_ptr + s_sub, r, d, sa1, sb1, s_out, BD)
            if N_PAIRS > 2:
                _row_stats(a2, b2, out_ptr + 2 * s_sub, r, d, sa2, sb2, s_out, BD)
            if N_PAIRS > 3:
                _row_stats(a3, b3, out_ptr + 3 * s_sub, r, d, sa3, sb3, s_out, BD)
            if N_PAIRS > 4:
                _row_stats(a4, b4, out_ptr + 4 * s_sub, r, d, sa4, sb4, s_out, BD)
            if N_PAIRS > 5:
                _row_stats(a5, b5, out_ptr + 5 * s_sub, r, d, sa5, sb5, s_out, BD)

        _KERNELS.update(stats=_stats, stats_group=_stats_group, finish=_finish, next_pow2=triton.next_power_of_2)
    return _KERNELS


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "auto" and not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if backend == "triton":
            raise IncompatibleMethodError("transprune: backend=triton needs the triton package") from None
        return False
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise IncompatibleMethodError("transprune: backend=triton needs CUDA tensors (or TRITON_INTERPRET=1)")
    return True


def _launch_stats(x_in: torch.Tensor, x_out: torch.Tensor, out: torch.Tensor) -> None:
    """Triton :func:`_token_stats` into ``out`` ``(3, B, T)`` (each ``out[s]`` row-contiguous), one launch."""
    k = _triton_kernels()
    d = x_in.shape[-1]
    a = x_in.reshape(-1, d) if x_in.stride(-1) == 1 else x_in.contiguous().view(-1, d)
    b = x_out.reshape(-1, d) if x_out.stride(-1) == 1 else x_out.contiguous().view(-1, d)
    rows = a.shape[0]
    if rows == 0:
        return
    bd = min(k["next_pow2"](d), 2048)  # 8 elements per thread and tensor at 8 warps: no register spills
    k["stats"][(rows,)](a, b, out[0], d, a.stride(0), b.stride(0), out.stride(0), BD=bd, num_warps=max(1, min(8, bd // 256)))


_GROUP = 6  # sublayer pairs per launch of ``_stats_group``


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return x.reshape(-1, d) if x.stride(-1) == 1 else x.contiguous().view(-1, d)


def _launch_stats_group(pairs: list, out: torch.Tensor) -> None:
    """:func:`_launch_stats` of every ``(x_in, x_out)`` in ``pairs`` into ``out[:, j]`` (``out``: ``(3, len(pairs), B, T)``),
    in ``ceil(len / 6)`` launches instead of one per sublayer; per row the same arithmetic as ``_stats``."""
    k = _triton_kernels()
    d = pairs[0][0].shape[-1]
    bd = min(k["next_pow2"](d), 2048)
    for j0 in range(0, len(pairs), _GROUP):
        chunk = [(_rows2d(a), _rows2d(b)) for a, b in pairs[j0 : j0 + _GROUP]]
        rows = chunk[0][0].shape[0]
        if rows == 0:
            return
        args = []
        for j in range(_GROUP):
            a, b = chunk[min(j, len(chunk) - 1)]  # unused slots repeat a real pair (never read)
            args += [a, b, a.stride(0), b.stride(0)]
        k["stats_group"][(rows,)](*args, out[0, j0], d, out.stride(0), out.stride(1), N_PAIRS=len(chunk), BD=bd,
                                  num_warps=max(1, min(8, bd // 256)))


def _launch_finish(stats: torch.Tensor | None, valid: torch.Tensor | None, vis_start: torch.Tensor, prev,
                   head_mean: torch.Tensor, q_valid: torch.Tensor, n: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Triton :func:`_score_torch` (same arguments, ``head_mean`` = ``attn.mean(1)`` ``(B, Q, T)``), one launch."""
    k = _triton_kernels()
    b, q_len, t_len = head_mean.shape
    dev = head_mean.device
    score = torch.empty(b, n, dtype=torch.float32, device=dev)
    has_ttv = stats is not None or prev is not None
    ttv = torch.empty(b, n, dtype=torch.float32, device=dev) if has_ttv else score
    st = stats if stats is not None else score
    vd = valid if valid is not None else q_valid
    pv, kp = prev if prev is not None else (score, score)
    k["finish"][(b,)](
        st, st.shape[1] if stats is not None else 0, st.stride(0), st.stride(1) if stats is not None else 0, t_len,
        vd, vd.stride(0), vis_start, vis_start.stride(0), pv, pv.stride(0), kp, kp.stride(0),
        head_mean, head_mean.stride(0), head_mean.stride(1), head_mean.stride(2), q_len, q_valid, q_valid.stride(0), q_valid.stride(1),
        ttv, score, n,
        HAS_VALID=valid is not None, HAS_NEW=stats is not None, HAS_PREV=prev is not None,
        BT=min(k["next_pow2"](max(t_len, 16)), 1024), BN=k["next_pow2"](max(n, 16)),
        BQ=max(1, min(k["next_pow2"](max(q_len, 1)), 8192 // k["next_pow2"](max(n, 16)))), num_warps=8,
    )
    return (ttv if has_ttv else None), score


def _score_torch(stats: torch.Tensor | None, valid: torch.Tensor | None, view, prev, attn: torch.Tensor,
                 q_valid: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Accumulated TTV ``(B, n_vis)`` (None without TTV layers so far) and the score ``(B, n_vis)``.

    ``stats``: ``(3, L, B, T)`` statistics of the ``L`` sublayers since the last stage (or None);
    ``prev``: ``(ttv, keep)`` of the previous stage (its accumulated TTV and the kept indices), or None;
    ``attn``: ``(B, H, Q, T)`` rows after the image, ``q_valid`` ``(B, Q)``.
    """
    a = view.visual(attn.mean(1), dim=-1).float()  # (B, Q, n)
    if getattr(view, "uniform_start", False):  # every row lies after every sample's image
        iga = a.mean(1)
    else:
        w = q_valid.to(a.dtype)
        iga = (a * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    iga = iga / (iga.sum(1, keepdim=True) + _EPS)
    ttv = None if prev is None else prev[0].gather(1, prev[1])
    if stats is not None:
        w = view.visual(_transition_from_stats(*stats, valid).sum(0), dim=1)
        ttv = w if ttv is None else ttv + w
    score = iga if ttv is None else iga + ttv / (ttv.sum(1, keepdim=True) + _EPS)
    return ttv, score


def _ttv_hook(kind: str, slot: tuple[int, int, int], backend: str, runner, module, args, kwargs, output):
    """Forward hook on ``self_attn`` (``kind="attn"``) or ``mlp``: record the per-token statistics.

    ``slot = (stage layer, index, count)``: the statistics go to row ``index`` of that stage's
    ``(3, count, B, T)`` buffer (torch reductions; with Triton the pair is kept and the stage computes
    the statistics of all its sublayers in one launch, :func:`_launch_stats_group`), which the stage reads
    whole: no stacking, and the transition weights of all its sublayers are finished in one go.
    """
    if not runner.prefill:
        return
    x_in = kwargs["hidden_states"] if kind == "attn" and "hidden_states" in kwargs else args[0]
    x_out = output[0] if isinstance(output, tuple) else output
    layer, j, count = slot
    if _use_triton(backend, x_in):
        # Triton: keep the pair (the decoder layer never writes into these tensors) and compute the
        # statistics of all of the stage's sublayers in one launch when the stage runs
        runner.state.setdefault(("tp_io", layer), [None] * count)[j] = (x_in, x_out)
        return
    buf = runner.state.get(("tp_stats", layer))
    if buf is None or buf.shape[2:] != x_in.shape[:-1]:
        buf = runner.state[("tp_stats", layer)] = x_in.new_empty((3, count, *x_in.shape[:-1]), dtype=torch.float32)
    _token_stats(x_in, x_out, out=buf[:, j])
    return


@dataclass
class TransPrune(InLLMMethod):
    """TransPrune: keep the visual tokens with the largest TTV + IGA, in three stages.

    Parameters
    ----------
    pruning_layer_list : list[int]
        Pruned layers (``rank_layer``: the input of that layer is pruned), for ``ref_layers`` = 32.
    accmulating_layer_list : list[int]
        Ranks whose layer (``rank - 1``) contributes TTV.
    image_token_ratio_list : list[float]
        Kept fraction of the original ``N`` after each stage (``int(N r)``); used as-is with ``budget: official``.
    budget : str
        ``layer_mean`` (default): the ratios scaled by one factor so the layer mean is
        ``round(N (1 - ratio))``; ``after_prune``: scaled so the first stage keeps that count;
        ``official``: the configured ratios.
    renumber_positions : bool
        Official: renumber (True).
    backend : {"auto", "torch", "triton"}
        Statistics and scoring kernels: ``auto`` runs the Triton kernels on CUDA fp16/bf16 (two
        launches per stage instead of ~4 torch kernels per sublayer and ~20 per stage) and torch elsewhere;
        ``torch`` / ``triton`` force one (``triton`` needs CUDA, or ``TRITON_INTERPRET=1`` on CPU).
        Both compute the same fp32 quantities up to summation order (selections agree but for exact ties).
    """

    pruning_layer_list: list[int] = field(default_factory=lambda: [7, 9, 12])
    accmulating_layer_list: list[int] = field(default_factory=lambda: [7, 8, 9, 10, 11, 12])
    image_token_ratio_list: list[float] = field(default_factory=lambda: [0.875, 0.625, 0.125])
    renumber_positions: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ConfigError(f"transprune: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def selection_flops(self, cost) -> int:
        """Rows of every token after the image at each stage's layer (its k/q projections run again)."""
        q = cost.after_image_rows
        return cost.batch * sum(cost.attention_rows(t, q, True) for _, _, t, _ in cost.llm_stages(self))

    def layers_for(self, n_layers: int) -> list[int]:
        return [scale_layer(x, n_layers, self.ref_layers) for x in self.pruning_layer_list]

    def ttv_layers(self, n_layers: int) -> list[int]:
        last = max(self.layers_for(n_layers))
        return sorted({scale_layer(r, n_layers, self.ref_layers) - 1 for r in self.accmulating_layer_list} & set(range(last)))

    def counts(self, n_vis: int, n_layers: int) -> list[int]:
        ratios = [float(r) for r in self.image_token_ratio_list]
        layers = self.layers_for(n_layers)

        def make(alpha: float) -> list[int]:
            out, prev = [], n_vis
            for r in ratios:
                c = max(1, min(prev, int(round(n_vis * r * alpha, 9))))
                out.append(c)
                prev = c
            return out

        if self.budget == "official":
            return make(1.0)
        target = self.target(n_vis)
        if self.budget == "after_prune":
            alpha = target / (n_vis * ratios[0])
            out = make(alpha)
            out[0] = target
            for i in range(1, len(out)):
                out[i] = min(out[i], out[i - 1])
            return out

        def mean(alpha: float) -> float:
            return sum(per_layer_counts(list(zip(layers, make(alpha))), n_vis, n_layers)) / n_layers

        alpha = solve_monotone(mean, target, 0.0, 1.0 / min(ratios))
        self._warn_infeasible(mean(alpha), target, n_layers)
        return make(alpha)

    def plan(self, n_vis: int, n_layers: int) -> list[Stage]:
        if self.prune_ratio == 0.0 and self.budget != "official":
            return []
        return [Stage(layer, c, self.renumber_positions) for layer, c in zip(self.layers_for(n_layers), self.counts(n_vis, n_layers))]

    def install_hooks(self, lm, runner) -> list:
        n_layers = len(lm.layers)
        stages = sorted(set(self.layers_for(n_layers)))
        groups: dict[int, list[int]] = {}  # stage layer -> the TTV layers it finishes (those since the last stage)
        for layer in self.ttv_layers(n_layers):
            groups.setdefault(min(s for s in stages if s > layer), []).append(layer)
        handles = []
        for stage_layer, members in groups.items():
            for pos, layer in enumerate(members):
                dec = lm.layers[layer]
                for sub, (kind, mod) in enumerate((("attn", dec.self_attn), ("mlp", dec.mlp))):
                    slot = (stage_layer, 2 * pos + sub, 2 * len(members))
                    hook = partial(runner.sub_hook, partial(_ttv_hook, kind, slot, self.backend))
                    handles.append(mod.register_forward_hook(hook, with_kwargs=True))
        return handles

    def prune(self, i: int, stage: Stage, view: StageView) -> StageOut:
        attn, q_valid = view.attn_rows(stage.layer, "after_image")  # (B, H, Q, T), layer ℓ on its input
        stats = view.state.pop(("tp_stats", view.layer), None)  # (3, L, B, T) sublayers since the last stage
        pairs = view.state.pop(("tp_io", view.layer), None)  # Triton: their (input, output) pairs instead
        if pairs is not None and all(p is not None for p in pairs):
            x0 = pairs[0][0]
            stats = x0.new_empty((3, len(pairs), *x0.shape[:-1]), dtype=torch.float32)
            _launch_stats_group(pairs, stats)
        prev = view.state.get("tp_ttv")  # (accumulated TTV, kept indices) of the previous stage
        valid = None if getattr(view, "no_padding", False) else view.valid
        if _use_triton(self.backend, view.hidden):
            ttv, score = _launch_finish(stats, valid, view.vis_start, prev, attn.mean(1), q_valid, view.n_vis)
        else:
            ttv, score = _score_torch(stats, valid, view, prev, attn, q_valid)
        keep = topk_sorted(score, stage.n_keep)
        if ttv is not None:  # accumulated without reset: the next stage carries it over to the kept tokens
            view.state["tp_ttv"] = (ttv, keep)
        return StageOut(keep)
