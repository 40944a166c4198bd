"""Triton kernels for the in-LLM scoring recompute: Llama's rotary embedding and RMSNorm, one pass each.

A method that scores a layer on its own input before that layer runs (TransPrune's instruction
attention, any scoring without a capture) recomputes the layer's input norm and rotates its
q/k projections over the whole sequence. At batch 16 with LLaVA-1.5-7B shapes that sequence is
16 x 636 x 4096 half values (83 MB): the torch formulations pass over it five times for the norm
(cast, square, mean, scale, weight) and write a twice-as-large product tensor for the rotation
(:func:`bench.models.llm_pruning.apply_rope`), so the bookkeeping is memory traffic, not arithmetic.
Here each is one read and one write.

* :func:`rope` is **bit for bit** :func:`~bench.models.llm_pruning.apply_rope`: every product is formed in
  fp32 (exact for two half/bfloat16 operands) and rounded once to the model dtype, and the two products
  of each half are added in fp32 and rounded once, as torch's half ``mul`` and ``add`` do (fp32 opmath,
  one rounding per op). Tested equal on the GPU and under Triton's interpreter. The launch turns Triton's
  floating-point fusion off: with it, the compiler drops the round trips through the model dtype and
  contracts multiply and add into one FMA, and the rotation then differs from torch's on the H100
  (``tests/test_fused_kernels.py`` fails with fusion on).
* :func:`rms_norm` computes ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`` with the same roundings as
  ``LlamaRMSNorm`` except the mean: its fp32 sum runs in the kernel's order, not in torch's reduction
  order, so the inverse RMS can differ in the last fp32 bit and an output element then by one half ulp
  where ``x * rsqrt`` sits on a rounding midpoint (measured rate in the GPU test). It is used only for
  the scoring recompute (the layer itself still runs its own norm on the kept tokens); the selections
  it feeds are exact comparisons of attention rows that are themselves fp16-rounded.

Both need CUDA, Triton and a half/bfloat16 tensor (``kernels.available(x, dtypes=kernels.HALF)``, the one
availability check of every fast path); callers fall back to torch.
"""

from __future__ import annotations

import torch

_K: dict = {}


def _kernels() -> dict:
    if not _K:
        import triton
        import triton.language as tl

        @triton.jit
        def _rope(x_ptr, t_ptr, o_ptr, n_t, n_h, sxb, sxt, sxh, stb, stt, sob, sot, soh,
                  HALF: tl.constexpr, BH: tl.constexpr):
            # one program per (sample, token): all heads of that token, both halves of each head
            pid = tl.program_id(0)
            b = (pid // n_t).to(tl.int64)
            t = (pid % n_t).to(tl.int64)
            hh = tl.arange(0, BH)[:, None]
            j = tl.arange(0, HALF)[None, :]
            m = hh < n_h
            dt = o_ptr.dtype.element_ty
            xb = x_ptr + b * sxb + t * sxt + hh * sxh
            x1 = tl.load(xb + j, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(xb + HALF + j, mask=m, other=0.0).to(tl.float32)
            tb = t_ptr + b * stb + t * stt  # [[c1, s2], [-s1, c2]], each HALF wide
            c1 = tl.load(tb + j).to(tl.float32)
            s2 = tl.load(tb + HALF + j).to(tl.float32)
            ns1 = tl.load(tb + 2 * HALF + j).to(tl.float32)
            c2 = tl.load(tb + 3 * HALF + j).to(tl.float32)
            # each product rounded to the model dtype, then the fp32 sum of the two rounded once
            o1 = ((x1 * c1).to(dt).to(tl.float32) + (x2 * ns1).to(dt).to(tl.float32)).to(dt)
            o2 = ((x1 * s2).to(dt).to(tl.float32) + (x2 * c2).to(dt).to(tl.float32)).to(dt)
            ob = o_ptr + b * sob + t * sot + hh * soh
            tl.store(ob + j, o1, mask=m)
            tl.store(ob + HALF + j, o2, mask=m)

        @triton.jit
        def _rms(x_ptr, w_ptr, o_ptr, d, sx, so, inv_d, eps, BD: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            offs = tl.arange(0, BD)
            m = offs < d
            dt = o_ptr.dtype.element_ty
            x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
            r = tl.math.rsqrt(tl.sum(x * x, axis=0) * inv_d + eps)
            y = (x * r).to(dt).to(tl.float32)  # LlamaRMSNorm rounds before the weight multiply
            w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(o_ptr + row * so + offs, (w * y).to(dt), mask=m)

        _K.update(rope=_rope, rms=_rms)
    return _K


def rope(x: torch.Tensor, table: torch.Tensor, heads_first: bool = True) -> torch.Tensor:
    """:func:`~bench.models.llm_pruning.apply_rope` in one kernel, bit for bit.

    ``x`` ``(B, T, H, d)`` (head dim contiguous), ``table`` ``(B or 1, T, 2, 2, d/2)`` in ``x``'s dtype; returns
    ``(B, H, T, d)`` (``heads_first``) or ``(B, T, H, d)``, contiguous, in ``x``'s dtype.
    """
    import triton

    b, t, h, d = x.shape
    half = d // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    if table.dtype != x.dtype:  # torch would promote the product to the table's dtype: not this kernel's result
        raise TypeError(f"fused.rope: table dtype {table.dtype} differs from x dtype {x.dtype}")
    if table.stride(-1) != 1 or table.stride(-2) != half or table.stride(-3) != 2 * half:
        table = table.contiguous()
    tb = table.stride(0) if table.shape[0] == b and b > 1 else 0
    if heads_first:
        out = x.new_empty(b, h, t, d)
        sob, soh, sot = out.stride(0), out.stride(1), out.stride(2)
    else:
        out = x.new_empty(b, t, h, d)
        sob, sot, soh = out.stride(0), out.stride(1), out.stride(2)
    _kernels()["rope"][(b * t,)](x, table, out, t, h, x.stride(0), x.stride(1), x.stride(2), tb, table.stride(1),
                                 sob, sot, soh, HALF=half, BH=triton.next_power_of_2(h), num_warps=4, enable_fp_fusion=False)
    return out


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` ``norm`` applied to ``x`` ``(..., D)`` in one kernel (the mean's summation order
    differs from torch's, see the module docstring); ``(..., D)`` in ``x``'s dtype."""
    import triton

    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    bd = triton.next_power_of_2(d)
    _kernels()["rms"][(x2.shape[0],)](x2, norm.weight, out, d, x2.stride(0), out.stride(0), 1.0 / d,
                                      float(norm.variance_epsilon), BD=bd, num_warps=8 if bd >= 2048 else 4,
                                      enable_fp_fusion=False)
    return out.view(x.shape)
