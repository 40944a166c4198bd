"""The leaderboard's uncertainty columns, computed from each run's ``samples.jsonl``.

Intervals and tests use the per-document scores of the primary metric, never a record's ``stderr``
(which lmms-eval computes per metric with its own conventions): the same numbers go into the CSVs,
the markdown tables, the site and W&B. A score that is not the mean of its per-document scores (MME's
sum of category scores, POPE's F1) gets no interval; ``ci_method`` says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import stats

#: column -> meaning (appended to the leaderboard's columns in every CSV)
STAT_COLUMNS: dict[str, str] = {
    "score_ci_low": "lower end of the 95% confidence interval of score (from samples.jsonl)",
    "score_ci_high": "upper end of that interval",
    "ci_method": "wilson (0/1 scores) or bootstrap (percentile, 2000 resamples); 'none: <reason>' when no interval",
    "rank": "1 + rows of the same model and benchmark whose interval lies entirely above this row's (overlapping intervals tie)",
    "delta_vs_baseline": "score minus method=none's score on the same documents (the baseline of retention_pct)",
    "p_vs_baseline": "two-sided p of that difference: McNemar exact (0/1 scores) or paired bootstrap",
    "sig_vs_baseline": "p_vs_baseline < 0.05 (not corrected for multiple comparisons)",
    "neighbour_run_id": "run id of the row ranked directly above (same model and benchmark, by score)",
    "delta_vs_neighbour": "score minus the neighbour's score on the documents both answered",
    "p_vs_neighbour": "two-sided p of that difference (same tests)",
    "sig_vs_neighbour": "p_vs_neighbour < 0.05",
    "paired_test": "the test behind the p columns: mcnemar_exact or paired_bootstrap",
}


def read_scores(results_dir: str | Path, record: dict[str, Any]) -> dict[Any, float] | str:
    """``doc_id -> score`` of the record's primary metric, or the reason there are none."""
    path = Path(results_dir) / "runs" / record["run_id"] / "samples.jsonl"
    metric = record.get("primary_metric")
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "no samples.jsonl"
    except OSError as e:
        return f"unreadable samples.jsonl ({e.__class__.__name__})"
    out: dict[Any, float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return "corrupt samples.jsonl"
        v = row.get(metric)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            return f"samples.jsonl has no numeric per-document {metric}"
        out[row.get("doc_id")] = float(v)
    if not out:
        return "empty samples.jsonl"
    value = ((record.get("metrics") or {}).get(metric) or {}).get("value")
    mean = float(np.mean(list(out.values())))
    if value is None or abs(mean - float(value)) > 1e-9 + 1e-6 * abs(float(value)):
        return f"{metric} is not the mean of its per-document scores"
    return out


def _baselines(records: list[dict[str, Any]]) -> dict[tuple, str]:
    """(model, benchmark, n_samples) -> run id of the method=none record retention_pct divides by."""
    base = [r for r in records if r and r.get("status") == "completed" and r.get("method") == "none" and ((r.get("metrics") or {}).get(r.get("primary_metric")) or {}).get("value") is not None]
    out = {}
    for r in sorted(base, key=lambda r: (r.get("finished_at") or "", r["run_id"])):
        out[(r["model"], r["benchmark"], r.get("n_samples"))] = r["run_id"]
    return out


def _paired(a: dict[Any, float], b: dict[Any, float]) -> tuple[float, float, str] | None:
    common = sorted(set(a) & set(b), key=lambda k: (str(type(k)), k))
    if not common:
        return None
    return stats.paired_test([a[k] for k in common], [b[k] for k in common])


def with_uncertainty(full: pd.DataFrame, records: list[dict[str, Any]], results_dir: str | Path) -> pd.DataFrame:
    """``full`` (the leaderboard, rows ranked by score within model x benchmark) plus :data:`STAT_COLUMNS`."""
    df = full.copy()
    for c in STAT_COLUMNS:
        df[c] = pd.Series([None] * len(df), index=df.index, dtype=object)
    by_id = {r["run_id"]: r for r in records if r and "run_id" in r}
    scores: dict[str, dict[Any, float] | str] = {}

    def scores_of(rid: str):
        if rid not in scores:
            scores[rid] = read_scores(results_dir, by_id[rid]) if rid in by_id else "no record"
        return scores[rid]

    base = _baselines(records)
    for i, row in df.iterrows():
        if pd.isna(row["score"]):
            continue
        s = scores_of(row["run_id"])
        if isinstance(s, str):
            df.at[i, "ci_method"] = f"none: {s}"
            continue
        lo, hi, how = stats.score_interval(list(s.values()))
        df.at[i, "score_ci_low"], df.at[i, "score_ci_high"], df.at[i, "ci_method"] = round(lo, 6), round(hi, 6), how
        brid = base.get((row["model"], row["benchmark"], row["n_samples"]))
        if brid is not None and brid != row["run_id"] and isinstance(scores_of(brid), dict):
            t = _paired(s, scores_of(brid))
            if t is not None:
                df.at[i, "delta_vs_baseline"], df.at[i, "p_vs_baseline"], df.at[i, "paired_test"] = round(t[0], 6), _p(t[1]), t[2]
                df.at[i, "sig_vs_baseline"] = bool(t[1] < stats.ALPHA)
    for _, g in df[df["score"].notna()].groupby(["model", "benchmark"], sort=False):
        idx = list(g.index)
        hib = _higher_is_better(by_id.get(g.at[idx[0], "run_id"]) or {})
        lo = [g.at[j, "score_ci_low"] if g.at[j, "score_ci_low"] is not None else g.at[j, "score"] for j in idx]
        hi = [g.at[j, "score_ci_high"] if g.at[j, "score_ci_high"] is not None else g.at[j, "score"] for j in idx]
        for j, rk in zip(idx, stats.tied_ranks(lo, hi, hib)):
            df.at[j, "rank"] = rk
        for above, j in zip(idx, idx[1:]):
            df.at[j, "neighbour_run_id"] = df.at[above, "run_id"]
            a, b = scores_of(df.at[j, "run_id"]), scores_of(df.at[above, "run_id"])
            if isinstance(a, dict) and isinstance(b, dict):
                t = _paired(a, b)
                if t is not None:
                    df.at[j, "delta_vs_neighbour"], df.at[j, "p_vs_neighbour"] = round(t[0], 6), _p(t[1])
                    df.at[j, "sig_vs_neighbour"] = bool(t[1] < stats.ALPHA)
                    df.at[j, "paired_test"] = t[2]
    return df


def _higher_is_better(record: dict[str, Any]) -> bool:
    m = (record.get("metrics") or {}).get(record.get("primary_metric")) or {}
    return bool(m.get("higher_is_better", True))


def _p(p: float) -> float:
    return float(f"{p:.4g}")
