"""VisPruner: important tokens by CLS attention, then diverse tokens by iterative de-duplication.

Paper: https://arxiv.org/abs/2412.01818v2 (ICCV'25, "Beyond Text-Visual Attention"; code:
Theia-4869/VisPruner, ``llava/model/llava_arch.py::encode_images``).

methods.md 1b: important tokens are the top ``int(T * r)`` by the FasterVLM score (head-mean CLS
attention at CLIP layer -2, CLS column dropped). The remaining tokens are processed in score-sorted
order (``argsort(descending)``), not raster: each round splits that list into even and odd positions,
drops the ``min(8, R - T_div)`` even-position tokens with the highest max-cosine to the odd set
(normalised layer -2 patch features, before the projector), and puts the surviving even tokens, in
descending-score order of that argsort, in front of the odd ones for the next round, until
``T - int(T * r)`` remain. Kept tokens reach the LLM in raster order.

Official defects handled here (methods.md policy): it crashes when the residual list has odd length
(``int(T * r)`` odd): the even half then has one more token, which is used as such; and the official
``prepare_inputs`` merges a batch of images into one sequence: every sample is separate here.

Speed: the rounds' count and sizes depend on lengths only (:func:`dedup_rounds`), so nothing syncs with
the host and the selection is CUDA-graph capturable. On CUDA with Triton and float16 features
(``backend="auto"`` = ``triton_scan``) all rounds run in one kernel launch (one program per image): every
similarity row is sorted once (one torch sort), then per even token and round only the head of its
sorted row up to the first odd-set token is read; the round tile shrinks with the list. At B=1 a launch
is one program on one SM, so a round's cost is its chain of dependent memory steps, not arithmetic: the
scan replaces the ``|even| x |odd|`` scattered loads (about 74k in the first rounds at 576 -> 64) of
``backend="triton"``, which gathers them (``results/selection_overhead.csv``, H100, graph replay, B=1:
0.90 / 0.94 / 1.55 ms at 192 / 128 / 64 kept vs 1.27 / 1.40 / 2.29 ms; identical picks, GPU-tested). ``backend="torch"`` runs the rounds as a
few batched kernels each (identical picks, tested): 4 kernels a round, 64 rounds at 576 -> 64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext


def dedup_rounds(n_res: int, n_div: int, step: int) -> list[int]:
    """Tokens dropped per de-duplication round, from ``n_res`` residual tokens down to ``n_div``.

    A round asks for ``r = min(step, L - n_div)`` and can drop at most the ``ceil(L / 2)`` even-position
    tokens; the count of rounds and their sizes depend on lengths only, never on values.
    """
    out, length = [], n_res
    while n_div > 0:
        r = min(step, length - n_div)
        if r <= 0:
            break
        out.append(r)
        length -= min(r, (length + 1) // 2)
    return out


def dedup_torch(sim: torch.Tensor, res: torch.Tensor, n_div: int, step: int) -> torch.Tensor:
    """The de-duplication rounds on ``(B, N, N)`` similarities: ``(B, R)`` residual list -> ``(B, n_div)`` survivors.

    Batched, fixed shapes per round, no host synchronisation (CUDA-graph capturable). Ties in the
    max-cosine ranking go to the earlier list position (a stable descending sort; the official
    ``argsort`` leaves them to the backend).
    """
    if n_div == 0:
        return res[:, :0]
    bi = torch.arange(res.shape[0], device=res.device).view(-1, 1, 1)
    for r in dedup_rounds(res.shape[1], n_div, step):
        ev, od = res[:, ::2], res[:, 1::2]
        best = sim[bi, ev.unsqueeze(-1), od.unsqueeze(1)].amax(dim=-1)
        survivors = best.sort(dim=-1, descending=True, stable=True).indices[:, r:]
        res = torch.cat([ev.gather(1, survivors), od], dim=1)
    return res


_TRITON_KERNEL = None
_SCAN_KERNEL = None


def _triton_kernel():
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        # lengths as plain int32 (a value of 1 would otherwise be specialised into a constant, and
        # the loop-carried length must keep one type)
        @triton.jit(do_not_specialize=["n", "r0", "n_div", "n_rounds", "step"])
        def _dedup(sim_ptr, res_ptr, buf_ptr, best_ptr, out_ptr, n, r0, n_div, n_rounds, step, BE: tl.constexpr, BO: tl.constexpr):
            # one program per image; the list lives in a double buffer in global memory (a round
            # reads one half and writes the other), the even tokens' best similarities in best_ptr; the
            # survivors go to out_ptr as int64 (res_ptr is int64 too: no conversion kernels around the launch)
            b = tl.program_id(0).to(tl.int64)
            sim = sim_ptr + b * n * n
            buf = buf_ptr + b * 2 * r0
            bestb = best_ptr + b * BE
            ie = tl.arange(0, BE)
            jo = tl.arange(0, BO)
            for c0 in range(0, r0, BE):
                offs = c0 + ie
                tl.store(buf + offs, tl.load(res_ptr + b * r0 + offs, mask=offs < r0).to(tl.int32), mask=offs < r0)
            tl.debug_barrier()
            length = r0
            for it in range(n_rounds):
                src = buf + (it % 2) * r0
                dst = buf + ((it + 1) % 2) * r0
                ne = (length + 1) // 2
                no = length // 2
                r = tl.minimum(step, length - n_div)
                ev_ok = ie < ne
                e = tl.load(src + 2 * ie, mask=ev_ok, other=0).to(tl.int64)
                best = tl.full([BE], float("-inf"), tl.float32)
                for j0 in range(0, no, BO):
                    jj = j0 + jo
                    o_ok = jj < no
                    o = tl.load(src + 2 * jj + 1, mask=o_ok, other=0)
                    t = tl.load(sim + e[:, None] * n + o[None, :], mask=ev_ok[:, None] & o_ok[None, :], other=float("-inf"))
                    best = tl.maximum(best, tl.max(t.to(tl.float32), axis=1))
                tl.store(bestb + ie, best)
                tl.debug_barrier()
                # re-read rather than reuse the loop result: with a float32 ``sim`` (no cast in the
                # loop) a second use trips Triton 3.6's OptimizeThreadLocality pass (hasOneUse assert)
                best = tl.load(bestb + ie)
                # rank among the evens, descending, earlier position first on ties (stable sort)
                rank = tl.zeros([BE], tl.int32)
                for j0 in range(0, ne, BO):
                    jj = j0 + jo
                    bj = tl.load(bestb + jj, mask=jj < ne, other=float("-inf"))
                    ahead = (bj[None, :] > best[:, None]) | ((bj[None, :] == best[:, None]) & (jj[None, :] < ie[:, None]))
                    rank += tl.sum((ahead & (jj < ne)[None, :]).to(tl.int32), axis=1)
                tl.store(dst + rank - r, e.to(tl.int32), mask=ev_ok & (rank >= r))
                kept = tl.maximum(ne - r, 0)
                for j0 in range(0, no, BE):
                    jj = j0 + ie
                    tl.store(dst + kept + jj, tl.load(src + 2 * jj + 1, mask=jj < no), mask=jj < no)
                length = kept + no
                tl.debug_barrier()
            fin = buf + (n_rounds % 2) * r0
            for c0 in range(0, n_div, BE):
                offs = c0 + ie
                tl.store(out_ptr + b * n_div + offs, tl.load(fin + offs, mask=offs < n_div).to(tl.int64), mask=offs < n_div)

        _TRITON_KERNEL = _dedup
    return _TRITON_KERNEL


def _scan_kernel():
    """The sorted-row variant: one launch, the round body compiled for five list sizes."""
    global _SCAN_KERNEL
    if _SCAN_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, mark, BE: tl.constexpr, K: tl.constexpr, BO: tl.constexpr):
            # one de-duplication round on a list of ``length`` <= 2 * BE tokens (src -> dst). Token t is in
            # this round's odd set iff stamp[t] == mark (marks never repeat); the previous round (or the
            # kernel's start) stamped it while writing src, so no pass over the odd set is needed here
            ne = (length + 1) // 2
            no = length // 2
            r = tl.minimum(step, length - n_div)
            ie = tl.arange(0, BE)
            ev_ok = ie < ne
            e = tl.load(src + 2 * ie, mask=ev_ok, other=0).to(tl.int64)
            # an even token's best similarity to the odd set is the first odd token's value in its
            # descending row: read K entries at a time; the row's maximum over this chunk's odd hits is
            # that value (sorted), so no second, dependent load is needed
            kk = tl.arange(0, K)
            best = tl.full([BE], float("-inf"), tl.float32)
            todo = ev_ok
            p = tl.full([], 0, tl.int32)
            while tl.sum(todo.to(tl.int32)) > 0:
                cols = p + kk
                m = todo[:, None] & (cols < n)[None, :]
                offs = e[:, None] * n + cols[None, :]
                idx = tl.load(order + offs, mask=m, other=0)
                v = tl.load(vals + offs, mask=m, other=float("-inf")).to(tl.float32)
                hit = m & (tl.load(stamp + idx, mask=m, other=0) == mark)
                n_hit = tl.max(hit.to(tl.int32), axis=1)
                best = tl.where(todo & (n_hit > 0), tl.max(tl.where(hit, v, float("-inf")), axis=1), best)
                todo = todo & (n_hit == 0)
                p += K
            tl.store(bestb + ie, best)
            tl.debug_barrier()
            best = tl.load(bestb + ie)  # see _dedup: a second use of the loop result trips Triton 3.6
            # rank among the evens, descending, earlier position first on ties (stable sort)
            jo = tl.arange(0, BO)
            rank = tl.zeros([BE], tl.int32)
            for j0 in range(0, ne, BO):
                jj = j0 + jo
                bj = tl.load(bestb + jj, mask=jj < ne, other=float("-inf"))
                ahead = (bj[None, :] > best[:, None]) | ((bj[None, :] == best[:, None]) & (jj[None, :] < ie[:, None]))
                rank += tl.sum((ahead & (jj < ne)[None, :]).to(tl.int32), axis=1)
            # write dst and stamp the next round's odd set (odd positions of dst) with mark + 1
            nxt = tl.full([BE], 0, tl.int32) + (mark + 1)
            q = rank - r
            tl.store(dst + q, e.to(tl.int32), mask=ev_ok & (q >= 0))
            tl.store(stamp + e, nxt, mask=ev_ok & (q >= 0) & (q % 2 == 1))
            kept = tl.maximum(ne - r, 0)
            for j0 in range(0, no, BE):
                jj = j0 + ie
                o = tl.load(src + 2 * jj + 1, mask=jj < no, other=0)
                tl.store(dst + kept + jj, o, mask=jj < no)
                tl.store(stamp + o, nxt, mask=(jj < no) & ((kept + jj) % 2 == 1))
            tl.debug_barrier()
            return kept + no

        # a @triton.jit function calls others by their name in the module's globals (closures are not seen)
        globals()["_scan_round"] = _scan_round

        @triton.jit(do_not_specialize=["n", "r0", "n_div", "n_rounds", "step"])
        def _dedup_scan(vals_ptr, order_ptr, stamp_ptr, res_ptr, buf_ptr, best_ptr, out_ptr, n, r0, n_div, n_rounds, step, BE0: tl.constexpr):
            # one program per image; vals/order: every similarity row sorted descending and its token
            # ids; the list in a double buffer (a round reads one half, writes the other). The tile of a
            # round follows the list: an even set of ``ne`` tokens runs on the smallest of BE0/256/128/
            # 64/32 that holds it, with wider row chunks (K) where the odd set is sparse
            b = tl.program_id(0).to(tl.int64)
            vals = vals_ptr + b * n * n
            order = order_ptr + b * n * n
            stamp = stamp_ptr + b * n
            buf = buf_ptr + b * 2 * r0
            bestb = best_ptr + b * BE0
            ie = tl.arange(0, BE0)
            for c0 in range(0, r0, BE0):
                offs = c0 + ie
                tl.store(buf + offs, tl.load(res_ptr + b * r0 + offs, mask=offs < r0).to(tl.int32), mask=offs < r0)
            for c0 in range(0, n, BE0):  # stamps start at 0, below every round's mark (an uninitialised buffer)
                offs = c0 + ie
                tl.store(stamp + offs, tl.zeros([BE0], tl.int32), mask=offs < n)
            tl.debug_barrier()
            for c0 in range(0, r0, BE0):  # round 0's odd set (mark 1): odd positions of res
                offs = c0 + ie
                t = tl.load(res_ptr + b * r0 + offs, mask=(offs < r0) & (offs % 2 == 1), other=0)
                tl.store(stamp + t, tl.full([BE0], 1, tl.int32), mask=(offs < r0) & (offs % 2 == 1))
            tl.debug_barrier()
            length = r0
            for it in range(n_rounds):
                src = buf + (it % 2) * r0
                dst = buf + ((it + 1) % 2) * r0
                ne = (length + 1) // 2
                if ne > 256:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, BE0, 8, 64)
                elif ne > 128:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 256, 16, 64)
                elif ne > 64:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 128, 32, 128)
                elif ne > 32:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 64, 64, 64)
                else:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 32, 128, 32)
            fin = buf + (n_rounds % 2) * r0
            for c0 in range(0, n_div, BE0):
                offs = c0 + ie
                tl.store(out_ptr + b * n_div + offs, tl.load(fin + offs, mask=offs < n_div).to(tl.int64), mask=offs < n_div)

        _SCAN_KERNEL = _dedup_scan
    return _SCAN_KERNEL


def dedup_triton(sim: torch.Tensor, res: torch.Tensor, n_div: int, step: int, scan: bool = False) -> torch.Tensor:
    """Same result as :func:`dedup_torch`, all rounds in one Triton launch (one program per image).

    ``scan=False`` (``backend="triton"``): every round gathers the ``|even| x |odd|`` similarities.
    ``scan=True`` (``backend="triton_scan"``): ``sim`` is sorted once per row (descending) and every round
    reads, per even token, only its sorted row up to the first odd-set token: the same maximum, since a
    maximum does not depend on the order of ties. The round's tile shrinks with the list (5 compiled
    sizes), so the late rounds (a few dozen tokens) do not pay for the first ones' width.
    """
    import triton

    b, r0 = res.shape
    rounds = dedup_rounds(r0, n_div, step)
    if n_div == 0 or not rounds:
        return res[:, :n_div]
    n = sim.shape[1]
    be = max(16, triton.next_power_of_2((r0 + 1) // 2))
    # scratch only (no kernels): the list's double buffer, the evens' best similarities, the odd stamps
    buf = torch.empty(b, 2, r0, dtype=torch.int32, device=res.device)
    out = torch.empty(b, n_div, dtype=torch.long, device=res.device)
    res = res.contiguous()  # a view at B=1 (the argsort tail), a copy otherwise
    if scan:
        be = max(256, be)
        vals, order = sim.sort(dim=-1, descending=True)
        stamp = torch.empty(b, n, dtype=torch.int32, device=res.device)
        best = torch.empty(b, be, dtype=torch.float32, device=res.device)
        _scan_kernel()[(b,)](vals, order, stamp, res, buf, best, out, n, r0, n_div, len(rounds), step, BE0=be, num_warps=8)
    else:
        best = torch.empty(b, be, dtype=torch.float32, device=res.device)
        _triton_kernel()[(b,)](sim.contiguous(), res, buf, best, out, n, r0, n_div, len(rounds), step, BE=be, BO=16, num_warps=8)
    return out


def vispruner_select(score: torch.Tensor, feats: torch.Tensor, n_keep: int, important_ratio: float, step: int = 8, backend: str = "torch") -> torch.Tensor:
    """``(B, N)`` scores and ``(B, N, C)`` patch features -> ``(B, n_keep)`` sorted kept indices.

    The cosine similarities of all token pairs are computed once (``(B, N, N)``, one GEMM) and every
    round indexes them, instead of one GEMM per round on the gathered halves as the official code does:
    the same dot products, and the rounds become gathers that one kernel can run back to back.
    """
    n_imp = int(n_keep * important_ratio)
    n_div = n_keep - n_imp
    order = score.argsort(dim=-1, descending=True, stable=True)
    imp, res = order[:, :n_imp], order[:, n_imp:]
    xn = feats / feats.norm(dim=-1, keepdim=True)
    sim = xn @ xn.transpose(1, 2)
    if backend.startswith("triton"):
        res = dedup_triton(sim, res, n_div, step, scan=backend == "triton_scan")
    else:
        res = dedup_torch(sim, res, n_div, step)
    return torch.cat([imp, res], dim=1).sort(dim=1).values


@dataclass
class VisPruner(PruningMethod):
    """Keep ``T = round(N * (1 - prune_ratio))`` tokens: ``int(T * important_ratio)`` important + the rest diverse.

    Parameters
    ----------
    important_ratio : float
        ``r``, the share of important tokens (0.5 official default; the README uses 0.75 at 64).
    layer : int
        CLIP layer of the CLS attention and of the features used for similarity (-2).
    step : int
        Even-position tokens dropped per de-duplication round (8).
    backend : {"auto", "torch", "triton", "triton_scan"}
        Implementation of the rounds (identical picks); ``auto`` = ``triton_scan`` (one Triton launch on
        row-sorted similarities, :func:`dedup_triton` with ``scan=True``) on CUDA with Triton and fp16
        features, else batched torch ops (one small set of kernels per round). ``triton``: one launch
        that gathers every round's similarities (slower on the H100).
    """

    important_ratio: float = 0.5
    layer: int = -2
    step: int = 8
    backend: str = "auto"

    requires_cls: ClassVar[bool] = True
    graph_safe: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.important_ratio) <= 1.0:
            raise ConfigError(f"vispruner: important_ratio must be in [0, 1], got {self.important_ratio}")
        if int(self.step) < 1:
            raise ConfigError("vispruner: step must be >= 1")
        if self.backend not in ("auto", "torch", "triton", "triton_scan"):
            raise ConfigError(f"vispruner: backend must be auto, torch, triton or triton_scan, got {self.backend!r}")

    @property
    def name(self) -> str:
        return "vispruner"

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"cls_attn:{self.layer}", f"hidden:{self.layer}"})

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, K)`` sorted indices (features come from ``hidden:<layer>``, CLS dropped)."""
        n = vis.shape[1]
        score = ctx.get(f"cls_attn:{self.layer}").mean(dim=1)[:, 1:]
        feats = ctx.get(f"hidden:{self.layer}")[:, 1:]
        if feats.shape[1] != n or score.shape[1] != n:
            raise ValueError(f"vispruner: tower tensors do not match the {n} visual tokens")
        from methods.divprune import _triton_ok

        # auto: Triton for float16 only, where it was checked equal on the H100; with float32 features its
        # picks differed from the torch rounds at 576 -> 64 (equal at 192/128; undiagnosed), bf16 is unchecked
        auto_triton = self.backend == "auto" and _triton_ok(feats) and feats.dtype == torch.float16
        backend = "triton_scan" if auto_triton else ("torch" if self.backend == "auto" else self.backend)
        if backend.startswith("triton") and not _triton_ok(feats):
            raise ConfigError(f"vispruner: backend={backend} needs CUDA tensors and Triton; use backend=auto or torch")
        return vispruner_select(score, feats, self.n_keep(n), float(self.important_ratio), int(self.step), backend)
