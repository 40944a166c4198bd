"""Fast paths of :mod:`methods.ranking`: top-k selection of visual tokens in one GPU kernel (Triton).

Why: at batch 1 an in-LLM prefill is launch-bound, and ``scores.topk(k + extra)`` followed by
``top[:, :k].sort()`` costs five to seven kernels per stage on CUDA (the radix select, a sort of the
selected values, the ``sort``'s copy of its input, the ``arange`` + copy that seed its indices and the
index sort), ~25-40 us per stage on an H100. :func:`topk_rank` does the same selection with one launch:
one program per row sorts the row's ``(score, index)`` pairs with a bitonic network (``tl.sort``) and
writes both outputs.

Rank rule (every path): a higher score ranks first; equal scores rank by their index, the lower index
first; ``-0.0`` equals ``+0.0`` and NaN ranks above every number (as ``torch.topk`` on CUDA).
With distinct scores the kept set and the order of the ranked rest are exactly ``torch.topk``'s (the
selection is a pure comparison: no arithmetic touches the scores). ``torch.topk`` itself breaks ties by
an unspecified rule (CUDA: the set by lower index, the sorted order not stable; CPU: neither), so on
ties only this kernel follows the rule above.

The kernel handles rows of up to :data:`MAX_N` scores (fp16 / bf16: 16-bit keys in int32; fp32: 32-bit
keys in int64); it declines longer rows, and :func:`kernels.available` sends CPU tensors (without the
interpreter), a missing Triton or a ``torch.compile`` trace to the torch rule (``topk`` + ``sort``).
No host synchronisation: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

#: longest row the kernel sorts in one program (the torch path above it)
MAX_N = 4096

_KERNELS: dict = {}


def _kernels() -> dict:
    if not _KERNELS:
        import triton
        import triton.language as tl

        @triton.jit
        def _rank_write(x, offs, n, k, extra, keep_ptr, rest_ptr, val_ptr, row_ptr, HALF: tl.constexpr, INF_BITS: tl.constexpr,
                        LARGEST: tl.constexpr, VALUES: tl.constexpr):
            # Ranks one row ``x`` (``offs = arange(BLOCK)``, valid below ``n``) and writes both outputs (``row_ptr``:
            # the row in memory, for VALUES). Each score becomes an order-preserving integer key (its IEEE bits
            # with the lower bits of negatives flipped), packed above its reversed index: sorting the packed
            # words in descending order ranks by score, then by lower index, with no ties left to break.
            valid = offs < n
            # zero and NaN are told from the bits (integer tests: the interpreter's bf16 compares differ)
            if HALF:
                bits = x.to(tl.int16, bitcast=True).to(tl.int32)
                key = tl.where(bits < 0, bits ^ 0x7FFF, bits)
                mag = bits & 0x7FFF
                key = tl.where(mag == 0, 0, key)  # -0.0 ties with +0.0
                key = tl.where(mag > INF_BITS, 0x7FFF, key)  # NaN above +inf
                if not LARGEST:
                    key = ~key
                comp = key * 32768 + (32767 - offs)  # |comp| < 2^30
                comp = tl.where(valid, comp, -1073741825)
                idx_mask = 32767
            else:
                bits = x.to(tl.float32).to(tl.int32, bitcast=True)
                key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
                mag = bits & 0x7FFFFFFF
                key = tl.where(mag == 0, 0, key)
                key = tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)
                if not LARGEST:
                    key = ~key
                comp = key.to(tl.int64) * 1048576 + (1048575 - offs)  # |comp| < 2^51
                comp = tl.where(valid, comp, -2251799813685249)
                idx_mask = 1048575
            srt = tl.sort(comp, 0, descending=True)  # srt[r]: the word of rank r
            # the ranked rest: ranks k .. k + extra - 1 in rank order
            ridx = idx_mask - (srt & idx_mask)
            rmask = (offs >= k) & (offs < k + extra)
            tl.store(rest_ptr + (offs - k), ridx.to(tl.int64), mask=rmask)
            if VALUES:
                v = tl.load(row_ptr + ridx, mask=rmask, other=0.0)
                tl.store(val_ptr + (offs - k), v, mask=rmask)
            # the kept: every word at or above the rank-(k-1) word, written in index order
            if k > 0:
                thr = tl.sum(tl.where(offs == k - 1, srt, 0), 0)  # the rank-(k-1) word (the only nonzero term)
                kept = comp >= thr
                pos = tl.cumsum(kept.to(tl.int32), 0) - 1
                tl.store(keep_ptr + pos, offs.to(tl.int64), mask=kept)

        # a @triton.jit function calls others by their name in the module's globals (closures are not seen)
        globals()["_rank_write"] = _rank_write

        @triton.jit(do_not_specialize=["n", "k", "extra", "s_row"])
        def _topk_rank(s_ptr, keep_ptr, rest_ptr, val_ptr, n, k, extra, s_row,
                       BLOCK: tl.constexpr, HALF: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr,
                       VALUES: tl.constexpr):
            # one program per row
            row = tl.program_id(0).to(tl.int64)
            offs = tl.arange(0, BLOCK)
            x = tl.load(s_ptr + row * s_row + offs, mask=offs < n, other=0.0)
            _rank_write(x, offs, n, k, extra, keep_ptr + row * k, rest_ptr + row * extra, val_ptr + row * extra, s_ptr + row * s_row,
                        HALF, INF_BITS, LARGEST, VALUES)

        @triton.jit(do_not_specialize=["m"])
        def _dpc_scores(d_ptr, den_ptr, out_ptr, m, BM: tl.constexpr, R: tl.constexpr, BF16: tl.constexpr):
            # One program per sample: max of the (M, M) distances, then per row the smallest distance to a
            # denser token (the max where there is none) times the row's density, rounded once to the
            # dtype. Comparisons, min and max are exact in any order; the one product is exact in fp32.
            b = tl.program_id(0).to(tl.int64)
            cols = tl.arange(0, BM)
            rows = tl.arange(0, R)
            cmask = cols < m
            base = d_ptr + b * m * m
            dmax = tl.full([R, BM], float("-inf"), tl.float32)
            for i0 in range(0, m, R):
                ri = i0 + rows
                msk = (ri[:, None] < m) & cmask[None, :]
                d = tl.load(base + ri[:, None] * m + cols[None, :], mask=msk, other=float("-inf")).to(tl.float32)
                dmax = tl.maximum(dmax, d)
            dist_max = tl.max(tl.max(dmax, 1), 0)
            den_j = tl.load(den_ptr + b * m + cols, mask=cmask, other=0.0)
            for i0 in range(0, m, R):
                ri = i0 + rows
                rmask = ri < m
                msk = rmask[:, None] & cmask[None, :]
                d = tl.load(base + ri[:, None] * m + cols[None, :], mask=msk, other=float("inf")).to(tl.float32)
                den_i = tl.load(den_ptr + b * m + ri, mask=rmask, other=0.0)
                higher = (den_j[None, :] > den_i[:, None]) & msk
                parent = tl.minimum(tl.min(tl.where(higher, d, float("inf")), 1), dist_max)
                prod = parent * den_i.to(tl.float32)
                if BF16:  # round to nearest even by hand: Triton's interpreter truncates fp32 -> bf16 casts
                    u = prod.to(tl.uint32, bitcast=True)
                    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
                    score = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                else:
                    score = prod.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + b * m + ri, score, mask=rmask)

        # module globals too: Triton's interpreter re-creates kernels from their source with the module's globals
        globals()["_topk_rank"] = _topk_rank
        globals()["_dpc_scores"] = _dpc_scores
        _KERNELS.update(topk_rank=_topk_rank, rank_write=_rank_write, dpc_scores=_dpc_scores, next_pow2=triton.next_power_of_2)
    return _KERNELS


def topk_rank(scores: torch.Tensor, k: int, extra: int = 0, *, largest: bool = True, num_warps: int | None = None):
    """:func:`methods.ranking.topk_rank` in one launch (``num_warps``: warps per program, default by row length)."""
    if scores.dim() != 2 or scores.shape[1] > MAX_N:
        return NotImplemented
    _check_counts(scores.shape[1], k, extra)
    keep, rest, _ = _launch(scores, k, extra, largest=largest, values=False, num_warps=num_warps)
    return keep, rest


def smallest_sorted(x: torch.Tensor, k: int, *, num_warps: int | None = None) -> torch.Tensor:
    """:func:`methods.ranking.smallest_sorted` in one launch: the values are loaded from ``x``, so they equal
    ``torch.topk``'s bit for bit whatever the ties (equal values are interchangeable)."""
    n = x.shape[-1]
    if n > MAX_N or not 0 < k <= n:
        return NotImplemented
    _, _, vals = _launch(x.reshape(-1, n), 0, k, largest=False, values=True, num_warps=num_warps)
    return vals.view(*x.shape[:-1], k)


def _check_counts(n: int, k: int, extra: int) -> None:
    if k < 0 or extra < 0 or k + extra > n:
        raise ValueError(f"topk_rank: need 0 <= k, 0 <= extra, k + extra <= N; got k={k}, extra={extra}, N={n}")


def _launch(scores: torch.Tensor, k: int, extra: int, largest: bool, values: bool, num_warps: int | None):
    kern = _kernels()
    b, n = scores.shape
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    dev = scores.device
    # at least one column each: an empty output must still hand the kernel a valid device pointer
    keep = torch.empty(b, max(k, 1), dtype=torch.long, device=dev)[:, :k]
    rest = torch.empty(b, max(extra, 1), dtype=torch.long, device=dev)[:, :extra]
    vals = torch.empty(b, max(extra, 1) if values else 1, dtype=scores.dtype, device=dev)[:, : extra if values else 0]
    if b == 0 or n == 0:
        return keep, rest, vals
    block = max(16, kern["next_pow2"](n))
    if num_warps is None:
        num_warps = max(1, min(8, block // 256))
    kern["topk_rank"][(b,)](scores, keep, rest, vals if values else rest, n, k, extra, scores.stride(0),
                            BLOCK=block, HALF=scores.dtype != torch.float32,
                            INF_BITS=0x7F80 if scores.dtype == torch.bfloat16 else 0x7C00, LARGEST=largest, VALUES=values,
                            num_warps=num_warps)
    return keep, rest, vals


def dpc_scores(dist: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """:func:`methods.ranking.dpc_scores` in one launch (``M <= MAX_N``), bit for bit: comparisons, ``max`` and
    ``min`` are exact, and the product of two model-dtype values is exact in fp32 and rounded once, as ATen's
    opmath multiply."""
    b, m, _ = dist.shape
    if dist.dtype != density.dtype or m > MAX_N or m == 0 or b == 0:
        return NotImplemented
    kern = _kernels()
    dist = dist.contiguous()
    density = density.contiguous()
    out = torch.empty(b, m, dtype=dist.dtype, device=dist.device)
    bm = max(16, kern["next_pow2"](m))
    r = max(1, 4096 // bm)
    kern["dpc_scores"][(b,)](dist, density, out, m, BM=bm, R=r, BF16=dist.dtype == torch.bfloat16, num_warps=4)
    return out
