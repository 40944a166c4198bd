"""Leaderboard: a pure function of the run records (``results/runs/*/record.json``).

``results/leaderboard.csv`` has one row per (model, method, ratio, benchmark, data); columns are documented
in :data:`COLUMNS`. When several records share a key (other seeds, limits, batch sizes), the row
comes from the record that measured accuracy on the full split, then the newest, then the largest
run id, so the choice is deterministic.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from bench.records import atomic_write_text, iter_records
from bench.uncertainty import STAT_COLUMNS, with_uncertainty

#: column -> meaning
COLUMNS: dict[str, str] = {
    "model": "model config name",
    "method": "method config name",
    "ratio": "nominal fraction of visual tokens removed",
    "visual_tokens": "measured visual tokens per sample, averaged over the LLM's layers (= tokens kept for pre-LLM methods)",
    "benchmark": "benchmark config name",
    "metric": "primary metric of the benchmark",
    "score": "value of the primary metric (null for efficiency-only runs)",
    "retention_pct": "score / score of method=none on the same model, benchmark and number of samples x 100",
    "budget": "the visual-token budget the row stands for: B = round(N(1 - ratio)) where the run met it, else the count it "
    "measured (budget_met false; a row is never shown under a budget it missed)",
    "budget_mode": "how the budget is counted: pre_llm_exact (exactly B tokens reach the LLM), official (the method's published "
    "schedule for B), layer_mean (mean over the LLM's layers = B: equal LLM compute), after_prune (B after the first pruning "
    "layer), adaptive (the method's own count); 'unrecorded' for records older than the field",
    "budget_met": "whether the count the budget names (kept tokens, the layer mean, or the count after the first pruning "
    "stage: the record's budget_measure) is within one token of B; empty for records older than the field",
    "tflops_prefill": "measured TFLOPs of one sample's vision encoder + selection + LLM prefill",
    "prefill_ms": "median time of that prefill (see `device` and the record's `timer`)",
    "kv_cache_mb": "KV-cache size after one sample's prefill, MiB, read from the cache tensors",
    "device": "where efficiency was measured",
    "n_samples": "samples evaluated (smaller than the split when benchmark.limit was set)",
    "data": "where the data came from: generated (SynthVQA), hub (the task's hub dataset or its cache), local (benchmark.dataset_path)",
    "data_items": "rows of the evaluated split before benchmark.limit (a local copy may be a subset of the benchmark)",
    "run_id": "run id (results/runs/<run_id>/record.json)",
    "env": "digest of the installed Python distributions the row was measured under (provenance.env_digest; "
    "'unrecorded' for records older than that field): rows of one model and benchmark with different values "
    "were measured under different environments",
}


def leaderboard(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Build the leaderboard table from records (pure: same records, same table)."""
    return leaderboard_full(records)[list(COLUMNS)]


def leaderboard_full(records: list[dict[str, Any]]) -> pd.DataFrame:
    """:func:`leaderboard` plus ``report_scale`` (multiplier to the units papers report)."""
    rows = []
    for r in records:
        if not r or r.get("status") != "completed":
            continue
        metric = r.get("primary_metric")
        mval = (r.get("metrics") or {}).get(metric) or {}
        eff = r.get("efficiency") or {}
        kv = eff.get("kv_cache_bytes")
        data = r.get("data") or {}
        prov = r.get("provenance") or {}
        rows.append(
            {
                "model": r["model"],
                "method": r["method"],
                "ratio": float(r["ratio"]),
                "visual_tokens": _tokens(eff),
                **_budget(eff),
                "benchmark": r["benchmark"],
                "metric": metric,
                "score": mval.get("value"),
                "retention_pct": None,
                "tflops_prefill": None if eff.get("tflops_prefill") is None else round(float(eff["tflops_prefill"]), 6),
                "prefill_ms": None if eff.get("prefill_ms") is None else round(float(eff["prefill_ms"]), 3),
                "kv_cache_mb": None if kv is None else round(kv / 2**20, 4),
                "device": eff.get("device"),
                "n_samples": r.get("n_samples"),
                "data": data.get("origin") or _origin(prov.get("benchmark_fingerprint")),
                "data_items": data.get("n_items") if data else (r.get("n_samples") if r.get("limit") is None else None),
                "run_id": r["run_id"],
                "env": ((r.get("provenance") or {}).get("env_digest") or "unrecorded")[:8],
                "_acc": bool(r.get("accuracy_measured")),
                "_full": r.get("limit") is None,
                # per-sample efficiency columns come from a batch-1 measurement when there is one
                "_b1": eff.get("measured_batch_size") in (None, 1),
                "_hib": bool(mval.get("higher_is_better", True)),
                "report_scale": float(((r.get("config") or {}).get("benchmark") or {}).get("report_scale", 1)),
                "_when": r.get("finished_at") or "",
                # rows of other data (a local copy, another revision) never replace or baseline each other
                "_data": data.get("identity") or prov.get("benchmark_fingerprint") or "",
            }
        )
    if not rows:
        return pd.DataFrame(columns=[*COLUMNS, *EXTRA])
    df = pd.DataFrame(rows)
    # baselines: every completed `none` record with a score, by (model, benchmark, n_samples), so a
    # subset run is compared with the unpruned run on the same subset (newest wins on ties)
    base: dict[tuple, float] = {}
    for _, b in df[(df["method"] == "none") & df["score"].notna()].sort_values(["_when", "run_id"]).iterrows():
        base[(b["model"], b["benchmark"], b["_data"], b["n_samples"])] = b["score"]
    # one row per configuration: the budget mode is part of it (an official and a layer_mean run are two rows)
    df = df.sort_values(["_acc", "_full", "_b1", "_when", "run_id"]).groupby(["model", "method", "ratio", "budget_mode", "benchmark", "_data"], as_index=False).tail(1)
    ret = []
    for _, row in df.iterrows():
        b = base.get((row["model"], row["benchmark"], row["_data"], row["n_samples"]))
        ok = b is not None and b != 0 and pd.notna(row["score"])
        ret.append(round(100.0 * row["score"] / b, 2) if ok else None)
    df["retention_pct"] = ret
    df["_rank"] = df.apply(lambda r: -r["score"] if (r["_hib"] and pd.notna(r["score"])) else (r["score"] if pd.notna(r["score"]) else float("inf")), axis=1)
    df = df.sort_values(["model", "benchmark", "_rank", "method", "ratio"], kind="mergesort")
    return df[[*COLUMNS, *EXTRA]].reset_index(drop=True)


#: columns of :func:`leaderboard_full` beyond :data:`COLUMNS`: the multiplier to the units papers report and
#: the budget the run asked for (what published tables label their official configurations by)
EXTRA = ["report_scale", "budget_requested"]


def _budget(eff: dict[str, Any]) -> dict[str, Any]:
    """``budget`` (B if met, else the measured count), ``budget_mode``, ``budget_met``, ``budget_requested``."""
    met, target, got = eff.get("budget_met"), eff.get("budget_tokens"), eff.get("budget_measured")
    if target is None:  # a record older than the budget fields: only the measured count is known
        return {"budget": _tokens(eff), "budget_mode": eff.get("budget_mode") or "unrecorded", "budget_met": None, "budget_requested": None}
    shown = float(target) if met else (None if got is None else round(float(got), 1))
    return {"budget": shown, "budget_mode": eff.get("budget_mode") or "unrecorded", "budget_met": met, "budget_requested": int(target)}


def _origin(fingerprint: str | None) -> str | None:
    """``data`` of a record written before records carried it (issue 26)."""
    if not fingerprint:
        return None
    return "generated" if fingerprint.startswith("synthvqa-gen") else "hub"


def _tokens(eff: dict[str, Any]) -> float | None:
    v = eff.get("visual_tokens_layer_mean")
    if v is None:
        v = eff.get("visual_tokens_kept")
    return None if v is None else round(float(v), 1)


def aggregate(results_dir: str | Path = "results", quiet: bool = False, reports: bool = True, wandb: dict[str, Any] | None = None,
              site: bool = True, kept: bool | list[str] = True) -> pd.DataFrame:
    """Rebuild ``<results_dir>/leaderboard.csv`` (and, with ``reports``, tables and plots; with ``site``, the
    static site ``<results_dir>/site/``, kept-token pictures per ``kept``: every method, none, or a list).

    The CSV carries :data:`COLUMNS` plus the uncertainty columns of :data:`bench.uncertainty.STAT_COLUMNS`.
    ``wandb``: a logger config (``conf/logger/wandb.yaml`` keys) to also log the leaderboard as W&B
    Tables, the plots, the site's figures and the kept-token pictures to one summary run.
    """
    results_dir = Path(results_dir)
    pairs = iter_records(results_dir)
    bad = [str(p) for p, r in pairs if r is None]
    for p in bad:
        print(f"[bench] warning: unreadable record skipped: {p}")
    records = [r for _, r in pairs if r is not None]
    full = with_uncertainty(leaderboard_full(records), records, results_dir)
    df = full[[*COLUMNS, *STAT_COLUMNS]]
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_text(results_dir / "leaderboard.csv", buf.getvalue())
    written: dict[str, list[Path]] = {"tables": [], "plots": []}
    if reports and not full.empty:
        from bench.report import write_reports

        written = write_reports(full, results_dir)
    built = None
    if site:
        from bench.site.build import build_site

        built = build_site(full, records, results_dir, kept=kept)
    if wandb:
        from bench.wandb_sink import log_summary

        tables = {"leaderboard": df}
        tables.update({p.stem: pd.read_csv(p) for p in written["tables"] if p.suffix == ".csv"})
        log_summary(tables, written["plots"], wandb, group=wandb.get("group"),
                    figures=built.figures if built else None, images=built.pictures if built else None)
    if not quiet:
        print(format_table(df))
        for line in mixed_environments(df):
            print(f"[bench] note: {line}")
        print(f"\n[bench] {len(df)} rows from {len(pairs)} records -> {results_dir / 'leaderboard.csv'}")
        if written["tables"] or written["plots"]:
            print(f"[bench] {len(written['tables'])} tables under {results_dir}/leaderboards and {results_dir}/tables, {len(written['plots'])} plots under {results_dir}/plots")
        if built:
            print(f"[bench] site: {len(built.files)} files -> {results_dir / 'site' / 'index.html'} (open it from the file system, no server needed)")
    return df


def mixed_environments(df: pd.DataFrame) -> list[str]:
    """One line per model x benchmark whose rows were measured under more than one environment."""
    out = []
    for (model, bench), g in df.groupby(["model", "benchmark"], sort=True):
        envs = sorted(set(g["env"]))
        if len(envs) > 1:
            counts = ", ".join(f"{e} ({int((g['env'] == e).sum())} rows)" for e in envs)
            out.append(f"{model} / {bench}: rows measured under {len(envs)} environments: {counts} (column env)")
    return out


def format_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no completed runs yet: python -m bench run)"
    show = df[[c for c in [*COLUMNS, "score_ci_low", "score_ci_high", "rank"] if c in df]]
    show = show.drop(columns=["run_id", "env"] if show["env"].nunique() <= 1 else ["run_id"]).copy()
    return show.to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.4g}")
