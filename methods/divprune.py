"""DivPrune: diversity-based visual token pruning as a max-min diversity problem.

Paper: https://arxiv.org/abs/2503.02175 (code: vbdi/divprune, ``llava_arch.py::DivPrune``).
methods.md 1b: on the projected image tokens, ``D = 1 - cos``. The first pick is the column whose
second-smallest distance is largest (the most isolated token); every later pick is
``argmax_j min_{i in S} D[i, j]`` with first-index ties (already-selected tokens are not masked: their
self-distance of about 0 keeps them out). Kept tokens go to the LLM in raster order.

Official defects handled per sample here (documented, methods.md policy): the image start is
hard-coded at sequence position 35 (the adapter gives the real span), and batch element 0's
selection is applied to the whole batch (here every sample selects its own tokens).

Speed: the greedy loop keeps a running ``(B, N)`` min-distance vector, so a step is one argmax, one
row gather and one ``minimum`` for the whole batch, with no host synchronisation. On CUDA with Triton
available (``backend="auto"``) the whole loop runs in one kernel launch (one program per image).
``min`` is exact, so the running minimum equals the official ``min`` over the selected rows bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, D)`` -> ``(B, N, N)`` ``1 - cos``, in ``x``'s dtype (as the official code)."""
    xn = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - torch.bmm(xn, xn.transpose(1, 2))


def first_pick(dist: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the column whose second-smallest entry is largest (``topk(2, largest=False)[1]``)."""
    return dist.topk(2, dim=1, largest=False).values[:, 1, :].argmax(dim=1)


def greedy_maxmin_torch(dist: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N, N)`` distances -> ``(B, k)`` picks in pick order; batched, no host sync."""
    b, n, _ = dist.shape
    j = first_pick(dist)
    picks = [j]
    mind = dist.gather(1, j.view(b, 1, 1).expand(b, 1, n)).squeeze(1)
    for _ in range(k - 1):
        j = mind.argmax(dim=1)  # first index among ties, as torch.argmax in the official loop
        picks.append(j)
        mind = torch.minimum(mind, dist.gather(1, j.view(b, 1, 1).expand(b, 1, n)).squeeze(1))
    return torch.stack(picks, dim=1)


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


def greedy_maxmin_triton(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Same result as :func:`greedy_maxmin_torch`; one Triton launch, one program per image."""
    import triton

    b, n, _ = dist.shape
    dist = dist.contiguous()
    first = first_pick(dist).to(torch.int32).contiguous()
    out = torch.empty(b, k, dtype=torch.int32, device=dist.device)
    _triton_kernel()[(b,)](dist, first, out, n, k, BLOCK=triton.next_power_of_2(n), num_warps=4)
    return out.long()


def _triton_ok(x: torch.Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class DivPrune(PruningMethod):
    """Greedy max-min diversity selection of ``round(N * (1 - prune_ratio))`` projected tokens.

    Parameters
    ----------
    backend : {"auto", "torch", "triton"}
        Implementation of the greedy loop (identical picks); ``auto`` = Triton on CUDA when available.
    """

    backend: str = "auto"

    graph_safe: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"divprune: backend must be auto, torch or triton, got {self.backend!r}")

    def selection_flops(self, cost) -> int:
        """The ``N x N`` cosine matrix of the projected tokens (``bmm`` of LLM-wide rows)."""
        return 0 if self.prune_ratio == 0.0 else cost.batch * 2 * cost.n_visual * cost.n_visual * cost.llm_width

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, D)`` projected tokens -> ``(B, K)`` sorted indices of the greedy max-min set."""
        k = self.n_keep(vis.shape[1])
        dist = cosine_distance(vis)
        use_triton = self.backend == "triton" or (self.backend == "auto" and _triton_ok(vis))
        picks = greedy_maxmin_triton(dist, k) if use_triton else greedy_maxmin_torch(dist, k)
        return picks.sort(dim=1).values
