"""The scoring recompute's Triton kernels (``bench/models/fused.py``) against the torch formulations.

CPU: the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` in a fresh subprocess). GPU
(``-m gpu``): compiled, at LLaVA-1.5-7B shapes. The rotation must equal :func:`apply_rope`'s torch path
bit for bit; the norm equals ``LlamaRMSNorm`` up to the mean's summation order.
"""

from __future__ import annotations


import pytest
import torch

from triton_interp import run_triton_interpreted


def _torch_rope(x, table, heads_first):
    """:func:`apply_rope`'s own torch path, forced (on CUDA ``apply_rope`` takes the kernel)."""
    from bench.models import llm_pruning

    available = llm_pruning.available
    llm_pruning.available = lambda *t, **kw: False
    try:
        return llm_pruning.apply_rope(x, table, heads_first)
    finally:
        llm_pruning.available = available


def _tables(t, d, dt, dev, b=1, g=None):
    from bench.models.llm_pruning import rope_table

    pos = torch.arange(t, dtype=torch.float32)[None].expand(b, -1) + torch.randint(0, 50, (b, 1), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.cat([pos[..., None] * inv] * 2, -1)
    return rope_table(ang.cos().to(dt), ang.sin().to(dt)).to(dev)


def check_rope(dev: str, shapes, dtypes=(torch.float16, torch.bfloat16)) -> None:
    from bench.models import fused

    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for b, t, h, d, tb in shapes:
            x = (torch.randn(b, t, h, d, generator=g) * 4).to(dev, dt)
            table = _tables(t, d, dt, dev, tb, g)
            for heads_first in (True, False):
                got = fused.rope(x, table, heads_first)
                want = _torch_rope(x, table, heads_first)
                assert got.shape == want.shape and got.is_contiguous()
                assert torch.equal(got, want), (dt, b, t, h, heads_first, (got.float() - want.float()).abs().max())
            # a strided view of a wider buffer (the one-rotation path rotates rows of one GEMM output)
            wide = (torch.randn(b, t + 3, h, d, generator=g)).to(dev, dt)[:, 3:]
            assert torch.equal(fused.rope(wide, table[:, :t]), _torch_rope(wide.contiguous(), table[:, :t], True))


def check_rms(dev: str, shapes, dtypes=(torch.float16, torch.bfloat16)) -> float:
    """Returns the share of output elements that differ from ``LlamaRMSNorm`` (each within two ulps)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from bench.models import fused

    g = torch.Generator().manual_seed(1)
    diff = total = 0
    for dt in dtypes:
        for shape in shapes:
            d = shape[-1]
            norm = LlamaRMSNorm(d, eps=1e-5).to(dev, dt)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(d, generator=g) * 2)
                x = (torch.randn(shape, generator=g) * 3).to(dev, dt)
                got, want = fused.rms_norm(norm, x), norm(x)
            assert got.shape == want.shape and got.dtype == want.dtype
            # the inverse RMS may differ in its last fp32 bits only: ``x * rsqrt`` then rounds to the same
            # value or a neighbour, and the weight multiply (|w| < 2) plus its own rounding keeps the output
            # within two of its ulps (relative: 2 eps)
            err = (got.float() - want.float()).abs()
            bound = 2 * torch.finfo(dt).eps * want.float().abs() + torch.finfo(dt).tiny
            assert (err <= bound).all(), (dt, shape, float((err / bound).max()))
            diff += int((got != want).sum())
            total += want.numel()
    return diff / total


@pytest.mark.integration
def test_rope_and_norm_kernels_interpreted():
    """fp16 only: the interpreter rounds fp32 -> bfloat16 by truncation (numpy has no bfloat16), the GPU
    to nearest even as torch does, so bfloat16 is checked on the GPU."""
    pytest.importorskip("triton")
    run_triton_interpreted(
        "import sys, torch\nsys.path.insert(0, 'tests')\ntorch.set_num_threads(2)\n"
        "from test_fused_kernels import check_rope, check_rms\n"
        "h = (torch.float16,)\n"
        "check_rope('cpu', [(1, 7, 4, 16, 1), (2, 5, 3, 8, 1), (2, 6, 2, 16, 2)], h)\n"
        "check_rms('cpu', [(2, 5, 64), (1, 3, 48)], h)\nprint('ok')\n", timeout=300)


def test_cpu_paths_do_not_take_the_kernels():
    from kernels import HALF, available, interpreting

    assert interpreting() or not available(torch.zeros(2, dtype=torch.float16), dtypes=HALF)
    assert not available(torch.zeros(2, dtype=torch.float32), dtypes=HALF)


_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@_gpu
@pytest.mark.gpu
def test_rope_and_norm_kernels_cuda():
    check_rope("cuda", [(1, 636, 32, 128, 1), (16, 124, 32, 128, 1), (4, 33, 32, 128, 4), (1, 1, 32, 128, 1)])
    rate = check_rms("cuda", [(1, 636, 4096), (16, 124, 4096), (1, 1, 4096)])
    print(f"fused rms_norm: {rate:.2e} of elements differ from LlamaRMSNorm (each within 2 ulps)")
