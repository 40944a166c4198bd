"""End to end through the CLI, lmms-eval and a tiny random-weight LLaVA on SynthVQA (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def bench(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*/record.json"))]


def predictions(results: Path, run_id: str) -> list[tuple]:
    rows = [json.loads(line) for line in (results / "runs" / run_id / "samples.jsonl").read_text().splitlines()]
    return sorted((r["doc_id"], r["prediction"]) for r in rows)


@pytest.fixture(scope="module")
def ratio0_runs(tiny_model_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("e2e") / "results"
    common = [f"model.source={tiny_model_dir}", "model.sha256=null", "benchmark.limit=24", "benchmark.batch_size=4", f"results_dir={results}", "logger=none", "measure.repeats=2"]
    r = bench("run", "-m", "method=none,random,pool", "ratio=0", *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results, common


def test_records_follow_the_schema(ratio0_runs):
    results, _ = ratio0_runs
    recs = records(results)
    assert len(recs) == 3 and all(r["status"] == "completed" for r in recs)
    r = recs[0]
    for key in ("schema_version", "run_id", "model", "method", "ratio", "benchmark", "seed", "metrics", "efficiency", "provenance", "config", "notes"):
        assert key in r
    m = r["metrics"]["exact_match"]
    assert 0.0 <= m["value"] <= 1.0 and m["higher_is_better"] is True
    e = r["efficiency"]
    assert e["visual_tokens_in"] == 576 and e["visual_tokens_kept"] == 576
    assert (e["budget_mode"], e["budget_tokens"], e["budget_measure"], e["budget_met"]) == ("pre_llm_exact", 576, "kept", True)
    assert r["method_deviations"] == [] and r["method_resolved"] == {} and isinstance(e["paper_convention_text_tokens"], float)
    assert len(e["visual_tokens_per_layer"]) == 2 and e["tflops_prefill"] > 0 and e["prefill_ms"] > 0
    assert e["kv_cache_bytes"] == sum(e["kv_cache_bytes_per_layer"]) > 0
    assert e["peak_mem_bytes"] is None and any("peak_mem_bytes" in n for n in r["notes"])  # CPU: not measured, and said so
    p = r["provenance"]
    assert p["versions"]["lmms_eval"] and p["batch_size"] == 4 and p["attn_implementation"] == "sdpa"
    assert r["n_samples"] == 24
    for f in ("config.yaml", "samples.jsonl"):
        assert (results / "runs" / r["run_id"] / f).exists()


def test_ratio_zero_gives_exactly_the_unpruned_predictions(ratio0_runs):
    results, _ = ratio0_runs
    by_method = {r["method"]: r for r in records(results)}
    base = predictions(results, by_method["none"]["run_id"])
    assert len(base) == 24
    for m in ("random", "pool"):
        assert predictions(results, by_method[m]["run_id"]) == base
        assert by_method[m]["metrics"]["exact_match"]["value"] == by_method["none"]["metrics"]["exact_match"]["value"]


def test_leaderboard_rows_and_rerun_is_skipped(ratio0_runs):
    results, common = ratio0_runs
    lb = (results / "leaderboard.csv").read_text().splitlines()
    assert lb[0].startswith("model,method,ratio,visual_tokens,benchmark,metric,score,retention_pct")
    assert len(lb) == 4
    before = {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("record.json")}
    r = bench("run", "method=none", *common)
    assert r.returncode == 0 and "skip" in r.stdout
    assert before == {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("record.json")}


def test_pruned_run_records_kept_tokens(tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    r = bench("run", "method=random", "ratio=0.75", f"model.source={tiny_model_dir}", "model.sha256=null", "benchmark.limit=8", f"results_dir={results}", "logger=none", "measure.repeats=2")
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = records(results)
    assert rec["efficiency"]["visual_tokens_kept"] == 144 and rec["ratio"] == 0.75
    assert rec["efficiency"]["visual_tokens_per_layer"] == [144, 144]


def test_wandb_offline_run_is_written_and_readable(tiny_model_dir, tmp_path):
    from bench.wandb_sink import read_offline_run

    results, wdir = tmp_path / "results", tmp_path / "wb"
    secret = "tp-secret-api-key-0123456789"
    r = bench("run", "method=pool", "ratio=0.5", f"model.source={tiny_model_dir}", "model.sha256=null", "benchmark.limit=8", f"results_dir={results}", "logger=wandb", f"logger.dir={wdir}", "measure.repeats=2", env={"WANDB_API_KEY": secret})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((wdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = read_offline_run(runs[0])
    (rec,) = records(results)
    assert data["summary"]["run_id"] == rec["run_id"]
    assert data["summary"]["metrics/exact_match"] == rec["metrics"]["exact_match"]["value"]
    assert data["summary"]["efficiency/visual_tokens_kept"] == 288  # 576 pooled to 18x16
    assert data["config"]["method"]["name"] == "pool" and data["config"]["ratio"] == 0.5
    assert data["group"] == "single-runs"
    # the key never lands in records, configs or W&B files
    for p in [*results.rglob("*"), *wdir.rglob("*")]:
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
    # aggregate logs the leaderboard and plots to a summary run
    r = bench("aggregate", "--results-dir", str(results), "--wandb", "offline", "--wandb-dir", str(wdir), "--wandb-group", "t")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((wdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    summ = [read_offline_run(p) for p in runs]
    keys = [k for s in summ for k in s["summary"]]
    assert "table/leaderboard/_type" in keys and any(k.startswith("plot/") for k in keys)


def test_efficiency_only_run_with_random_weights(tiny_model_dir, tmp_path):
    """`model.weights=random measure=efficiency`: no dataset, no accuracy, every efficiency field set."""
    results = tmp_path / "results"
    r = bench("run", f"model.source={tiny_model_dir}", "model.weights=random", "measure=efficiency", "method=pool", "ratio=0.75", "measure.repeats=2", "measure.warmup=1", f"results_dir={results}", "logger=none", "device=cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = records(results)
    assert rec["accuracy_measured"] is False and rec["metrics"] == {} and rec["n_samples"] is None
    assert any("random weights" in n or "efficiency-only" in n for n in rec["notes"])
    e = rec["efficiency"]
    assert e["visual_tokens_kept"] == 144 and e["tflops_prefill"] > 0
    assert abs(e["tflops_prefill"] - e["tflops_prefill_analytic_no_selection"]) <= 0.01 * e["tflops_prefill"]
    for stage in ("vision_encoder", "selection", "prefill_eager", "decode_step"):
        assert e["latency"][stage]["median_ms"] > 0, stage
    assert e["latency"]["prefill_graph"]["median_ms"] is None and any("CUDA graphs need a GPU" in n for n in rec["notes"])
    assert rec["provenance"]["model_fingerprint"] == "random-init"
    lb = (results / "leaderboard.csv").read_text().splitlines()
    assert len(lb) == 2 and ",pool,0.75,144.0,synthvqa,exact_match,," in lb[1]
