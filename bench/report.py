"""Tables and plots from the leaderboard (pure functions of the records; written by ``aggregate``).

* ``leaderboards/<model>.csv``: the leaderboard rows of one model.
* ``tables/<model>.md``: the paper-style table (rows = method x visual tokens, columns = benchmarks in
  the units papers use, plus average retention %), like Table A of methods.md.
* ``tables/<model>_vs_reported.{csv,md}``: measured minus reported score where a published number
  exists for the same model, method, visual-token count and benchmark (``bench/reference``).
* ``plots/<model>__<benchmark>__{tflops,latency}.png``: score vs compute, one line per method, the
  Pareto frontier dashed.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from bench.records import atomic_write_text

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
    m["tokens"] = m["visual_tokens"].round().astype("Int64")
    m["shown"] = m["score"] * m["report_scale"]
    benches = sorted(m["benchmark"].unique(), key=_bench_key)
    lines = [f"# {model}: accuracy by visual tokens kept", "", "Scores in the units papers report (percent; MME as perception + cognition). Retention = score / unpruned score, averaged over the row's benchmarks.", ""]
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
            cells.append(_fmt(r["shown"].iloc[0], 0 if b == "mme" else 1) if len(r) else "–")
        ret = rows["retention_pct"].dropna()
        avg = ret.mean() if len(ret) == len(rows) and len(ret) else None
        lines.append(f"| {tokens} | {method} | " + " | ".join(cells) + f" | {_fmt(avg)} |")
    return "\n".join(lines) + "\n"


def reported_gap(df: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Measured vs published scores for matching (model, method, visual tokens, benchmark)."""
    m = df[df["score"].notna()].copy()
    m["visual_tokens_int"] = m["visual_tokens"].round().astype("Int64")
    m["measured"] = (m["score"] * m["report_scale"]).round(3)
    ref = reference.rename(columns={"score": "reported", "visual_tokens": "visual_tokens_int"})
    ref["visual_tokens_int"] = ref["visual_tokens_int"].astype("Int64")
    j = m.merge(ref, on=["model", "method", "visual_tokens_int", "benchmark"], how="inner")
    j["gap"] = (j["measured"] - j["reported"]).round(3)
    cols = ["model", "method", "visual_tokens_int", "benchmark", "measured", "reported", "gap", "source", "run_id"]
    return j[cols].rename(columns={"visual_tokens_int": "visual_tokens"}).sort_values(["model", "benchmark", "visual_tokens", "method", "source"]).reset_index(drop=True)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by a cheaper-or-equal, better-or-equal point (lower x, higher y)."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto_plot(df: pd.DataFrame, model: str, bench: str, xcol: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[(df["model"] == model) & (df["benchmark"] == bench) & df["score"].notna() & df[xcol].notna()].copy()
    if d.empty:
        return False
    d["shown"] = d["score"] * d["report_scale"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method, g in sorted(d.groupby("method"), key=lambda kv: kv[0]):
        g = g.sort_values(xcol)
        style = dict(marker="*", markersize=14, linestyle="none") if method == "none" else dict(marker="o", markersize=5)
        ax.plot(g[xcol], g["shown"], label=method, **style)
        if method != "none":
            for _, r in g.iterrows():
                ax.annotate(f"{int(round(r['visual_tokens']))}", (r[xcol], r["shown"]), textcoords="offset points", xytext=(3, 3), fontsize=7, alpha=0.7)
    front = pareto_front(list(zip(d[xcol], d["shown"])))
    ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", color="grey", linewidth=1, label="Pareto front")
    xlabel = {"tflops_prefill": "prefill TFLOPs per sample (measured)", "prefill_ms": f"prefill latency per sample, ms ({', '.join(sorted(d['device'].dropna().unique()))})"}[xcol]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{d['metric'].iloc[0]} ({'%' if d['report_scale'].iloc[0] == 100 else 'score'})")
    ax.set_title(f"{model} on {bench}: accuracy vs {'compute' if xcol == 'tflops_prefill' else 'latency'} (labels: visual tokens)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def write_reports(full: pd.DataFrame, results_dir: Path) -> dict[str, list[Path]]:
    """Write every table and plot for the leaderboard ``full`` (with ``report_scale``)."""
    from bench.aggregate import COLUMNS

    written: dict[str, list[Path]] = {"tables": [], "plots": []}
    reference = pd.read_csv(REFERENCE / "reported_llava15_7b.csv")
    for model in sorted(full["model"].unique()):
        part = full[full["model"] == model]
        p = results_dir / "leaderboards" / f"{model}.csv"
        atomic_write_text(p, _csv(part[list(COLUMNS)]))
        written["tables"].append(p)
        p = results_dir / "tables" / f"{model}.md"
        atomic_write_text(p, paper_table(full, model))
        written["tables"].append(p)
        gap = reported_gap(part, reference)
        if not gap.empty:
            p = results_dir / "tables" / f"{model}_vs_reported.csv"
            atomic_write_text(p, _csv(gap))
            written["tables"].append(p)
        for bench in sorted(part["benchmark"].unique(), key=_bench_key):
            for xcol, tag in (("tflops_prefill", "tflops"), ("prefill_ms", "latency")):
                p = results_dir / "plots" / f"{model}__{bench}__{tag}.png"
                if pareto_plot(full, model, bench, xcol, p):
                    written["plots"].append(p)
    return written
