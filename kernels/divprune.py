"""Fast path of :mod:`methods.divprune`: the whole greedy max-min loop in one Triton launch.

One program per image keeps the running ``(N,)`` minimum distance in registers; a step is one argmax
(first index among ties, as ``torch.argmax``), one row load and one ``minimum``. ``min`` is exact, so
the picks equal the torch loop's bit for bit (tested).
"""

from __future__ import annotations

import torch

from methods.divprune import first_pick


_TRITON_KERNEL = None


def _triton_kernel():
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _maxmin(dist_ptr, first_ptr, out_ptr, n, k, BLOCK: tl.constexpr):
            b = tl.program_id(0)
            offs = tl.arange(0, BLOCK)
            valid = offs < n
            base = dist_ptr + b.to(tl.int64) * n * n
            j = tl.load(first_ptr + b)
            tl.store(out_ptr + b * k, j)
            mind = tl.load(base + j * n + offs, mask=valid, other=float("-inf")).to(tl.float32)
            for i in range(1, k):
                j = tl.argmax(mind, axis=0, tie_break_left=True)
                tl.store(out_ptr + b * k + i, j)
                row = tl.load(base + j * n + offs, mask=valid, other=float("-inf")).to(tl.float32)
                mind = tl.minimum(mind, row)

        _TRITON_KERNEL = _maxmin
    return _TRITON_KERNEL


def greedy_maxmin(dist: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`methods.divprune.greedy_maxmin` in one Triton launch, one program per image."""
    import triton

    b, n, _ = dist.shape
    dist = dist.contiguous()
    first = first_pick(dist).to(torch.int32).contiguous()
    out = torch.empty(b, k, dtype=torch.int32, device=dist.device)
    _triton_kernel()[(b,)](dist, first, out, n, k, BLOCK=triton.next_power_of_2(n), num_warps=4)
    return out.long()
