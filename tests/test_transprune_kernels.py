"""TransPrune's Triton kernels (``kernels/transprune.py``) against its torch rule (``methods/transprune.py``).

CPU: the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, a fresh subprocess, as in
``tests/test_vision_methods.py``). GPU (``-m gpu``): the compiled kernels on CUDA, fp16 included, at
LLaVA-1.5-7B shapes. The two paths compute in fp32 in a different summation order, so statistics and
scores are compared with a tolerance and the kept indices exactly (random scores have no ties at that
precision).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from triton_interp import run_triton_interpreted

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- checks (CPU interpreter or CUDA)
def check_stats(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """One-launch statistics == torch reductions of the fp32-cast inputs (hidden dims below, at and above one block)."""
    from kernels.transprune import _launch_stats
    from methods.transprune import token_stats as _token_stats

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 37, 40), (1, 3, 5000)] if device == "cpu" else [(1, 636, 4096), (16, 636, 4096), (16, 124, 4096), (2, 9, 5000)]
    for b, t, d in shapes:
        x_in = (torch.randn(b, t, d, generator=g) * 2).to(device, dtype)
        x_out = (torch.randn(b, t, d, generator=g) + 0.5 * x_in.float().cpu()).to(device, dtype)
        ref = _token_stats(x_in.float(), x_out.float())  # fp32 reference of the same inputs
        buf = torch.full((3, 3, b, t), float("nan"), device=device)
        _launch_stats(x_in, x_out, buf[:, 1])
        assert torch.isnan(buf[:, 0]).all() and torch.isnan(buf[:, 2]).all()  # only its own slot is written
        torch.testing.assert_close(buf[:2, 1], ref[:2], rtol=2e-5, atol=1e-5)
        scale = ref[0] * ref[1]  # |in·out| <= ‖in‖‖out‖: the dot's rounding is relative to that
        assert ((buf[2, 1] - ref[2]).abs() <= 2e-5 * scale + 1e-5).all()
        if dtype != torch.float32:  # the torch path on the model-dtype inputs (what backend=torch runs)
            tp = _token_stats(x_in, x_out)
            torch.testing.assert_close(buf[:2, 1], tp[:2], rtol=2e-5, atol=1e-5)
            assert ((buf[2, 1] - tp[2]).abs() <= 2e-5 * scale + 1e-5).all()


def check_stats_group(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """All sublayers of a stage in one launch == one ``_stats`` launch per sublayer, bit for bit."""
    from kernels.transprune import _launch_stats, _launch_stats_group
    from methods.transprune import sublayer_stats

    g = torch.Generator().manual_seed(2)
    cases = [(1, 2, 37, 40), (3, 1, 9, 5000), (7, 2, 5, 64)] if device == "cpu" else \
        [(2, 1, 636, 4096), (6, 1, 124, 4096), (7, 16, 124, 4096)]
    for n_pairs, b, t, d in cases:
        pairs = []
        for j in range(n_pairs):
            x_in = (torch.randn(b, t + 1, d, generator=g) * 2).to(device, dtype)[:, 1:]  # one strided view
            x_out = (torch.randn(b, t, d, generator=g)).to(device, dtype)
            pairs.append((x_in if j == 0 else x_in.contiguous(), x_out))
        got = torch.full((3, n_pairs, b, t), float("nan"), device=device)
        ref = torch.full((3, n_pairs, b, t), float("nan"), device=device)
        _launch_stats_group(pairs, got)
        for j, (x_in, x_out) in enumerate(pairs):
            _launch_stats(x_in, x_out, ref[:, j])
        assert torch.equal(got, ref), (n_pairs, b, t, d)
        assert torch.equal(sublayer_stats.run("triton", pairs), ref)  # the dispatch's fast path


def _finish_case(g, device, b, t, n, q, h, padded, has_stats, has_prev, n_sub, attn_dtype):
    # every sample keeps at least one query row after its image (real prompts end with the instruction;
    # with none, the query mean is 0/0 in both paths)
    pad = [min(3 * i, q - 1) if padded else 0 for i in range(b)]
    vs = torch.tensor([5 + p for p in pad])
    valid = torch.ones(b, t, dtype=torch.bool)
    for i, p in enumerate(pad):
        valid[i, :p] = False
    stats = None
    if has_stats:
        n_in = torch.rand(n_sub, b, t, generator=g) * 4 + 0.5
        n_out = torch.rand(n_sub, b, t, generator=g) * 4 + 0.5
        dot = (torch.rand(n_sub, b, t, generator=g) * 2 - 1) * n_in * n_out
        stats = torch.stack([n_in, n_out, dot]).to(device)
    prev = None
    if has_prev:
        n_prev = n + 17
        keep = torch.stack([torch.randperm(n_prev, generator=g)[:n].sort().values for _ in range(b)])
        prev = (torch.rand(b, n_prev, generator=g).to(device), keep.to(device))
    first = int(vs.min()) + n
    q_index = torch.arange(first, first + q)
    q_valid = (q_index.view(1, -1) >= (vs + n).view(-1, 1)).to(device)
    attn = torch.rand(b, h, q, t, generator=g).softmax(-1).to(device, attn_dtype)
    return stats, (valid.to(device) if padded else None), vs.to(device), prev, attn, q_valid


def check_finish(device: str = "cpu") -> None:
    """The one-launch stage finish == :func:`methods.transprune.transprune_score` (accumulated TTV, score, and the top-k kept)."""
    from kernels.transprune import transprune_score as fast
    from methods.ranking import topk_sorted
    from methods.transprune import transprune_score

    g = torch.Generator().manual_seed(1)
    cases = [  # b, t, n, q, h, padded, stats, prev, n_sub, attn dtype
        (2, 90, 40, 7, 4, False, True, False, 2, torch.float32),
        (3, 95, 33, 9, 2, True, True, True, 4, torch.float32),
        (2, 1100, 300, 20, 2, True, True, True, 3, torch.float32),  # more than one 1024-token chunk
        (2, 80, 30, 5, 2, True, False, True, 0, torch.float32),  # a second stage at the same layer
        (1, 60, 20, 6, 2, False, False, False, 0, torch.float32),  # no TTV layer before the stage
    ]
    if device != "cpu":  # LLaVA-1.5-7B: 35 + 576 + 25 tokens, 32 heads, stages of 6 / 4 / 2 sublayers
        cases += [(1, 636, 576, 25, 32, False, True, False, 2, torch.float16),
                  (16, 636, 576, 25, 32, False, True, False, 2, torch.float16),
                  (16, 124, 64, 25, 32, True, True, True, 6, torch.float16),
                  (4, 700, 576, 60, 32, True, True, False, 2, torch.bfloat16)]
    for b, t, n, q, h, padded, has_stats, has_prev, n_sub, dt in cases:
        stats, valid, vs, prev, attn, q_valid = _finish_case(g, device, b, t, n, q, h, padded, has_stats, has_prev, n_sub, dt)
        uniform = bool((vs == vs[0]).all())
        ttv_t, score_t = transprune_score.reference(stats, valid, vs, prev, attn.mean(1), q_valid, n, uniform)
        ttv_k, score_k = fast(stats, valid, vs, prev, attn.mean(1), q_valid, n, uniform)
        assert (ttv_t is None) == (ttv_k is None) == (not has_stats and not has_prev)
        if ttv_t is not None:
            torch.testing.assert_close(ttv_k, ttv_t, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(score_k, score_t, rtol=1e-5, atol=1e-8)
        for k in (1, n // 3, n - 1):
            assert torch.equal(topk_sorted(score_k, k), topk_sorted(score_t, k)), (b, t, n, k)


def _tiny_adapter(device: str, dtype: torch.dtype):
    from bench.models.llava import LlavaAdapter, build_random_llava
    from bench.tiny_llava import build_config

    torch.manual_seed(0)
    config = build_config({"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "vision_mlp": 64,
                           "text_hidden": 64, "text_layers": 32, "text_heads": 4, "text_mlp": 128})
    ad = LlavaAdapter("tiny", "unused", weights="random", device=device, dtype="float16" if dtype == torch.float16 else "float32")
    ad.model = build_random_llava(config, torch.device(device), dtype)
    ad.supported_stages = ad.supported_stages | {"in_llm"}
    return ad


def _prepared(ad, padded: bool):
    """Two samples, 576 visual tokens; ``padded``: the second one is left-padded by 3 (its image starts later)."""
    from bench.models.base import PreparedBatch

    b, n, prefix, text, pad = 2, 576, 35, 25, 3 if padded else 0
    t = prefix + n + text + pad
    dev, d = ad.model.device, ad.model.config.text_config.hidden_size
    emb = (torch.randn(b, t, d, generator=torch.Generator().manual_seed(0)) * 0.5).to(dev, ad.model.dtype)
    mask = torch.ones(b, t, dtype=torch.long, device=dev)
    mask[1, :pad] = 0
    spans = torch.tensor([[prefix, prefix + n], [prefix + pad, prefix + pad + n]])
    return PreparedBatch(torch.zeros(b, t, dtype=torch.long, device=dev), emb, mask, [n] * b, [n] * b,
                         extras={"image_spans": spans, "sample_seeds": torch.arange(b)})


def check_end_to_end(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """A 32-layer tiny LLaVA (the 7B schedule: stages at 7/9/12, TTV layers 6..11): the Triton backend
    keeps exactly the tokens the torch backend keeps, at every stage, padded or not, and the model output
    after pruning is the same."""
    from methods.transprune import TransPrune

    ad = _tiny_adapter(device, dtype)
    for padded in (False, True):
        prepared = _prepared(ad, padded)
        kept, logits = {}, {}
        for backend in ("torch", "triton"):
            m = TransPrune(prune_ratio=1 - 64 / 576, budget="after_prune", backend=backend)
            with torch.no_grad():
                logits[backend] = ad.prefill(prepared, m).logits.float()
            kept[backend] = [s["kept_index"] for s in prepared.extras["llm_stages"]]
        assert len(kept["torch"]) == 3
        for a, b in zip(kept["torch"], kept["triton"]):
            assert torch.equal(a, b), (padded, a, b)
        torch.testing.assert_close(logits["triton"], logits["torch"], rtol=0, atol=0)


_IMPORT = ("import sys, torch\nsys.path.insert(0, 'tests')\ntorch.set_num_threads(2)\n"
           "from test_transprune_kernels import check_stats, check_stats_group, check_finish, check_end_to_end\n")


# ----------------------------------------------------------------------------- CPU
def test_backend_is_validated():
    from bench.errors import ConfigError
    from kernels import interpreting
    from methods.transprune import TransPrune, sublayer_stats

    with pytest.raises(ConfigError, match="backend"):
        TransPrune(prune_ratio=0.5, backend="cuda")
    x = torch.zeros(2, 3, dtype=torch.float16)
    assert interpreting() or not sublayer_stats.takes([(x, x)])  # CPU tensors: torch
    if not interpreting():
        with pytest.raises(ConfigError, match="backend=triton needs CUDA"):
            sublayer_stats.run("triton", [(x, x)])


@pytest.mark.integration
def test_stats_and_finish_kernels_interpreted():
    pytest.importorskip("triton")
    run_triton_interpreted(_IMPORT + "check_stats()\ncheck_stats_group()\ncheck_finish()\nprint('ok')\n", timeout=300)


@pytest.mark.integration
def test_triton_backend_keeps_what_torch_keeps_interpreted():
    pytest.importorskip("triton")
    run_triton_interpreted(_IMPORT + "check_end_to_end()\nprint('ok')\n", timeout=300)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
def test_stats_kernel_cuda():
    pytest.importorskip("triton")
    check_stats("cuda", torch.float32)
    check_stats("cuda", torch.float16)
    check_stats("cuda", torch.bfloat16)
    check_stats_group("cuda", torch.float16)
    check_stats_group("cuda", torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_finish_kernel_cuda():
    pytest.importorskip("triton")
    check_finish("cuda")


@gpu
@pytest.mark.gpu
def test_triton_backend_keeps_what_torch_keeps_cuda():
    pytest.importorskip("triton")
    from methods.transprune import sublayer_stats, transprune_score

    x = torch.zeros(1, 2, 8, device="cuda", dtype=torch.float16)
    assert sublayer_stats.takes([(x, x)]) and transprune_score.takes(None, None, None, None, x[:, :, :1], None, 1)  # auto on CUDA fp16
    assert not sublayer_stats.takes([(x.float(), x.float())])  # fp32: the torch rule unless backend=triton
    check_end_to_end("cuda", torch.float32)
    check_end_to_end("cuda", torch.float16)
