"""Aggregation is a pure function of records: tables, retention, reported gaps, Pareto fronts."""

from __future__ import annotations

import json

import pandas as pd

from bench.aggregate import COLUMNS, aggregate, leaderboard
from bench.report import pareto_front, reported_gap


def rec(method, ratio, score, tokens, run_id, bench="synthvqa", model="m", tflops=1.0, n=100, when="2026-01-01T00:00:00", limit=None, status="completed", scale=100):
    return {
        "status": status, "model": model, "method": method, "ratio": ratio, "benchmark": bench, "run_id": run_id,
        "primary_metric": "exact_match", "accuracy_measured": score is not None, "n_samples": n, "limit": limit,
        "metrics": {} if score is None else {"exact_match": {"value": score, "stderr": None, "higher_is_better": True}},
        "efficiency": {"visual_tokens_kept": tokens, "tflops_prefill": tflops, "prefill_ms": 10 * tflops, "kv_cache_bytes": 2**20, "device": "cpu"},
        "config": {"benchmark": {"report_scale": scale}}, "finished_at": when,
    }


RECORDS = [
    rec("none", 0.0, 0.9, 576, "a0", tflops=2.0),
    rec("random", 0.5, 0.72, 288, "a1", tflops=1.0),
    rec("pool", 0.5, 0.81, 288, "a2", tflops=1.0),
    rec("pool", 0.5, 0.10, 288, "a3", tflops=1.0, when="2027-01-01", limit=10, n=10),  # a limited run must not win
    rec("random", 0.75, None, 144, "a4", tflops=0.5),  # efficiency-only
    rec("random", 0.9, 0.5, 58, "a5", status="failed"),
]


def test_leaderboard_rows_retention_and_order():
    df = leaderboard(RECORDS)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 4  # failed dropped, duplicate key resolved
    pool = df[df["method"] == "pool"].iloc[0]
    assert pool["run_id"] == "a2" and abs(pool["retention_pct"] - 90.0) < 1e-9
    assert df.iloc[0]["method"] == "none"  # ranked by score
    eff_only = df[df["run_id"] == "a4"].iloc[0]
    assert pd.isna(eff_only["score"]) and pd.isna(eff_only["retention_pct"])


def test_retention_uses_the_baseline_on_the_same_samples():
    recs = [rec("none", 0.0, 0.9, 576, "c0", n=1000), rec("none", 0.0, 0.8, 576, "c1", n=200, limit=200), rec("pool", 0.5, 0.6, 288, "c2", n=200, limit=200)]
    df = leaderboard(recs)
    assert df[df["method"] == "none"].iloc[0]["run_id"] == "c0"  # the full split is shown
    assert abs(df[df["method"] == "pool"].iloc[0]["retention_pct"] - 75.0) < 1e-9  # vs the 200-sample baseline


def test_leaderboard_is_pure_and_order_independent():
    a = leaderboard(RECORDS).to_csv(index=False)
    b = leaderboard(list(reversed(RECORDS))).to_csv(index=False)
    assert a == b


def test_aggregate_writes_reports_deterministically(tmp_path):
    for r in RECORDS:
        d = tmp_path / "runs" / r["run_id"]
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(r))
    (tmp_path / "runs" / "corrupt").mkdir()
    (tmp_path / "runs" / "corrupt" / "record.json").write_text("{not json")
    aggregate(tmp_path, quiet=True)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".csv", ".md")}
    assert (tmp_path / "leaderboard.csv") in files and (tmp_path / "tables" / "m.md") in files
    assert list((tmp_path / "plots").glob("m__synthvqa__tflops.png"))
    table = (tmp_path / "tables" / "m.md").read_text()
    assert "| 576 | none |" in table and "| 288 | pool | 81.0 | 90.0 |" in table
    aggregate(tmp_path, quiet=True)
    assert files == {p: p.read_bytes() for p in files}, "aggregate must regenerate tables byte for byte"


def test_reported_gap_matches_on_tokens_and_units():
    df = leaderboard([dict(rec("none", 0.0, 0.62, 576, "b0", bench="gqa", model="llava15_7b"))]).assign(report_scale=100.0)
    ref = pd.DataFrame([{"source": "S", "model": "llava15_7b", "method": "none", "visual_tokens": 576, "benchmark": "gqa", "score": 61.9, "note": ""}])
    gap = reported_gap(df, ref)
    assert len(gap) == 1 and abs(gap.loc[0, "gap"] - 0.1) < 1e-9 and gap.loc[0, "measured"] == 62.0


def test_pareto_front():
    pts = [(1.0, 50), (2.0, 60), (2.0, 55), (3.0, 58), (0.5, 40), (4.0, 70)]
    assert pareto_front(pts) == [(0.5, 40), (1.0, 50), (2.0, 60), (4.0, 70)]


def brec(method, ratio, score, run_id, mode, target, measure, measured, met, layer_mean, bench="gqa", model="llava15_7b"):
    r = rec(method, ratio, score, measured, run_id, bench=bench, model=model)
    r["efficiency"].update({"visual_tokens_layer_mean": layer_mean, "budget_mode": mode, "budget_tokens": target,
                            "budget_measure": measure, "budget_measured": measured, "budget_met": met})
    return r


def test_rows_sit_under_a_budget_they_met_else_under_their_measured_count():
    """DART's official "192" keeps 196 (budget_met false): its row sits under 196, never under 192; FastV's
    official 192 (192 after layer 2) sits under 192; a layer_mean run of the same method and ratio is its own
    row; the published comparison matches official runs by the budget they asked for, not layer_mean runs."""
    from bench.aggregate import leaderboard_full
    from bench.report import paper_table

    recs = [
        brec("none", 0.0, 0.62, "n0", "pre_llm_exact", 576, "kept", 576, True, 576),
        brec("dart", 1 - 192 / 576, 0.60, "d0", "official", 192, "after_prune", 196.0, False, 219.75),
        brec("fastv", 1 - 192 / 576, 0.55, "f0", "official", 192, "after_prune", 192.0, True, 216.0),
        brec("fastv", 1 - 192 / 576, 0.50, "f1", "layer_mean", 192, "layer_mean", 191.625, True, 191.625),
    ]
    df = leaderboard_full(recs)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS) and {"budget", "budget_mode", "budget_met"} <= set(COLUMNS)
    row = {(r["method"], r["budget_mode"]): r for _, r in df.iterrows()}
    assert row[("dart", "official")]["budget"] == 196.0 and not row[("dart", "official")]["budget_met"]
    assert row[("fastv", "official")]["budget"] == 192.0 and row[("fastv", "layer_mean")]["budget"] == 192.0
    assert len(df[df["method"] == "fastv"]) == 2
    table = paper_table(df, "llava15_7b")
    assert "| 196 | dart |" in table and "| 192 | fastv |" in table and "| 192 | fastv [layer_mean] |" in table
    assert "| 192 | dart |" not in table
    ref = pd.DataFrame([{"source": "S", "model": "llava15_7b", "method": m, "visual_tokens": 192, "benchmark": "gqa", "score": s, "note": ""}
                        for m, s in (("dart", 60.0), ("fastv", 52.7))])
    gap = reported_gap(df, ref)
    assert sorted(zip(gap["method"], gap["budget_mode"])) == [("dart", "official"), ("fastv", "official")]
    d = gap[gap["method"] == "dart"].iloc[0]
    assert d["budget"] == 192 and not d["budget_met"] and d["visual_tokens"] == 219.8 and d["gap"] == 0.0
