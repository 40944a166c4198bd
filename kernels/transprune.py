"""Fast paths of :mod:`methods.transprune`: the sublayer statistics and the stage's score in two Triton launches.

Batch-1 prefill is launch-bound (each kernel costs 2-4 us even when trivial, also under CUDA-graph
replay), so on CUDA the bookkeeping runs in two kernels a stage: one pass over the input and output of
every sublayer since the last stage for the three statistics (:func:`sublayer_stats`, up to 6 sublayers a
launch), and one launch that finishes TTV (softmax over the sequence, sum over the sublayers, carried
accumulation), the instruction attention's query mean and both normalisations (:func:`transprune_score`).
The torch rule computes the same in ~4 kernels a sublayer and ~15 a stage (``benchmarks/bench_inllm_overhead.py``).

Numerics: both paths take the model-dtype inputs and do every product and sum in fp32, in a different
order, so they agree to fp32 rounding (tested), not bit for bit. That is acceptable because neither is
bit-equal to the official code anyway: it computes these in the model dtype (``torch.norm`` /
``cosine_similarity`` of fp16 tensors), so the fp32 kernel is no further from it than the torch path.
"""

from __future__ import annotations

import torch

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


def _launch_stats(x_in: torch.Tensor, x_out: torch.Tensor, out: torch.Tensor) -> None:
    """Triton :func:`methods.transprune.token_stats` into ``out`` ``(3, B, T)`` (each ``out[s]`` row-contiguous), one launch."""
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
    """Triton :func:`methods.transprune.transprune_score`, one launch."""
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


def sublayer_stats(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """:func:`methods.transprune.sublayer_stats` in ``ceil(L / 6)`` launches."""
    x0 = pairs[0][0]
    stats = x0.new_empty((3, len(pairs), *x0.shape[:-1]), dtype=torch.float32)
    _launch_stats_group(pairs, stats)
    return stats


def transprune_score(stats: torch.Tensor | None, valid: torch.Tensor | None, vis_start: torch.Tensor, prev,
                     head_mean: torch.Tensor, q_valid: torch.Tensor, n: int, uniform: bool = False):
    """:func:`methods.transprune.transprune_score` in one launch (``uniform`` needs nothing here: ``q_valid`` is then all true)."""
    return _launch_finish(stats, valid, vis_start, prev, head_mean, q_valid, n)
