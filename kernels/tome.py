"""Fast paths of :mod:`methods.tome`: the metric's normalisation, the matching and the size-weighted merge.

At batch 1 the tower's 23 blocks are launch-bound: a block's matching + merge is ~22 small kernels in
torch. With these a block is 4 kernels, and the score GEMM, whose rounding decides the matches, stays
cuBLAS's:

* :func:`normalize` (:func:`methods.tome.normalize`): one Triton kernel, torch's norm and division bit for
  bit: the squares are summed in the order of ATen's reduce kernel, which :func:`torch_norm_order` finds
  once per device;
* :func:`match` (:func:`methods.tome.match`, with a CLS token): the row max of the scores (CLS row at
  ``-inf``) and the ranking of the maxima into the unmerged set and the sources in one launch
  (:func:`row_max` with ``rank``: the last program of an image to finish ranks, as
  :func:`kernels.ranking.topk_rank`); ties, unordered by ``argsort``, go by index;
* :func:`merge_wavg` (:func:`methods.tome.merge_wavg`, fp16 / bf16): the whole size-weighted merge in one
  launch (:func:`fused_merge_wavg`). It rounds where torch rounds (``x * size``, the sum, the quotient)
  and adds a destination's sources in fp32, rounding once: the exactly rounded sum. The torch path's fp16
  one-hot GEMM (cuBLAS) may round partial sums, so where two or more sources meet one destination the two
  can differ in the last bits (tested equal everywhere else); ToMe's own ``scatter_reduce`` adds in fp16,
  in a run-dependent order.

``results/selection_overhead.csv`` (H100, graph replay, B=1): 0.29 / 0.29 / 0.27 ms at 192 / 128 / 64
kept, from 0.40 / 0.38 / 0.34 ms with a separate norm, division and ranking.
"""

from __future__ import annotations

import functools

import torch

from kernels.ranking import MAX_N
from methods.ranking import topk_rank
from methods.tome import Match


_KERNELS: dict = {}


def _kernels() -> dict:
    if not _KERNELS:
        import triton
        import triton.language as tl

        from kernels.ranking import _kernels as ranking_kernels

        globals()["_rank_write"] = ranking_kernels()["rank_write"]

        @triton.jit(do_not_specialize=["t1", "t2", "n_unm", "r"])
        def _row_max(s_ptr, max_ptr, idx_ptr, cnt_ptr, unm_ptr, src_ptr, t1, t2, n_unm, r, PROTECT: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, RANK: tl.constexpr, RB: tl.constexpr, HALF: tl.constexpr,
                     INF_BITS: tl.constexpr):
            # ``scores.max(dim=-1)`` of ROWS rows: the first index of the maximum, NaN above all (as torch);
            # with PROTECT, row 0 is ToMe's CLS row set to -inf (max -inf at index 0). With RANK the image's
            # last program to finish (a counter in ``cnt_ptr``, reset by that program) ranks the T1 maxima
            # as ``topk_rank(node_max, n_unm, r, largest=False)``: the unmerged A tokens in index order and
            # the sources, smallest maximum first
            b = tl.program_id(0).to(tl.int64)
            rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
            cols = tl.arange(0, BLOCK)
            ok = (rows < t1)[:, None] & (cols < t2)[None, :]
            v = tl.load(s_ptr + b * t1 * t2 + rows[:, None].to(tl.int64) * t2 + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            nan = ok & (v != v)
            m = tl.max(tl.where(nan, float("-inf"), v), axis=1)
            idx = tl.min(tl.where(ok & (v == m[:, None]), cols[None, :], BLOCK), axis=1)
            has_nan = tl.max(nan.to(tl.int32), axis=1) > 0
            m = tl.where(has_nan, float("nan"), m)
            idx = tl.where(has_nan, tl.min(tl.where(nan, cols[None, :], BLOCK), axis=1), idx)
            if PROTECT:
                m = tl.where(rows == 0, float("-inf"), m)
                idx = tl.where(rows == 0, 0, idx)
            tl.store(max_ptr + b * t1 + rows, m.to(max_ptr.dtype.element_ty), mask=rows < t1)
            tl.store(idx_ptr + b * t1 + rows, idx.to(tl.int64), mask=rows < t1)
            if RANK:
                tl.debug_barrier()  # every thread's stores happen before the release below
                done = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel", scope="gpu")
                if done == tl.num_programs(1) - 1:
                    tl.store(cnt_ptr + b, 0)
                    offs = tl.arange(0, RB)
                    x = tl.load(max_ptr + b * t1 + offs, mask=offs < t1, other=0.0, cache_modifier=".cg")
                    _rank_write(x, offs, t1, n_unm, r, unm_ptr + b * n_unm, src_ptr + b * r, src_ptr, max_ptr,  # noqa: F821
                                HALF, INF_BITS, False, False)

        @triton.jit
        def _scaled_row(xb, sb, row, cc, cm, C: tl.constexpr, HAS_SIZE: tl.constexpr):
            # row ``row`` of x times its size, rounded to x's dtype as torch's ``x * size`` (fp32 out), and
            # the size (1 without HAS_SIZE)
            xv = tl.load(xb + row * C + cc, mask=cm, other=0.0).to(tl.float32)
            if HAS_SIZE:
                sv = tl.load(sb + row).to(tl.float32)
                xv = (xv * sv).to(xb.dtype.element_ty).to(tl.float32)
            else:
                sv = tl.full([], 1.0, tl.float32)
            return xv, sv

        # a @triton.jit function calls others by their name in the module's globals (closures are not seen)
        globals()["_scaled_row"] = _scaled_row

        @triton.jit(do_not_specialize=["t", "n_unm", "r", "t1"])
        def _merge_wavg(x_ptr, s_ptr, unm_ptr, src_ptr, nidx_ptr, xo_ptr, so_ptr, t, n_unm, r, t1,
                        C: tl.constexpr, HAS_SIZE: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr):
            # one output row per program (a whole row of C channels: at batch 1 this is latency-bound, so
            # few dependent loads per program): an unmerged A token (rows 0 .. n_unm-1, in unm order) or B
            # token j plus the A sources whose best match is j, visited one by one (there are few). Rounded
            # where torch rounds: x * size to the dtype, the fp32 sum of the sources plus the destination
            # once (module docstring: cuBLAS may round partial sums), then the IEEE quotient
            b = tl.program_id(0).to(tl.int64)
            i = tl.program_id(1)
            dt = xo_ptr.dtype.element_ty
            t_out = n_unm + t // 2
            cc = tl.arange(0, BC)
            cm = cc < C
            xb = x_ptr + b * t * C
            sb = s_ptr + b * t
            ob = xo_ptr + (b * t_out + i) * C
            if i < n_unm:
                # (x * size) / size, as torch computes it (x itself without sizes: a division by 1)
                xv, sv = _scaled_row(xb, sb, 2 * tl.load(unm_ptr + b * n_unm + i), cc, cm, C, HAS_SIZE)
                tl.store(ob + cc, tl.math.div_rn(xv, sv).to(dt), mask=cm)
                tl.store(so_ptr + b * t_out + i, sv.to(dt))
            else:
                j = i - n_unm
                k = tl.arange(0, RB)
                km = k < r
                src = tl.load(src_ptr + b * r + k, mask=km, other=0)
                left = km & (tl.load(nidx_ptr + b * t1 + src, mask=km, other=-1) == j)
                xv, sd = _scaled_row(xb, sb, 2 * j + 1, cc, cm, C, HAS_SIZE)
                acc = tl.zeros([BC], tl.float32)
                ssum = tl.full([], 0.0, tl.float32)
                while tl.max(left.to(tl.int32), axis=0) > 0:
                    h = tl.min(tl.where(left, k, RB), axis=0)
                    xr, sr = _scaled_row(xb, sb, 2 * tl.sum(tl.where(k == h, src, 0), axis=0), cc, cm, C, HAS_SIZE)
                    acc += xr
                    ssum += sr
                    left = left & (k != h)
                stot = (ssum + sd).to(dt).to(tl.float32)
                tl.store(ob + cc, tl.math.div_rn((acc + xv).to(dt).to(tl.float32), stot).to(dt), mask=cm)
                tl.store(so_ptr + b * t_out + i, stot.to(dt))

        @triton.jit(do_not_specialize=["n_rows"])
        def _l2_normalize(x_ptr, y_ptr, n_rows, D: tl.constexpr, ROWS: tl.constexpr, DESC: tl.constexpr):
            # x / x.norm(dim=-1) for rows of D (a power of two <= 64) as torch's CUDA kernels round it: the
            # squares summed in fp32 in the order of ATen's reduce kernel (lane l of a warp adds x[l]^2 and
            # x[l + 32]^2, then the warp's shuffle tree: DESC pairs lanes l and l + 16 first, else l and
            # l + 1), the IEEE square root rounded to the dtype, then each element's IEEE fp32 quotient
            rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
            cols = tl.arange(0, D)
            ok = (rows < n_rows)[:, None]
            off = rows[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(x_ptr + off, mask=ok, other=1.0).to(tl.float32)
            s = x * x  # exact for fp16 / bf16 inputs; fp32: the one rounding ATen's fma(x, x, 0) makes too
            if D > 32:
                s = tl.sum(tl.reshape(s, [ROWS, 2, 32]), axis=1)
            L: tl.constexpr = min(D, 32)
            for lv in tl.static_range(L.bit_length() - 1):  # a reshape into pairs and a sum of two: one add each
                if DESC:
                    s = tl.sum(tl.reshape(s, [ROWS, 2, (L >> lv) // 2]), axis=1)
                else:
                    s = tl.sum(tl.reshape(s, [ROWS, (L >> lv) // 2, 2]), axis=2)
            dt = y_ptr.dtype.element_ty
            nrm = tl.sqrt_rn(tl.reshape(s, [ROWS])).to(dt).to(tl.float32)
            tl.store(y_ptr + off, tl.math.div_rn(x, nrm[:, None]).to(dt), mask=ok)

        _KERNELS.update(row_max=_row_max, merge_wavg=_merge_wavg, l2_normalize=_l2_normalize, next_pow2=triton.next_power_of_2)
    return _KERNELS


def norm_tree(x: torch.Tensor, desc: bool) -> torch.Tensor:
    """``(M, D)`` -> ``(M,)`` float32 2-norms summed as ATen's CUDA reduce kernel sums rows of ``D`` (a power of two <= 64).

    Lane ``l`` of a warp holds ``x[l]^2 + x[l + 32]^2`` (for ``D = 64``); the warp's shuffle tree then pairs
    lanes ``l`` and ``l + 16`` first (``desc``: torch 2.13 on CUDA) or ``l`` and ``l + 1`` (torch 2.9, and
    ROCm builds). The square root is IEEE's (float64, then rounded: exact for a float32 argument).
    """
    s = x.float() * x.float()
    if s.shape[1] > 32:
        s = s[:, :32] + s[:, 32:]
    while s.shape[1] > 1:
        h = s.shape[1] // 2
        s = s[:, :h] + s[:, h:] if desc else s[:, 0::2] + s[:, 1::2]
    return s[:, 0].double().sqrt().float()


_NORM_ORDER: dict = {}


def torch_norm_order(device: torch.device, d: int) -> bool | None:
    """Which :func:`norm_tree` order ``x.norm(dim=-1)`` follows on ``device`` for rows of ``d``; ``None``: neither.

    Found once per device and width by comparing torch's result on 512 random float32 rows with both
    orders (they differ on many of them); not while a CUDA graph is being captured (nothing is cached
    then, and the caller takes the torch path).
    """
    key = (str(device), d)
    if key not in _NORM_ORDER:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, d, generator=g) * torch.exp2(torch.randint(-8, 9, (512, d), generator=g).float())
        got = x.to(device).norm(dim=-1).cpu()
        hits = [o for o in (True, False) if torch.equal(got, norm_tree(x, o))]
        _NORM_ORDER[key] = hits[0] if hits else None  # both: the orders are one (d <= 2)
    return _NORM_ORDER[key]


def normalize_kernel(x: torch.Tensor, desc: bool) -> torch.Tensor:
    """:func:`l2_normalize`'s Triton kernel on ``(..., D)`` rows, summing the squares in :func:`norm_tree`'s ``desc`` order."""
    d = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    n_rows = x.numel() // d
    rows = max(1, 1024 // d)
    # no fp fusion: an fma of x * x into the sum would round fp32 squares differently from ATen's adds
    _kernels()["l2_normalize"][(-(-n_rows // rows),)](x, y, n_rows, D=d, ROWS=rows, DESC=desc, num_warps=4, enable_fp_fusion=False)
    return y


def row_max(scores: torch.Tensor, protect_first: bool = False, rank: int | None = None):
    """``scores.max(dim=-1)`` of ``(B, T1, T2)`` scores in one Triton launch: ``(B, T1)`` values and indices.

    The first index of a row's maximum (NaN counts as the maximum, as in torch); ``protect_first`` gives
    row 0 the value ``-inf`` at index 0, as ToMe's ``scores[..., 0, :] = -inf`` does for the CLS token.

    ``rank=r`` (ToMe's matching, CUDA or the interpreter) also ranks the maxima in the same launch and
    returns ``(node_max, node_idx, unm, src)`` with ``unm, src = topk_rank(node_max, T1 - r, r,
    largest=False)``: the last program of each image to finish ranks them (a per-device counter, so one
    stream at a time per device). While a CUDA graph is captured before any eager call has made the
    counters, the ranking is a second launch (:func:`~methods.ranking.topk_rank`).
    """
    kern = _kernels()
    b, t1, t2 = scores.shape
    scores = scores.contiguous()
    node_max = torch.empty(b, t1, dtype=scores.dtype, device=scores.device)
    node_idx = torch.empty(b, t1, dtype=torch.long, device=scores.device)
    block = max(16, kern["next_pow2"](t2))
    rows = max(1, 1024 // block)  # small programs: at batch 1 more of them run side by side
    cnt = None if rank is None or t1 > MAX_N else _counters(scores.device, b)
    n_unm, r = (t1 - rank, rank) if cnt is not None else (1, 1)
    unm = torch.empty(b, n_unm, dtype=torch.long, device=scores.device)
    src = torch.empty(b, r, dtype=torch.long, device=scores.device)
    kern["row_max"][(b, -(-t1 // rows))](scores, node_max, node_idx, node_idx if cnt is None else cnt, unm, src, t1, t2, n_unm, r,
                                         PROTECT=protect_first, ROWS=rows, BLOCK=block, RANK=cnt is not None,
                                         RB=max(16, kern["next_pow2"](t1)), HALF=scores.dtype != torch.float32,
                                         INF_BITS=0x7F80 if scores.dtype == torch.bfloat16 else 0x7C00, num_warps=4)
    if rank is None:
        return node_max, node_idx
    if cnt is None:
        unm, src = topk_rank(node_max, t1 - rank, rank, largest=False)
    return node_max, node_idx, unm, src


_COUNTERS: dict = {}
_COUNTER_BUFS: list = []  # every counter buffer stays alive: a captured graph keeps using the one it was captured with


def _counters(device: torch.device, b: int) -> torch.Tensor | None:
    """The per-device int32 counters of :func:`row_max`'s ranking (zero between launches), at least ``b`` of them."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < b:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(b, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
        _COUNTER_BUFS.append(buf)
    return buf


def fused_merge_wavg(x: torch.Tensor, size: torch.Tensor | None, unm: torch.Tensor, src: torch.Tensor,
                     node_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_wavg` of one matching in one Triton launch (fp16 / bf16).

    Parameters
    ----------
    x : ``(B, T, C)``; size : ``(B, T, 1)`` or ``None`` (all ones)
    unm : ``(B, T1 - r)`` unmerged A tokens (A = even rows, ``T1 = ceil(T / 2)``), in output order
    src : ``(B, r)`` merged A tokens (any order); node_idx : ``(B, T1)`` each A token's best B token

    Returns ``(B, T - r, C)`` merged ``x`` and ``(B, T - r, 1)`` sizes, equal to the torch path's.
    """
    kern = _kernels()
    b, t, c = x.shape
    n_unm, r, t1 = unm.shape[1], src.shape[1], node_idx.shape[1]
    t_out = n_unm + t // 2
    x = x.contiguous()
    xo = torch.empty(b, t_out, c, dtype=x.dtype, device=x.device)
    so = torch.empty(b, t_out, 1, dtype=x.dtype, device=x.device)
    sz = x if size is None else size.contiguous()  # an unused pointer when there are no sizes
    kern["merge_wavg"][(b, t_out)](x, sz, unm.contiguous(), src.contiguous(), node_idx.contiguous(), xo, so, t, n_unm, r, t1,
                                   C=c, HAS_SIZE=size is not None, RB=max(16, kern["next_pow2"](r)), BC=max(16, kern["next_pow2"](c)),
                                   num_warps=4, enable_fp_fusion=False)
    return xo, so


def normalize(metric: torch.Tensor) -> torch.Tensor:
    """:func:`methods.tome.normalize` for ``(B, T, D)`` in one launch, bit for bit (``D`` a power of two <= 64)."""
    d = metric.shape[-1]
    if d > 64 or d & (d - 1):
        return NotImplemented
    desc = torch_norm_order(metric.device, d)
    if desc is None:
        return NotImplemented
    return normalize_kernel(metric, desc)


class _RankedMatch(Match):
    """:class:`~methods.tome.Match` from :func:`row_max`'s ranking: its sources come smallest maximum first, as the
    fused merge reads them; ToMe's descending order (the torch merge's) is made on first use only."""

    def __init__(self, node_idx: torch.Tensor, unm_idx: torch.Tensor, src_ascending: torch.Tensor) -> None:
        self.node_idx, self.unm_idx, self.src_ascending = node_idx, unm_idx, src_ascending

    @functools.cached_property
    def src_idx(self) -> torch.Tensor:  # type: ignore[override]
        return self.src_ascending.flip(1)


def match(scores: torch.Tensor, r: int, class_token: bool) -> Match:
    """:func:`methods.tome.match` in one launch (with a CLS token): the row maxima and their ranking."""
    if not class_token or scores.shape[1] > MAX_N:
        return NotImplemented
    _, node_idx, unm, src = row_max(scores, protect_first=True, rank=r)
    return _RankedMatch(node_idx, unm, src)


def merge_wavg(x: torch.Tensor, size: torch.Tensor | None, m: Match | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`methods.tome.merge_wavg` in one launch (fp16 / bf16, sizes in ``x``'s dtype)."""
    if m is None or (size is not None and size.dtype != x.dtype):
        return NotImplemented
    return fused_merge_wavg(x, size, m.unm_idx, getattr(m, "src_ascending", m.src_idx), m.node_idx)
