"""Latency modes of ``bench.measure.latency``: the compiled prefill (``compiled_graph``) against eager.

CPU tests compile with ``aot_eager`` (dynamo's full trace, static shapes, no code generation) so
they stay fast; the GPU tests compile with inductor and capture the CUDA graph the harness times.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SIZES

from bench.measure.latency import (
    COMPILE_VARIANTS,
    CompiledPrefill,
    stage_latencies,
)
from bench.models.llava import LlavaAdapter
from bench.measure.probe import probe_batch
from methods.pool import Pool

ROOT = Path(__file__).resolve().parent.parent
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_lm(device="cpu", dtype=torch.float32):
    from bench.tiny_llava import build_model

    return build_model(TINY_SIZES).to(device, dtype).eval()


def layers_of(model) -> torch.nn.ModuleList:
    """The tiny LLaVA's decoder layers, as its adapter hands them to ``CompiledPrefill`` (``LlavaAdapter.decoder_layers``)."""
    return model.model.language_model.layers


def inputs(t: int, pad: int = 0, device="cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, t, TINY_SIZES["text_hidden"], generator=g).to(device, dtype)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :pad] = 0  # left padding on the second sample
    return embeds, mask.to(device)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("variant", ["aot_eager", "aot_eager-layers"])
@torch.no_grad()
def test_compiled_prefill_matches_eager_and_reuses_its_compile(variant):
    model = tiny_lm()
    embeds, mask = inputs(24)
    first = CompiledPrefill(model, embeds, mask, variant, layers=layers_of(model))
    assert first.graph is None and first.mask is None  # CPU: no capture; all-ones mask dropped
    c = first.check()
    assert c["max_abs_diff_vs_eager"] <= 1e-5 * c["max_abs_eager"], c
    assert not first.compile_reused and first.compile_s > 0
    n = unique_graphs()
    # same shapes (another method at the same kept count): no new graph, whatever the values
    again = CompiledPrefill(model, embeds * 2, mask, variant, layers=layers_of(model))
    assert again.compile_reused and unique_graphs() == n
    assert torch.allclose(again(), again.eager_logits(), atol=1e-5)
    # another sequence length: compiled again (static shapes), still equal to eager
    other = CompiledPrefill(model, *inputs(17), variant, layers=layers_of(model))
    assert not other.compile_reused and unique_graphs() == n + 1
    c = other.check()
    assert c["max_abs_diff_vs_eager"] <= 1e-5 * c["max_abs_eager"], c
    # the model is left as it was (layer scope installs compiled forwards only during a call)
    assert all("forward" not in layer.__dict__ for layer in layers_of(model))


@torch.no_grad()
def test_compiled_prefill_with_left_padding_keeps_the_mask():
    model = tiny_lm()
    embeds, mask = inputs(20, pad=5, seed=1)
    g = CompiledPrefill(model, embeds, mask, "aot_eager-layers", layers=layers_of(model))
    assert g.mask is not None
    c = g.check()
    assert c["max_abs_diff_vs_eager"] <= 1e-5 * c["max_abs_eager"], c
    # the padded sample's logits differ from those of the unpadded prompt of the same embeddings
    unpadded = CompiledPrefill(model, embeds[1:, 5:], mask[1:, 5:], "aot_eager-layers", layers=layers_of(model))
    assert torch.allclose(g()[1], unpadded()[0], atol=1e-4)


def test_compiled_graph_mode_on_cpu_is_null_with_reason(tiny_model_dir):
    adapter = LlavaAdapter("tiny", str(tiny_model_dir), device="cpu").load()
    batch = probe_batch(adapter, None)
    seeds = torch.zeros(1, dtype=torch.long)
    lat, notes = stage_latencies(adapter, Pool(0.75), batch, seeds, warmup=0, repeats=1, modes=("eager", "compiled_graph:inductor-layers"))
    assert lat["prefill_eager"]["median_ms"] > 0
    e = lat["prefill_compiled_graph"]
    assert e["median_ms"] is None and e["variant"] == "inductor-layers"
    assert any("prefill_compiled_graph is null: CUDA graphs need a GPU" in n for n in notes)
    with pytest.raises(ValueError, match="unknown compile variant"):
        stage_latencies(adapter, Pool(0.75), batch, seeds, warmup=0, repeats=1, modes=("compiled_graph:nope",))


def test_measurement_imports_without_the_accuracy_stack():
    """The GPU machine has no lmms-eval, wandb, datasets, hydra: importing them must not be needed."""
    code = (
        "import sys\n"
        "for m in ('lmms_eval', 'wandb', 'datasets', 'hydra', 'omegaconf'):\n"
        "    sys.modules[m] = None  # any import of them raises ImportError\n"
        "import bench.measure, bench.measure.latency, bench.measure.efficiency, bench.measure.flops, bench.measure.timing\n"
        "import bench.measure.probe, bench.models.llava, bench.runner\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


# ----------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "variant",
    [
        "inductor",
        # results/efficiency/probe_compiled_prefill_h100.csv: on torch 2.11 the per-layer compile fails
        # to capture ("operation failed due to a previous error during capture" / "Offset increment
        # outside graph capture"); strict, so a torch that fixes it turns this red and the note gets updated
        pytest.param("inductor-layers", marks=pytest.mark.xfail(torch.__version__.startswith("2.11"), reason="per-layer compile + manual CUDA-graph capture fails on torch 2.11", strict=True)),
    ],
)
@torch.no_grad()
def test_compiled_graph_logits_match_eager_fp16(variant):
    model = tiny_lm("cuda", torch.float16)
    for pad in (0, 4):
        embeds, mask = inputs(40, pad=pad, device="cuda", dtype=torch.float16)
        g = CompiledPrefill(model, embeds, mask, variant, layers=layers_of(model))
        assert g.graph is not None
        c = g.check()
        assert c["max_abs_diff_vs_eager"] <= 1e-2 * c["max_abs_eager"] + 1e-3, c
        assert torch.equal(g(), g())  # replays are deterministic on fixed inputs


@gpu
@pytest.mark.gpu
def test_compiled_graph_mode_is_timed_and_reused_across_methods(tiny_model_dir):
    adapter = LlavaAdapter("tiny", str(tiny_model_dir), device="cuda").load()
    batch = probe_batch(adapter, None)
    seeds = torch.zeros(1, dtype=torch.long)
    modes = ("graph", "compiled_graph:inductor")
    lat, notes = stage_latencies(adapter, Pool(0.75), batch, seeds, warmup=1, repeats=3, modes=modes)
    e = lat["prefill_compiled_graph"]
    assert e["median_ms"] > 0 and e["compile_s"] > 0, notes
    assert e["max_abs_diff_vs_eager"] <= 1e-2 * e["max_abs_eager"] + 1e-3
    from methods.random import RandomPruning

    lat2, _ = stage_latencies(adapter, RandomPruning(0.75), batch, seeds, warmup=1, repeats=3, modes=modes)
    assert lat2["prefill_compiled_graph"]["compile_reused"] is True  # same kept count -> same shapes


def test_variants_are_known():
    assert {"inductor", "inductor-layers", "inductor-max-autotune", "inductor-max-autotune-layers"} <= set(COMPILE_VARIANTS)
    assert all(v.mode is None or v.mode.endswith("no-cudagraphs") for v in COMPILE_VARIANTS.values())  # the capture is ours
