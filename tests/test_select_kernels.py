"""The ranking kernels (``kernels/ranking.py``) and ToMe's (``kernels/tome.py``) against plain loops and their torch rules.

CPU: the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, a fresh subprocess, as in
``tests/test_transprune_kernels.py``); the torch path (what CPU runs) must equal the formulations the
methods used before. GPU (``-m gpu``): the compiled kernels on CUDA at LLaVA-1.5-7B shapes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kernels import reference_only
from triton_interp import run_triton_interpreted


# ----------------------------------------------------------------------------- references
def loop_rank(scores: torch.Tensor, k: int, extra: int, largest: bool = True) -> tuple[list, list]:
    """Per row: the ``k`` best indices sorted, and the next ``extra`` in rank order (higher first, NaN
    highest, ``-0.0 == +0.0``, ties by lower index); ``largest=False``: the smallest first."""
    keep, rest = [], []
    for row in scores.float().tolist():
        def key(i, row=row):
            v = row[i]
            if math.isnan(v):
                return (0, 0.0, i)
            return (1, -v if largest else v, i)
        order = sorted(range(len(row)), key=key)
        keep.append(sorted(order[:k]))
        rest.append(order[k : k + extra])
    return keep, rest


def _cases(g: torch.Generator, big: bool):
    """``(scores, k, extra)``: distinct values, heavy ties, signed zeros, NaN, k = N, k = 1, extra = 0, B > 1."""
    shapes = [(1, 37, 5, 7), (3, 64, 20, 14), (2, 16, 16, 0), (2, 16, 1, 0), (2, 16, 1, 15), (1, 5, 0, 5), (2, 100, 10, 90),
              (2, 1, 1, 0), (1, 130, 48, 30)]
    if big:
        shapes += [(1, 576, 64, 154), (16, 576, 48, 159), (16, 576, 504, 0), (2, 2048, 300, 100), (1, 4096, 64, 154)]
    for b, n, k, e in shapes:
        yield torch.randn(b, n, generator=g), k, e
        coarse = (torch.randint(-4, 5, (b, n), generator=g) / 4.0)  # many ties, zeros of both signs
        coarse = torch.where(torch.rand(b, n, generator=g) < 0.3, -coarse * 0, coarse)
        yield coarse, k, e
    s = torch.randn(2, 40, generator=g)
    s[0, 3] = s[1, 7] = float("nan")
    yield s, 4, 6


def check_topk_rank(device: str = "cpu", big: bool = False) -> None:
    """:func:`topk_rank`'s kernel path == the loop reference (every dtype, ties included)."""
    from kernels import available
    from methods.ranking import topk_rank

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for s, k, e in _cases(g, big):
            s = s.to(device, dt)
            assert available(s)
            keep, rest = topk_rank(s, k, e)
            assert keep.dtype == rest.dtype == torch.long and keep.shape == (s.shape[0], k) and rest.shape == (s.shape[0], e)
            rk, rr = loop_rank(s.cpu(), k, e)
            assert keep.cpu().tolist() == rk, (dt, s.shape, k, e)
            assert rest.cpu().tolist() == rr, (dt, s.shape, k, e)
            if not torch.isnan(s).any():  # smallest first (ToMe's unmerged set and its ascending sources)
                keep, rest = topk_rank(s, k, e, largest=False)
                rk, rr = loop_rank(s.cpu(), k, e, largest=False)
                assert keep.cpu().tolist() == rk and rest.cpu().tolist() == rr, ("smallest", dt, s.shape, k, e)


def check_tome(device: str = "cpu", big: bool = False) -> None:
    """ToMe's matching with the kernels (row max, unmerged set + sources from one :func:`topk_rank`, the fused
    ``merge_wavg`` for fp16 / bf16) merges what ``max`` + ``argsort`` + ``sort`` + the one-hot GEMM merge do,
    on random keys (distinct fp32 / fp16 scores; bf16 is only checked against the exact merge on its own picks)
    with the CLS row protected, with and without sizes.

    The fused merge adds a destination's sources in fp32 and rounds once: it equals the torch merge run in
    float64 and rounded (bit for bit), and the fp16 torch path wherever a destination has at most one source.
    Where two or more meet, cuBLAS's fp16 one-hot GEMM may round partial sums (it does on the H100)."""
    import kernels.tome as ktome
    import methods.tome as tome

    g = torch.Generator().manual_seed(4)
    # row_max is scores.max(-1) (first index of a tied maximum, NaN above all) with the CLS row at -inf
    s = (torch.randint(0, 7, (2, 40, 30), generator=g) / 6.0).to(device, torch.float16)
    s[1, 5, 3] = float("nan")
    m, i = ktome.row_max(s, protect_first=True)
    s[:, 0] = -math.inf
    want = s.max(dim=-1)
    assert torch.equal(i, want.indices) and torch.equal(m[~m.isnan()], want.values[~want.values.isnan()]) and m[1, 5].isnan()
    # rank=r: the last program of each image ranks the maxima in the same launch (its counter reset for the next)
    from methods.ranking import topk_rank

    g2 = torch.Generator().manual_seed(7)
    for dt in (torch.float32, torch.float16):
        for b, t1, t2, r in ((2, 40, 30, 7), (3, 300, 288, 23), (1, 9, 8, 4)):
            for _ in range(2):
                s = torch.randn(b, t1, t2, generator=g2).to(device, dt)
                m, i, unm, src = ktome.row_max(s, protect_first=True, rank=r)
                m2, i2 = ktome.row_max(s, protect_first=True)
                assert torch.equal(m, m2) and torch.equal(i, i2)
                want = topk_rank(m2, t1 - r, r, largest=False)
                assert torch.equal(unm, want[0]) and torch.equal(src, want[1]), (dt, b, t1, r)
    assert int(ktome._counters(torch.device(device), 1).abs().sum()) == 0
    cfgs = [(1, 577, 64, 1024, 23), (2, 289, 64, 1024, 48), (1, 65, 64, 64, 32)] if big else [(1, 33, 8, 16, 5), (2, 20, 8, 8, 9)]
    # bf16 on the GPU only: the interpreter truncates to bf16 instead of rounding
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32, torch.float16)
    for b, t, d, c, r in cfgs:
        for dt in dtypes:
            for with_size in (True, False):
                metric = torch.randn(b, t, d, generator=g).to(device, dt)
                x = torch.randn(b, t, c, generator=g).to(device, dt)
                size = torch.randint(1, 4, (b, t, 1), generator=g).to(device, dt) if with_size else None
                m = tome.bipartite_soft_matching(metric, r, True)
                out = tome.merge_wavg(x, size, m)
                with reference_only():
                    m_ref = tome.bipartite_soft_matching(metric, r, True)
                    ref = tome.merge_wavg(x, size, m_ref)
                case = (b, t, r, dt, with_size)
                if dt != torch.bfloat16:  # bf16 scores tie often: argsort leaves ties unordered, the kernel goes by index
                    assert torch.equal(out[1], ref[1]), case  # the same matches: the same merged sizes
                if dt == torch.float32:  # no fused merge: the torch merge on the kernels' picks
                    assert torch.equal(out[0], ref[0]), case
                    continue
                xs = x if size is None else x * size
                exact = tome.merge_sum(xs.double(), m).to(dt)
                assert torch.equal(out[0], (exact.float() / out[1].float()).to(dt)), case
                sources = tome.merge_sum(torch.ones_like(x[..., :1]).double(), m) - 1  # per output row
                one = (sources <= 1).expand_as(out[0])
                if dt != torch.bfloat16:
                    assert torch.equal(out[0][one], ref[0][one]), case


def check_l2_normalize(device: str = "cpu", big: bool = False) -> None:
    """ToMe's fused ``metric / metric.norm(dim=-1)`` kernel rounds as :func:`~kernels.tome.norm_tree` says, in both
    orders (interpreter and GPU); on the GPU, :func:`methods.tome.normalize` equals torch's two kernels bit
    for bit (fp32 / fp16 / bf16, rows spanning a wide range of magnitudes, zero rows included)."""
    from kernels import tome
    from methods.tome import normalize

    g = torch.Generator().manual_seed(5)
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32, torch.float16)
    for d in (64, 32, 8, 1):
        for dt in dtypes:
            n = 2000 if big else 70
            x = (torch.randn(n, d, generator=g) * torch.exp2(torch.randint(-6, 7, (n, d), generator=g).float())).to(dt)
            x[3] = 0  # 0 / 0: NaN, as torch
            for desc in (True, False):
                y = tome.normalize_kernel(x.to(device), desc)
                nrm = tome.norm_tree(x, desc).to(dt)
                want = (x.double() / nrm.double()[:, None]).float().to(dt)
                assert torch.equal(y.cpu()[~want.isnan()], want[~want.isnan()]) and y[3].isnan().all(), (d, dt, desc)
            if device == "cuda":
                m = x.to(device).view(1, n, d)
                assert tome.torch_norm_order(m.device, d) is not None, d
                assert torch.equal(normalize(m).nan_to_num(), (m / m.norm(dim=-1, keepdim=True)).nan_to_num()), (d, dt)


def check_matches_torch(device: str = "cpu", big: bool = False) -> None:
    """On distinct scores the kernel equals ``topk`` + ``sort`` (the torch path) exactly; the smallest values
    equal ``topk(largest=False).values`` whatever the ties; :func:`dpc_scores` equals its torch path."""
    from methods.ranking import dpc_scores, smallest_sorted, topk_rank, topk_sorted

    g = torch.Generator().manual_seed(1)
    shapes = [(1, 576, 64, 154), (16, 576, 48, 159), (3, 576, 504, 0)] if big else [(2, 96, 20, 30), (1, 33, 1, 0)]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for b, n, k, e in shapes:
            s = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).float() / n  # distinct in every dtype
            s = s.to(device, dt)
            got, want = topk_rank(s, k, e), topk_rank.reference(s, k, e)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dt, b, n, k, e)
            assert torch.equal(topk_sorted(s, k), want[0])
        for b, m, c in ((1, 159, 16), (2, 13, 2), (3, 40, 5)) if big else ((1, 20, 3), (2, 9, 2)):
            x = torch.randn(b, m, 8, generator=g)
            x[:, 1] = x[:, 0]  # zero distances off the diagonal: ties
            dist = torch.cdist(x, x).to(device, dt)
            assert torch.equal(smallest_sorted(dist, c), dist.topk(c, dim=-1, largest=False).values), (dt, b, m, c)
            den = torch.rand(b, m, generator=g).to(device, dt)
            den[:, 2] = den[:, 3]  # equal densities: neither is the other's parent
            assert torch.equal(dpc_scores(dist, den), dpc_scores.reference(dist, den)), (dt, b, m)


class _View:
    """The parts of a StageView that :meth:`SparseVLM.prune` reads (attention rows given)."""

    def __init__(self, attn_rows, embeds, hidden, s0, n, jitter):
        b = hidden.shape[0]
        self.hidden, self.n_vis, self.layer = hidden, n, 3
        self.vis_start = torch.full((b,), s0, device=hidden.device)
        self.state, self.static = {}, {"jitter": {0: jitter}}
        self.uniform_start, self.vis_start_min = True, s0
        self._rows, self._embeds = attn_rows, embeds

    def attn_rows(self, layer, queries):
        return self._rows, torch.ones(self._rows.shape[0], self._rows.shape[2], dtype=torch.bool, device=self._rows.device)

    def input_embeds(self):
        return self._embeds

    def visual(self, x, dim=1):
        return x.narrow(dim, self.vis_start_min, self.n_vis)


def check_sparsevlm(device: str = "cpu", big: bool = False) -> None:
    """:meth:`SparseVLM.prune` keeps and merges exactly what it did with ``topk`` + ``sort`` (the torch path)."""
    from methods.inllm import Stage
    from methods.sparsevlm import SparseVLM, merge_counts

    g = torch.Generator().manual_seed(2)
    cfgs = [(1, 576, 48, 4096, torch.float16), (16, 576, 48, 4096, torch.float16), (2, 64, 22, 64, torch.float32)] if big \
        else [(2, 64, 20, 32, torch.float32), (1, 48, 12, 32, torch.float16)]
    for b, n, k, d, dt in cfgs:
        s0, q = 5, 9
        t = s0 + n + q
        attn = torch.rand(b, 4, q, t, generator=g).softmax(-1).to(device, dt)
        embeds = torch.randn(b, t, d, generator=g).to(device, dt)
        hidden = torch.randn(b, t, d, generator=g).to(device, dt)
        cand, c = merge_counts(n, k)
        jitter = (torch.rand(b, cand, generator=g) * 1e-6).to(device, dt)
        stage = Stage(3, k + c, True, n_select=k)
        out = SparseVLM(prune_ratio=0.5).prune(0, stage, _View(attn, embeds, hidden, s0, n, jitter))
        with reference_only():
            ref = SparseVLM(prune_ratio=0.5).prune(0, stage, _View(attn, embeds, hidden, s0, n, jitter))
        assert torch.equal(out.keep, ref.keep), (b, n, k)
        assert torch.equal(out.extra, ref.extra), (b, n, k)


# ----------------------------------------------------------------------------- CPU


_IMPORT = ("import sys, torch\nsys.path.insert(0, 'tests')\ntorch.set_num_threads(2)\n"
           "from test_select_kernels import check_topk_rank, check_matches_torch, check_sparsevlm, check_tome, check_l2_normalize\n")


@pytest.mark.integration
def test_kernels_interpreted():
    pytest.importorskip("triton")
    run_triton_interpreted(_IMPORT + "check_topk_rank()\ncheck_matches_torch()\ncheck_sparsevlm()\ncheck_tome()\ncheck_l2_normalize()\nprint('ok')\n", timeout=300)


def test_torch_path_is_the_previous_formulation():
    """CPU (no interpreter) takes the torch path, which is exactly what the methods computed before."""
    from kernels import available
    from methods.ranking import dpc_scores, smallest_sorted, topk_rank, topk_sorted

    g = torch.Generator().manual_seed(3)
    s = (torch.randint(0, 6, (3, 50), generator=g) / 5.0)  # ties: whatever torch.topk does with them
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not available(s)
    top = s.topk(20 + 7, dim=1).indices
    keep, rest = topk_rank(s, 20, 7)
    assert torch.equal(keep, top[:, :20].sort(dim=1).values) and torch.equal(rest, top[:, 20:])
    assert torch.equal(topk_rank(s, 20)[0], s.topk(20, dim=1, sorted=False).indices.sort(dim=1).values)
    assert torch.equal(topk_sorted(s, 20), s.topk(20, dim=1, sorted=False).indices.sort(dim=1).values)
    assert torch.equal(topk_rank(s, 0, 5)[1], s.topk(5, dim=1).indices) and topk_rank(s, 0, 5)[0].shape == (3, 0)
    d = torch.rand(2, 9, 9, generator=g)
    assert torch.equal(smallest_sorted(d, 3), d.topk(3, dim=-1, largest=False).values)
    den = torch.rand(2, 9, generator=g)
    higher = den[:, None, :] > den[:, :, None]
    parent = torch.where(higher, d, d.flatten(1).max(-1).values.view(2, 1, 1)).min(-1).values
    assert torch.equal(dpc_scores(d, den), parent * den)


def test_norm_tree_is_atens_reduce_order():
    """``norm_tree`` sums as ATen's CUDA reduce kernel does for rows of D <= 64 (Reduce.cuh, simulated lane by lane
    in numpy float32): ``thread_reduce``'s ``vt0 = 4`` accumulators over a stride of ``blockDim.x = min(D, 32)``,
    combined in order, then ``block_x_reduce``'s ``shfl_down`` loop (a lane past the warp reads its own value)
    with decreasing or increasing offsets; then the IEEE square root."""
    import numpy as np

    from kernels.tome import norm_tree

    g = torch.Generator().manual_seed(6)
    for d in (1, 2, 8, 32, 64):
        x = torch.randn(64, d, generator=g) * torch.exp2(torch.randint(-8, 9, (64, d), generator=g).float())
        xs = x.numpy()
        for desc in (True, False):
            lanes = min(d, 32)
            offsets = [lanes >> k for k in range(1, lanes.bit_length())] if desc else [1 << k for k in range(lanes.bit_length() - 1)]
            want = []
            for row in xs:
                vals = []
                for lane in range(lanes):
                    acc, idx = [np.float32(0)] * 4, lane
                    while idx + 3 * lanes < d:
                        acc = [acc[i] + row[idx + i * lanes] * row[idx + i * lanes] for i in range(4)]
                        idx += 4 * lanes
                    for i in range(4):
                        if idx >= d:
                            break
                        acc[i] = acc[i] + row[idx] * row[idx]
                        idx += lanes
                    v = acc[0]
                    for i in range(1, 4):
                        v = v + acc[i]
                    vals.append(v)
                for off in offsets:
                    vals = [vals[lane] + (vals[lane + off] if lane + off < lanes else vals[lane]) for lane in range(lanes)]
                want.append(np.sqrt(vals[0]))
            assert torch.equal(norm_tree(x, desc), torch.from_numpy(np.array(want, dtype=np.float32))), (d, desc)


def test_loop_reference_rank_rule():
    keep, rest = loop_rank(torch.tensor([[0.5, 2.0, 0.5, -0.0, 0.0, float("nan")]]), 2, 3)
    assert keep == [[1, 5]] and rest == [[0, 2, 3]]


def test_topk_rank_validates_counts():
    from methods.ranking import topk_rank

    with pytest.raises(ValueError, match="k \\+ extra"):
        topk_rank(torch.zeros(1, 4), 3, 2)
    with pytest.raises(ValueError):
        topk_rank(torch.zeros(1, 4), -1)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
def test_kernels_cuda():
    pytest.importorskip("triton")
    check_topk_rank("cuda", big=True)
    check_matches_torch("cuda", big=True)
    check_sparsevlm("cuda", big=True)
    check_l2_normalize("cuda", big=True)
    check_tome("cuda", big=True)


@gpu
@pytest.mark.gpu
def test_topk_rank_graph_capture_cuda():
    """No host synchronisation: the kernel path captures in a CUDA graph and replays on new scores."""
    pytest.importorskip("triton")
    from methods.ranking import topk_rank

    s = torch.randn(1, 576, device="cuda")
    topk_rank(s, 64, 154)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep, rest = topk_rank(s, 64, 154)
    s.copy_(torch.randn(1, 576, device="cuda"))
    graph.replay()
    ref = topk_rank.reference(s, 64, 154)
    assert torch.equal(keep, ref[0]) and torch.equal(rest, ref[1])
