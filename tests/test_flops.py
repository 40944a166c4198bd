"""The analytic FLOPs model equals the counted FLOPs (FlopCounterMode) of the same forward."""

from __future__ import annotations

import pytest
import torch

from bench.measure.flops import analytic_decode, analytic_prefill, count_flops, paper_convention
from bench.models.llava import LlavaAdapter
from bench.runner import probe_batch
from methods.none import NoPruning
from methods.pool import Pool
from methods.random import RandomPruning


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaAdapter("tiny", str(tiny_model_dir), device="cpu").load()


@pytest.mark.parametrize("method", [NoPruning(), RandomPruning(0.5), RandomPruning(0.9), Pool(0.75), Pool(0.9)], ids=lambda m: f"{m.name}-{m.prune_ratio}")
def test_analytic_prefill_matches_counter(adapter, method):
    batch = probe_batch(adapter, None)
    seeds = torch.zeros(1, dtype=torch.long)

    def run():
        p = adapter.prepare(batch, method, seeds)
        return p, adapter.prefill(p, method)

    counted, (prepared, _) = count_flops(run)
    rows = prepared.visual_tokens_per_layer(adapter.num_llm_layers)
    text = int(prepared.attention_mask[0].sum()) - prepared.visual_tokens_kept[0]
    analytic = analytic_prefill(adapter.model.config, text, rows[0]).total
    assert abs(analytic - counted) <= 0.01 * counted, (analytic, counted)


def test_counter_sees_cpu_attention(adapter):
    """Without the registered CPU SDPA formula the counter silently drops attention."""
    cfg = adapter.model.config
    b = analytic_prefill(cfg, 60, [576] * adapter.num_llm_layers)
    q = torch.randn(1, 2, 636, 32)
    counted, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert counted == 4 * 636 * 636 * 64
    assert b.llm > 0


def test_decode_and_paper_convention_on_llava7b_shapes():
    """methods.md section 3: F(636) = 103.35 G multiply-adds per layer, 3.307 T over 32 layers."""
    import json
    from pathlib import Path

    from transformers import LlavaConfig

    cfg = LlavaConfig(**json.loads((Path(__file__).resolve().parent.parent / "bench/assets/configs/llava-1.5-7b-hf.json").read_text()))
    full = paper_convention(cfg, 60, [576] * 32) / 2
    assert abs(full / 32 - 103.35e9) / 103.35e9 < 1e-3
    assert abs(full - 3.307e12) / 3.307e12 < 1e-3
    pruned = paper_convention(cfg, 60, [64] * 32) / 2
    assert abs(pruned - 0.628e12) / 0.628e12 < 2e-3
    # decode: each new token attends over a growing cache
    d1 = analytic_decode(cfg, [636] * 32, 1)
    d2 = analytic_decode(cfg, [636] * 32, 2)
    assert d2 > 2 * d1 - 1e6 and d1 > 0
