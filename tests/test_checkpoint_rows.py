"""Leaderboard rows are keyed by the model AND its weights (issue 28): another checkpoint under the same
model name never replaces a row nor serves as another checkpoint's baseline; the record says when
pickled weights were opted in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.aggregate import aggregate, leaderboard, split_checkpoints_notes

ROOT = Path(__file__).resolve().parent.parent


def rec(method, score, run_id, weights, ratio=0.0, when="2026-01-01T00:00:00", model="tiny_llava_synth"):
    return {
        "status": "completed", "model": model, "method": method, "ratio": ratio, "benchmark": "synthvqa", "run_id": run_id,
        "primary_metric": "exact_match", "accuracy_measured": True, "n_samples": 100, "limit": None,
        "metrics": {"exact_match": {"value": score, "stderr": None, "higher_is_better": True}},
        "efficiency": {"visual_tokens_kept": 576 * (1 - ratio), "tflops_prefill": 1.0 - ratio, "prefill_ms": 10.0, "kv_cache_bytes": 2**20, "device": "cpu"},
        "provenance": {"model_fingerprint": weights}, "config": {"benchmark": {"report_scale": 100}}, "finished_at": when,
    }


def test_one_checkpoint_keeps_the_plain_model_name():
    df = leaderboard([rec("none", 0.9, "a0", "dde558d9c6e263d4"), rec("pool", 0.45, "a1", "dde558d9c6e263d4", ratio=0.5)])
    assert set(df["model"]) == {"tiny_llava_synth"} and set(df["weights"]) == {"dde558d9c6e263d4"}
    assert df[df["method"] == "pool"].iloc[0]["retention_pct"] == 50.0
    assert split_checkpoints_notes(df) == []


def test_a_different_checkpoint_never_replaces_a_row():
    """The issue's case: a corrupted copy of the tiny model run later under the same name scores 0.0; it used
    to replace the `tiny_llava_synth / none` row. Now both rows stay, each labelled by its weights, and
    each pruned row is retained against the baseline of its own weights."""
    good, bad = "dde558d9c6e263d4", "0badc0ffee000000"
    recs = [
        rec("none", 1.0, "g0", good),
        rec("pool", 0.8, "g1", good, ratio=0.5),
        rec("none", 0.0, "b0", bad, when="2026-06-01T00:00:00"),  # newer: it would have won the old grouping
        rec("pool", 0.4, "b1", bad, ratio=0.5, when="2026-06-01T00:00:00"),
    ]
    df = leaderboard(recs)
    assert len(df) == 4
    rows = {(r["model"], r["method"]): r for _, r in df.iterrows()}
    assert rows[("tiny_llava_synth@dde558d9", "none")]["run_id"] == "g0"
    assert rows[("tiny_llava_synth@0badc0ff", "none")]["run_id"] == "b0"
    assert rows[("tiny_llava_synth@dde558d9", "pool")]["retention_pct"] == 80.0
    assert rows[("tiny_llava_synth@0badc0ff", "pool")]["retention_pct"] is None or pd_isna(rows[("tiny_llava_synth@0badc0ff", "pool")]["retention_pct"])
    notes = split_checkpoints_notes(df)
    assert len(notes) == 1 and "2 different weights" in notes[0] and "tiny_llava_synth@dde558d9" in notes[0]


def pd_isna(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


def test_aggregate_keeps_checkpoints_apart_in_tables_and_plots(tmp_path, capsys):
    recs = [rec("none", 1.0, "g0", "aaaaaaaa11111111"), rec("none", 0.5, "b0", "bbbbbbbb22222222"), rec("pool", 0.4, "b1", "bbbbbbbb22222222", ratio=0.5)]
    for r in recs:
        (tmp_path / "runs" / r["run_id"]).mkdir(parents=True)
        (tmp_path / "runs" / r["run_id"] / "record.json").write_text(json.dumps(r))
    aggregate(tmp_path, site=False)
    out = capsys.readouterr().out
    assert "note: model tiny_llava_synth: rows from 2 different weights" in out
    assert (tmp_path / "tables" / "tiny_llava_synth@aaaaaaaa.md").exists() and (tmp_path / "tables" / "tiny_llava_synth@bbbbbbbb.md").exists()
    lb = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert lb[0].split(",").count("weights") == 1 and len(lb) == 4


def adapter(source: Path, **kw):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.models.llava import LlavaAdapter

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        m = OmegaConf.to_container(compose("config", overrides=["device=cpu"]), resolve=True)["model"]
    m.update(source=str(source), **kw)
    m.pop("_target_")
    return LlavaAdapter(**m)


def test_record_provenance_says_which_weight_format_loaded(tmp_path):
    import torch
    from safetensors.torch import load_file

    from bench.models.llava import ASSETS
    from bench.provenance import provenance

    d = tmp_path / "pickled"
    shutil.copytree(ASSETS / "tiny-llava-synth", d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    a = adapter(d, sha256={}, allow_pickle_weights=True)
    cfg = {"benchmark": {"batch_size": 1}, "model": {"allow_pickle_weights": True}}
    prov = provenance(cfg, a, {"model": a.fingerprint(), "benchmark": "x"})
    assert prov["weights_format"] == "pickle" and prov["pickle_weights_allowed"] is True
    safe = adapter(ASSETS / "tiny-llava-synth")
    prov = provenance({"benchmark": {"batch_size": 1}, "model": {}}, safe, {"model": safe.fingerprint(), "benchmark": "x"})
    assert prov["weights_format"] == "safetensors" and prov["pickle_weights_allowed"] is False


@pytest.mark.slow
def test_a_pickle_run_says_so_in_its_record(tmp_path):
    import torch
    from safetensors.torch import load_file

    from bench.models.llava import ASSETS

    d = tmp_path / "pickled"
    shutil.copytree(ASSETS / "tiny-llava-synth", d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    results = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "bench", "run", f"model.source={d}", "model.sha256=null", "model.allow_pickle_weights=true",
                        "benchmark.limit=2", "measure=quick", "logger=none", f"results_dir={results}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (results / "runs").glob("*/record.json")]
    assert record["provenance"]["weights_format"] == "pickle" and record["provenance"]["pickle_weights_allowed"] is True
    assert any("allow_pickle_weights=true" in n for n in record["notes"])
