"""Tables and plots from the leaderboard (pure functions of the records; written by ``aggregate``).

* ``leaderboards/<model>.csv``: the leaderboard rows of one model.
* ``tables/<model>.md``: the paper-style table (rows = method x visual tokens, columns = benchmarks in
  the units papers use, plus average retention %), like Table A of methods.md.
* ``tables/<model>_vs_reported.{csv,md}``: measured minus published score where a published number
  exists for the same model, method, budget and benchmark (:mod:`bench.published`, ``bench/reference``).
* ``tables/<model>__<benchmark>__ranked.md``: the rows of one model and benchmark with their 95%
  intervals, tied ranks and paired tests against the baseline and the row above (``bench.uncertainty``).
* ``plots/<model>__<benchmark>__{tflops,latency}.png``: score vs compute, one line per method (its own
  colour and marker, ``bench.plotstyle``), 95% intervals as error bars, the Pareto frontier dashed. CPU
  latency is labelled indicative, with its spread (IQR bars) and the host load, and its plot is left out
  when the spread exceeds the differences between the runs (:func:`latency_left_out`).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from bench.plotstyle import method_styles, place_labels
from bench.published import load_reference, markdown
from bench.records import atomic_write_bytes, atomic_write_text
from bench.schema import LEADERBOARD_COLUMNS as COLUMNS
from bench.uncertainty import STAT_COLUMNS

REFERENCE = Path(__file__).resolve().parent / "reference"
BENCH_ORDER = ["gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "vqav2_val", "textvqa_val", "mmmu_val", "seedbench", "synthvqa"]


def _bench_key(b: str) -> tuple[int, str]:
    return (BENCH_ORDER.index(b) if b in BENCH_ORDER else len(BENCH_ORDER), b)


def _csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


def _fmt(x, digits: int = 1) -> str:
    return "–" if x is None or pd.isna(x) else f"{x:.{digits}f}"


def paper_table(df: pd.DataFrame, model: str) -> str:
    """Markdown table of one model: rows method x kept tokens, columns benchmarks + avg retention."""
    m = df[(df["model"] == model) & df["score"].notna()].copy()
    if m.empty:
        return f"# {model}\n\n(no accuracy measured yet)\n"
    # a row sits under the budget it met, else under the count it measured (never under a budget it missed);
    # runs of a non-official budget mode say so in the method column
    m["tokens"] = m["budget"].fillna(m["visual_tokens"]).round().astype("Int64")
    mode = m["budget_mode"] if "budget_mode" in m else pd.Series("unrecorded", index=m.index)
    m["method"] = [meth if md in ("official", "pre_llm_exact", "in_vision_exact", "unrecorded") else f"{meth} [{md}]" for meth, md in zip(m["method"], mode)]
    m["shown"] = m["score"] * m["report_scale"]
    benches = sorted(m["benchmark"].unique(), key=_bench_key)
    lines = [f"# {model}: accuracy by visual-token budget", "", "Scores in the units papers report (percent; MME as perception + cognition), with their 95% confidence interval in brackets where per-document scores allow one (`ci_method` in the CSVs). Retention = score / unpruned score, averaged over the row's benchmarks. "
             "Tokens: the budget a run met (in-LLM methods: by their budget mode's count), else the count it measured. In-LLM methods run their official schedules unless the method says otherwise ([layer_mean]: equal LLM compute).", ""]
    lines.append("| Tokens | Method | " + " | ".join(benches) + " | Avg retention % |")
    lines.append("|---|---|" + "---|" * len(benches) + "---|")
    base = m[m["method"] == "none"]
    order = [("none", int(t)) for t in sorted(base["tokens"].dropna().unique(), reverse=True)]
    rest = m[m["method"] != "none"].sort_values(["tokens", "method"], ascending=[False, True])
    order += list(dict.fromkeys(zip(rest["method"], rest["tokens"].astype(int))))
    for method, tokens in order:
        rows = m[(m["method"] == method) & (m["tokens"] == tokens)]
        cells = []
        for b in benches:
            r = rows[rows["benchmark"] == b]
            cells.append(_with_ci(r.iloc[0], 0 if b == "mme" else 1) if len(r) else "–")
        ret = rows["retention_pct"].dropna()
        avg = ret.mean() if len(ret) == len(rows) and len(ret) else None
        lines.append(f"| {tokens} | {method} | " + " | ".join(cells) + f" | {_fmt(avg)} |")
    hints = sorted(set(m["baseline_hint"].dropna())) if "baseline_hint" in m else []
    if hints:
        lines += ["", "Retention is empty (–) where the unpruned baseline is missing:"] + [f"- {h}" for h in hints]
    return "\n".join(lines) + "\n"


def _with_ci(row, digits: int) -> str:
    """``score [low, high]`` in report units; the bare score where the row has no interval."""
    scale = row["report_scale"]
    out = _fmt(row["score"] * scale, digits)
    lo, hi = row.get("score_ci_low"), row.get("score_ci_high")
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        out += f" [{_fmt(lo * scale, digits)}, {_fmt(hi * scale, digits)}]"
    return out


def _p_cell(delta, p, sig, scale: float) -> str:
    if delta is None or pd.isna(delta):
        return "–"
    return f"{delta * scale:+.1f} (p={p:.2g}{', significant' if sig else ''})"


def ranked_table(df: pd.DataFrame, model: str, bench: str) -> str:
    """Markdown: one model x benchmark by score, with intervals, tied ranks and paired tests."""
    d = df[(df["model"] == model) & (df["benchmark"] == bench) & df["score"].notna()]
    if d.empty:
        return f"# {model} / {bench}\n\n(no accuracy measured yet)\n"
    test = ", ".join(sorted({t for t in d.get("paired_test", pd.Series(dtype=object)).dropna()})) or "none"
    lines = [f"# {model} / {bench}: ranked by {d['metric'].iloc[0]}", "",
             "Rank: 1 + rows whose 95% interval lies entirely above (overlapping intervals share a rank). "
             f"Δ: difference on the same documents, with the two-sided p of the paired test ({test}); "
             "'significant' means p < 0.05, not corrected for the many comparisons of one table.", "",
             "| Rank | Method | Ratio | Tokens | Score [95% CI] | n | Δ vs none | Δ vs row above | Run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in d.iterrows():
        rank = r.get("rank")
        lines.append(
            f"| {'–' if rank is None or pd.isna(rank) else int(rank)} | {r['method']} | {r['ratio']:.3g} | {_fmt(r['visual_tokens'], 0)} | "
            f"{_with_ci(r, 1)} | {'–' if pd.isna(r['n_samples']) else int(r['n_samples'])} | "
            f"{_p_cell(r.get('delta_vs_baseline'), r.get('p_vs_baseline'), r.get('sig_vs_baseline'), r['report_scale'])} | "
            f"{_p_cell(r.get('delta_vs_neighbour'), r.get('p_vs_neighbour'), r.get('sig_vs_neighbour'), r['report_scale'])} | {r['run_id']} |"
        )
    return "\n".join(lines) + "\n"


def reported_gap(df: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Measured vs published scores (:func:`bench.published.compare`)."""
    from bench.published import compare

    return compare(df, reference)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by a cheaper-or-equal, better-or-equal point (lower x, higher y)."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


XLABEL = {"tflops_prefill": "prefill TFLOPs per sample (measured)", "prefill_ms": "prefill latency per sample, ms", "kv_cache_mb": "KV cache per sample, MiB"}


def latency_left_out(d: pd.DataFrame) -> str | None:
    """Why a latency Pareto view of the rows ``d`` (one model x benchmark) would mislead, or None.

    GPU timings (CUDA events) are kept. CPU wall-clock timings are left out when their spread, the largest
    inter-quartile range of the repeats, is at least the whole range of the medians: the order of the points
    would then be noise (under load a pruned run measured slower than the unpruned one at fewer FLOPs).
    Rows without a recorded spread are judged by the others; with none recorded, the view is kept.
    """
    d = d[d["score"].notna() & d["prefill_ms"].notna()]
    cpu = d[d["device"].astype(str) == "cpu"]
    if cpu.empty or len(d) < 2:
        return None
    iqr = pd.to_numeric(cpu.get("prefill_ms_iqr", pd.Series(dtype=float)), errors="coerce").dropna()
    if iqr.empty:  # records without the spread: it cannot be judged (the axis still says indicative)
        return None
    spread, diff = float(iqr.max()), float(d["prefill_ms"].max() - d["prefill_ms"].min())
    if spread >= diff:
        return f"CPU latency spread (IQR up to {spread:.1f} ms) exceeds the differences between runs ({diff:.1f} ms)"
    return None


def pareto_figure(df: pd.DataFrame, model: str, bench: str, xcol: str, styles=None):
    """``(figure, placed labels, labels left out)`` of score vs ``xcol`` for one model x benchmark, or ``None``.

    One colour and marker per method (``bench.plotstyle``), 95% intervals as vertical error bars where
    the rows have them, the Pareto front of the point estimates dashed, and one label per visual-token
    budget, placed where it overlaps no other label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[(df["model"] == model) & (df["benchmark"] == bench) & df["score"].notna() & df[xcol].notna()].copy()
    if d.empty:
        return None
    styles = styles or method_styles(df["method"].unique())
    scale = d["report_scale"]
    d["shown"] = d["score"] * scale
    has_ci = "score_ci_low" in d
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for method, g in sorted(d.groupby("method"), key=lambda kv: kv[0]):
        g = g.sort_values(xcol)
        st = styles[method]
        yerr = None
        if has_ci and g["score_ci_low"].notna().all():
            yerr = [(g["shown"] - g["score_ci_low"].astype(float) * g["report_scale"]).clip(lower=0), (g["score_ci_high"].astype(float) * g["report_scale"] - g["shown"]).clip(lower=0)]
        size = 13 if method == "none" else 6
        xerr = None
        if xcol == "prefill_ms" and "prefill_ms_iqr" in g and (g["device"].astype(str) == "cpu").any() and g["prefill_ms_iqr"].notna().all():
            xerr = g["prefill_ms_iqr"].astype(float) / 2  # the IQR's width around the median: the timing's spread
        ax.errorbar(g[xcol], g["shown"], yerr=yerr, xerr=xerr, label=method, color=st.color, marker=st.marker, markersize=size, linewidth=1,
                    linestyle="none" if len(g) == 1 else "-", elinewidth=0.7, capsize=2, alpha=0.9)
    front = pareto_front(list(zip(d[xcol], d["shown"])))
    ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", color="grey", linewidth=1, label="Pareto front")
    xlabel = XLABEL[xcol] + (f" ({', '.join(sorted(d['device'].dropna().unique()))})" if xcol == "prefill_ms" else "")
    if xcol == "prefill_ms" and (d["device"].astype(str) == "cpu").any():
        load = pd.to_numeric(d.get("host_load", pd.Series(dtype=float)), errors="coerce").max()
        xlabel += "; CPU wall clock, indicative only: bars = IQR of the repeats" + ("" if pd.isna(load) else f", host load up to {load:.2f}/core")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{d['metric'].iloc[0]} ({'%' if scale.iloc[0] == 100 else 'score'})" + (", 95% CI" if has_ci else ""))
    what = {"tflops_prefill": "compute", "prefill_ms": "latency", "kv_cache_mb": "KV cache"}[xcol]
    ax.set_title(f"{model} on {bench}: accuracy vs {what} (labels: visual tokens)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ymin, ymax = ax.get_ylim()
    ax.set_ylim(ymin, ymax + 0.08 * (ymax - ymin))  # head room for the budget labels
    fig.tight_layout()
    # one label per budget (rounded visual tokens), above the budget's best point
    d["tok"] = d["visual_tokens"].round().astype(int)
    items = [(float(g[xcol].median()), float(g["shown"].max()), f"{tok} tok") for tok, g in sorted(d.groupby("tok"), key=lambda kv: -kv[0])]
    fig.canvas.draw()
    placed, skipped = place_labels(ax, items)
    return fig, placed, skipped


def pareto_plot(df: pd.DataFrame, model: str, bench: str, xcol: str, path: Path, styles=None) -> bool:
    """Write :func:`pareto_figure` as a PNG (atomically); False when there is nothing to plot, or when a
    CPU latency view would mislead (:func:`latency_left_out`; a plot written earlier is then removed)."""
    import matplotlib.pyplot as plt

    if xcol == "prefill_ms" and latency_left_out(df[(df["model"] == model) & (df["benchmark"] == bench)]):
        Path(path).unlink(missing_ok=True)
        return False
    out = pareto_figure(df, model, bench, xcol, styles)
    if out is None:
        return False
    fig = out[0]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_reports(full: pd.DataFrame, results_dir: Path) -> dict[str, list[Path]]:
    """Write every table and plot for the leaderboard ``full`` (with ``report_scale``)."""
    written: dict[str, list] = {"tables": [], "plots": [], "notes": []}
    reference = load_reference(REFERENCE)
    cols = [*COLUMNS, *(c for c in STAT_COLUMNS if c in full)]
    styles = method_styles(full["method"].unique())
    for model in sorted(full["model"].unique()):
        part = full[full["model"] == model]
        p = results_dir / "leaderboards" / f"{model}.csv"
        atomic_write_text(p, _csv(part[cols]))
        written["tables"].append(p)
        p = results_dir / "tables" / f"{model}.md"
        atomic_write_text(p, paper_table(full, model))
        written["tables"].append(p)
        gap = reported_gap(part, reference)
        if not gap.empty:
            p = results_dir / "tables" / f"{model}_vs_reported.csv"
            atomic_write_text(p, _csv(gap))
            written["tables"].append(p)
            p = results_dir / "tables" / f"{model}_vs_reported.md"
            atomic_write_text(p, markdown(gap, model))
            written["tables"].append(p)
        for bench in sorted(part["benchmark"].unique(), key=_bench_key):
            if part[part["benchmark"] == bench]["score"].notna().any():
                p = results_dir / "tables" / f"{model}__{bench}__ranked.md"
                atomic_write_text(p, ranked_table(full, model, bench))
                written["tables"].append(p)
            for xcol, tag in (("tflops_prefill", "tflops"), ("prefill_ms", "latency")):
                p = results_dir / "plots" / f"{model}__{bench}__{tag}.png"
                if pareto_plot(full, model, bench, xcol, p, styles):
                    written["plots"].append(p)
                elif xcol == "prefill_ms" and (why := latency_left_out(part[part["benchmark"] == bench])):
                    written["notes"].append(f"latency plot of {model} / {bench} left out: {why} (`python -m bench run device=cuda` measures it)")
    return written
