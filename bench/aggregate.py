"""Leaderboard: a pure function of the run records (``results/runs/*/record.json``).

``results/leaderboard.csv`` has one row per (model, weights, method, ratio, benchmark, data); its columns are
documented in :data:`bench.schema.LEADERBOARD_COLUMNS`. When several records share a key (other seeds,
limits, batch sizes), the row comes from the record that measured accuracy on the full split, then the
newest, then the largest run id, so the choice is deterministic.

Rows are keyed by the model's *weights* (``provenance.model_fingerprint``), not only its config name: a run
of another checkpoint under the same name (``model.source=<a copy>``, retrained weights) never replaces a
row nor serves as another checkpoint's baseline. Where one model name has rows of several weights, each
shows as ``<model>@<weights[:8]>`` so that tables and plots keep them apart too.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from bench.records import atomic_write_text, iter_records
from bench.schema import LEADERBOARD_COLUMNS as COLUMNS
from bench.uncertainty import STAT_COLUMNS, with_uncertainty

log = logging.getLogger("bench")


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
                "prefill_ms_iqr": None if eff.get("prefill_ms_iqr") is None else round(float(eff["prefill_ms_iqr"]), 3),
                "host_load": eff.get("host_load"),
                "kv_cache_mb": None if kv is None else round(kv / 2**20, 4),
                "device": eff.get("device"),
                "n_samples": r.get("n_samples"),
                "data": data.get("origin") or _origin(prov.get("benchmark_fingerprint")),
                "data_items": data.get("n_items") if data else (r.get("n_samples") if r.get("limit") is None else None),
                "weights": prov.get("model_fingerprint") or "unrecorded",
                "run_id": r["run_id"],
                "env": ((r.get("provenance") or {}).get("env_digest") or "unrecorded")[:8],
                "_acc": bool(r.get("accuracy_measured")),
                "_full": r.get("limit") is None,
                # per-sample efficiency columns come from a batch-1 measurement when there is one
                "_b1": eff.get("measured_batch_size") in (None, 1),
                "_hib": bool(mval.get("higher_is_better", True)),
                "report_scale": float(((r.get("config") or {}).get("benchmark") or {}).get("report_scale", 1)),
                "_when": r.get("finished_at") or "",
                "_limit": r.get("limit"),
                # rows of other data (a local copy, another revision) never replace or baseline each other
                "_data": data.get("identity") or prov.get("benchmark_fingerprint") or "",
            }
        )
    if not rows:
        return pd.DataFrame(columns=[*COLUMNS, *EXTRA])
    df = pd.DataFrame(rows)
    df["host_load"] = pd.to_numeric(df["host_load"], errors="coerce")  # absent in older records: NaN, not None
    _split_checkpoints(df)
    # baselines: every completed `none` record with a score, by (model, benchmark, n_samples), so a
    # subset run is compared with the unpruned run on the same subset (newest wins on ties)
    base: dict[tuple, float] = {}
    for _, b in df[(df["method"] == "none") & df["score"].notna()].sort_values(["_when", "run_id"]).iterrows():
        base[(b["model"], b["weights"], b["benchmark"], b["_data"], b["n_samples"])] = b["score"]
    # one row per configuration: the budget mode is part of it (an official and a layer_mean run are two rows)
    df = df.sort_values(["_acc", "_full", "_b1", "_when", "run_id"]).groupby(["model", "weights", "method", "ratio", "budget_mode", "benchmark", "_data"], as_index=False).tail(1)
    ret, hints = [], []
    for _, row in df.iterrows():
        b = base.get((row["model"], row["weights"], row["benchmark"], row["_data"], row["n_samples"]))
        ok = b is not None and b != 0 and pd.notna(row["score"])
        ret.append(round(100.0 * row["score"] / b, 2) if ok else None)
        hints.append(_baseline_hint(row, b) if not ok and pd.notna(row["score"]) and row["method"] != "none" else None)
    df["retention_pct"] = ret
    df["baseline_hint"] = hints
    df["_rank"] = df.apply(lambda r: -r["score"] if (r["_hib"] and pd.notna(r["score"])) else (r["score"] if pd.notna(r["score"]) else float("inf")), axis=1)
    df = df.sort_values(["model", "benchmark", "_rank", "method", "ratio"], kind="mergesort")
    return df[[*COLUMNS, *EXTRA]].reset_index(drop=True)


def _split_checkpoints(df: pd.DataFrame) -> None:
    """In place: a model name with rows of several weights fingerprints becomes ``<model>@<weights[:8]>``
    on each of them (none keeps the bare name: which checkpoint is "the" model is not for us to guess)."""
    for model, g in df.groupby("model"):
        if g["weights"].nunique() > 1:
            idx = g.index
            df.loc[idx, "model"] = [f"{model}@{w[:8]}" for w in g["weights"]]


#: columns of :func:`leaderboard_full` beyond :data:`COLUMNS`: the multiplier to the units papers report and
#: the budget the run asked for (what published tables label their official configurations by)
EXTRA = ["report_scale", "budget_requested", "baseline_hint"]


def _baseline_hint(row, base: float | None) -> str:
    """Why ``retention_pct`` is empty for a scored row, and the run that fills it."""
    if base == 0:
        return f"the unpruned baseline of {row['model']} on {row['benchmark']} scored 0, so retention is undefined"
    model = str(row["model"]).split("@", 1)[0]
    limit = row.get("_limit")
    cmd = f"python -m bench run method=none model={model} benchmark={row['benchmark']}"
    if limit is not None and not pd.isna(limit):
        cmd += f" benchmark.limit={int(limit)}"
    same = f"{'' if limit is None or pd.isna(limit) else f'{int(limit)} '}samples, same data" + (" and weights" if "@" in str(row["model"]) else "")
    return f"no `none` baseline of {row['model']} on {row['benchmark']} with the same {same}: {cmd}"


def baseline_notes(df: pd.DataFrame) -> list[str]:
    """One line per missing baseline (``baseline_hint`` of :func:`leaderboard_full`), with the rows it leaves
    without ``retention_pct``."""
    if "baseline_hint" not in df:
        return []
    hints = df["baseline_hint"].dropna()
    return [f"retention_pct empty for {n} row(s): {h}" for h, n in hints.value_counts(sort=False).sort_index().items()]


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
    written: dict[str, list] = {"tables": [], "plots": [], "notes": []}
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
        for line in baseline_notes(full):
            print(f"[bench] note: {line}")
        for line in split_checkpoints_notes(df):
            print(f"[bench] note: {line}")
        for line in mixed_environments(df):
            print(f"[bench] note: {line}")
        print(f"\n[bench] {len(df)} rows from {len(pairs)} records -> {results_dir / 'leaderboard.csv'}")
        for line in written.get("notes", []):
            print(f"[bench] note: {line}")
        if written["tables"] or written["plots"]:
            print(f"[bench] {len(written['tables'])} tables under {results_dir}/leaderboards and {results_dir}/tables, {len(written['plots'])} plots under {results_dir}/plots")
        if built:
            print(f"[bench] site: {len(built.files)} files -> {results_dir / 'site' / 'index.html'} (open it from the file system, no server needed)")
    return df


def refresh_leaderboard(results_dir: str | Path) -> None:
    """:func:`aggregate` after a run wrote a record, quietly; never raises (the record is safe, and
    ``python -m bench aggregate`` can redo this)."""
    try:
        # the site (kept-token pictures: a minute of CPU on a cold cache) is built by `python -m bench
        # aggregate` and `make demo`, not after every run
        aggregate(results_dir, quiet=True, site=False)
    except Exception:  # noqa: BLE001
        log.exception("leaderboard refresh failed; run `python -m bench aggregate`")


def split_checkpoints_notes(df: pd.DataFrame) -> list[str]:
    """One line per model name whose rows come from several weights (see :func:`_split_checkpoints`)."""
    out = []
    names = sorted({m.split("@", 1)[0] for m in df["model"] if "@" in m})
    for name in names:
        shown = sorted({m for m in df["model"] if m.split("@", 1)[0] == name})
        out.append(f"model {name}: rows from {len(shown)} different weights, kept apart as {', '.join(shown)} (column weights)")
    return out


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
    drop = ["run_id"] + [c for c in ("env", "weights") if c in show and show[c].nunique() <= 1]
    show = show.drop(columns=drop).copy()
    return show.to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.4g}")
