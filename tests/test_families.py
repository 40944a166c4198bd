"""Every registered method on every family: it runs (tiny random-config model, a few tokens) or is refused with a
reason (IncompatibleMethodError: exit code 2 through the CLI, before any model work); the README's method x
family table is the generated one; ``python -m bench run`` works end to end for the tiny families."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.errors import IncompatibleMethodError
from bench.families import FAMILIES, adapter_for, markdown_table, readme_table
from methods import registry

ROOT = Path(__file__).resolve().parent.parent
TINY = [("tiny_llava_next_random", {"budget": "image"}, None), ("tiny_llava_next_random", {"budget": "tile"}, None),
        ("tiny_llava_next_random", {"budget": "base_grid"}, None), ("tiny_qwen25vl_random", {}, (168, 112))]  # merged 6 x 4: one VScan 4 x 4 window


def test_readme_table_is_the_generated_one():
    assert readme_table((ROOT / "README.md").read_text()) == markdown_table(), "regenerate it: python -m bench list families"


def test_table_covers_the_registry_and_refusals_carry_a_reason():
    from bench.families import support

    table = support()
    assert sorted(table) == registry.names()
    for name, row in table.items():
        assert set(row) == set(FAMILIES)
        assert all(c == "yes" or c.startswith("no: ") and len(c) > 10 or "=" in c for c in row.values()), (name, row)
    assert table["divprune"]["Qwen2.5-VL"] == "yes" and table["fastervlm"]["Qwen2.5-VL"].startswith("no: ")


def test_refusals_name_the_stage_that_is_missing():
    """An in-vision method is refused for its tower path, an in-LLM one for the LLM runner (not the other's reason)."""
    from bench.families import support

    table = support()
    for fam, name in (("LLaVA-NeXT", "tome"), ("Qwen2.5-VL", "tome")):
        assert "vision tower" in table[name][fam] and "in-LLM" not in table[name][fam], (name, fam, table[name][fam])
    assert table["flowcut"]["Qwen2.5-VL"] == "yes"  # its official FlowCut_Qwen port (tower cut + LLM layer-1 stage)
    assert table["flowcut"]["LLaVA-NeXT"] == "budget=tile"  # its official anyres code: int(target_num / 2) per tile, then layer 1
    for name in ("fastv", "pdrop", "sparsevlm", "dart", "transprune"):
        assert table[name]["LLaVA-NeXT"] == "budget=image", (name, table[name]["LLaVA-NeXT"])  # one budget per image
    assert table["vscan"]["LLaVA-NeXT"] == "budget=tile"  # its official per-tile P
    # Qwen2.5-VL: the in-LLM runner keeps original 3-D positions; stages that renumber them are refused
    assert table["fastv"]["Qwen2.5-VL"] == table["dart"]["Qwen2.5-VL"] == "yes"
    for name in ("pdrop", "sparsevlm", "transprune"):
        assert "renumbers positions" in table[name]["Qwen2.5-VL"], (name, table[name]["Qwen2.5-VL"])


@pytest.fixture(scope="module")
def tiny_adapters():
    return {(m, tuple(ov.items())): adapter_for(m, **ov).load() for m, ov, _ in TINY}


@pytest.mark.parametrize("method", registry.names())
@pytest.mark.parametrize("model,overrides,size", TINY, ids=["llava_next-image", "llava_next-tile", "llava_next-base_grid", "qwen25vl"])
def test_every_method_runs_or_is_refused(tiny_adapters, method, model, overrides, size):
    adapter = tiny_adapters[(model, tuple(overrides.items()))]
    m = registry.create(method, 0.0 if method == "none" else 0.5)
    try:
        adapter.check_method(m)
    except IncompatibleMethodError as e:
        assert len(str(e)) > 20 and method in str(e)
        return
    batch = adapter.probe_batch(batch_size=2, size=size)
    prepared = adapter.prepare(batch, m, torch.arange(2))
    assert prepared.visual_tokens_kept[0] <= prepared.visual_tokens_in[0]
    if method != "none" and m.stage != "in_llm":
        assert prepared.visual_tokens_kept[0] < prepared.visual_tokens_in[0]
    out = adapter.prefill(prepared, m)
    assert out.logits.shape[:2] == (2, 1) and torch.isfinite(out.logits).all()
    if m.stage == "in_llm":  # pruned inside the LLM: fewer tokens reach its last layer
        assert int(prepared.extras["visual_tokens_per_layer"][0, -1]) < prepared.visual_tokens_in[0]


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "bench", "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.integration
def test_cli_refuses_an_inapplicable_method_with_exit_2(tmp_path):
    r = bench("model=tiny_qwen25vl_random", "method=fastervlm", "ratio=0.5", "measure=efficiency", "device=cpu", f"results_dir={tmp_path}", "logger=none")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[CLS]" in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("record.json"))


@pytest.mark.integration
@pytest.mark.parametrize("model,method", [("tiny_qwen25vl_random", "divprune"), ("tiny_qwen25vl_random", "visionzip"),
                                          ("tiny_qwen25vl_random", "vscan"), ("tiny_llava_next_random", "random")])
def test_cli_efficiency_run_end_to_end(tmp_path, model, method):
    r = bench(f"model={model}", "model.weights=random", f"method={method}", "ratio=0.778", "measure=efficiency", "measure.warmup=0",
              "measure.repeats=1", "device=cpu", f"results_dir={tmp_path}", "logger=none")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rec_path,) = (tmp_path / "runs").glob("*/record.json")
    rec = json.loads(rec_path.read_text())
    eff = rec["efficiency"]
    assert rec["status"] == "completed" and rec["model"] == model and not rec["accuracy_measured"]
    assert rec["method_resolved"] == ({"port": "qwen25vl"} if method == "vscan" else {})
    assert eff["visual_tokens_kept"] < eff["visual_tokens_in"]
    # the analytic model equals the counter on the whole prepare + prefill (towers, merger/projector, selection, LLM)
    assert eff["tflops_prefill_analytic"] == pytest.approx(eff["tflops_prefill"], rel=1e-9)
    assert eff["latency"]["vision_encoder"]["median_ms"] > 0 and eff["latency"]["decode_step"]["median_ms"] > 0
