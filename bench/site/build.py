"""Build ``<results>/site/``: a pure function of the leaderboard (with its uncertainty columns), the
records, the GPU CSVs, the published numbers and the method code.

Files: ``index.html`` (leaderboard table + Pareto plots), ``methods/<name>.html`` (one per
``conf/method``), ``published.html``, ``efficiency.html``, ``kept/*.png`` and ``assets/`` (plotly.js
once, the table script, the style sheet). Every file is written atomically; files of an earlier build
that this one does not write are removed, so the directory is exactly this build's output.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from bench.plotstyle import method_styles
from bench.records import atomic_write_bytes, atomic_write_text, is_temp_file
from bench.report import REFERENCE, _bench_key, latency_left_out, reported_gap
from bench.site.catalog import method_catalog
from bench.site.figures import PARETO_X, efficiency_figures, efficiency_frames, pareto_figure, published_figure
from bench.site.kept import IMAGES, MANIFEST, PANEL, RATIOS, kept_pictures

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "site"
PLOTLY_CONFIG = {"displaylogo": False}  # fixed-size figures: a responsive one drawn before the page settles keeps a wrong width


@dataclass
class Site:
    """What a build wrote: files, and the figures and pictures W&B logs too."""

    files: list[Path] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> plotly Figure
    pictures: dict[str, Path] = field(default_factory=dict)  # name -> kept-token PNG


def _fig_html(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOTLY_CONFIG)


def _f(v, fmt: str) -> str:
    return "" if v is None or pd.isna(v) else format(float(v), fmt)


def _v(v) -> str:
    return "" if v is None or pd.isna(v) else repr(float(v))


def _delta(d, p, scale) -> str:
    if d is None or pd.isna(d):
        return ""
    return f"{float(d) * scale:+.1f} (p={float(p):.2g})"


def table_rows(full: pd.DataFrame, styles, budget_mode: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for r in full.to_dict("records"):
        scale = float(r["report_scale"])
        lo, hi = r.get("score_ci_low"), r.get("score_ci_high")
        has_ci = lo is not None and hi is not None and not pd.isna(lo)
        rows.append({
            "model": r["model"], "benchmark": r["benchmark"], "method": r["method"], "color": styles[r["method"]].color,
            "ratio": _v(r["ratio"]), "ratio_s": f"{float(r['ratio']):.3g}",
            "tokens": _f(r["visual_tokens"], ".1f"), "tokens_v": _v(r["visual_tokens"]),
            "mode": budget_mode.get(r["run_id"]) or "exact",
            "rank": "" if r.get("rank") is None or pd.isna(r.get("rank")) else str(int(r["rank"])), "rank_v": _v(r.get("rank")),
            "score": _f(None if pd.isna(r["score"]) else r["score"] * scale, ".1f" if scale == 100 else ".4g"), "score_v": _v(r["score"]),
            "ci": f"[{lo * scale:.1f}, {hi * scale:.1f}]" if has_ci else "", "ci_w": _v(hi - lo) if has_ci else "",
            "ci_method": r.get("ci_method") or "",
            "retention": _f(r["retention_pct"], ".1f"), "retention_v": _v(r["retention_pct"]),
            "dbase": _delta(r.get("delta_vs_baseline"), r.get("p_vs_baseline"), scale), "dbase_v": _v(r.get("delta_vs_baseline")),
            "sig_base": bool(r.get("sig_vs_baseline")),
            "dnb": _delta(r.get("delta_vs_neighbour"), r.get("p_vs_neighbour"), scale), "dnb_v": _v(r.get("delta_vs_neighbour")),
            "sig_nb": bool(r.get("sig_vs_neighbour")),
            "tflops": _f(r["tflops_prefill"], ".4g"), "tflops_v": _v(r["tflops_prefill"]),
            "ms": _f(r["prefill_ms"], ".1f"), "ms_v": _v(r["prefill_ms"]),
            "kv": _f(r["kv_cache_mb"], ".1f"), "kv_v": _v(r["kv_cache_mb"]),
            "device": r["device"] or "", "n": "" if pd.isna(r["n_samples"]) else str(int(r["n_samples"])), "n_v": _v(r["n_samples"]),
            "run_id": r["run_id"],
        })
    return rows


def filter_values(rows: list[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    keys = [("model", "model"), ("benchmark", "benchmark"), ("method", "method"), ("budget", "budget (ratio)"), ("mode", "budget mode")]
    out = []
    for key, label in keys:
        src = "ratio_s" if key == "budget" else key
        vals = sorted({r[src] for r in rows}, key=(lambda s: float(s)) if key == "budget" else str)
        out.append((key, label, vals))
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s)


def build_site(full: pd.DataFrame, records: list[dict[str, Any]], results_dir: str | Path, kept: bool | list[str] = True) -> Site:
    """Write ``<results_dir>/site/`` from the leaderboard ``full`` (with ``report_scale`` and the uncertainty columns).

    ``kept``: draw kept-token pictures for every method (True), none (False) or the listed methods.
    """
    results_dir = Path(results_dir)
    site_dir = results_dir / "site"
    out = Site()
    env = Environment(loader=FileSystemLoader(str(ASSETS / "templates")), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["filter_values"] = filter_values
    catalog = method_catalog()
    styles = method_styles(full["method"].unique() if len(full) else [])
    for name in catalog:  # methods without rows still get a colour for their page
        if name not in styles:
            styles = method_styles([*styles, name])
    budget_mode = {r["run_id"]: (r.get("efficiency") or {}).get("budget_mode") for r in records if r and "run_id" in r}
    n_records = len(records)

    def write(rel: str, data: str | bytes) -> None:
        p = site_dir / rel
        (atomic_write_bytes if isinstance(data, bytes) else atomic_write_text)(p, data)
        out.files.append(p)

    def page(rel: str, template: str, **ctx) -> None:
        root = "../" * rel.count("/")
        write(rel, env.get_template(template).render(root=root, n_records=n_records, **ctx))

    # assets
    import plotly.offline

    write("assets/plotly.min.js", plotly.offline.get_plotlyjs())
    for name in ("site.js", "site.css"):
        write(f"assets/{name}", (ASSETS / name).read_bytes())

    # model x benchmark groups with measured accuracy first (the leaderboard's order within each group)
    scored = full.groupby(["model", "benchmark"])["score"].transform(lambda s: s.notna().any())
    ordered = full.assign(_s=~scored).sort_values(["_s"], kind="mergesort").drop(columns="_s") if len(full) else full
    rows = table_rows(ordered, styles, budget_mode)
    # Pareto views
    pareto = []
    for (model, bench), d in sorted(full.groupby(["model", "benchmark"]), key=lambda kv: (kv[0][0], _bench_key(kv[0][1]))):
        if not d["score"].notna().any():
            continue
        plots = []
        for xcol in PARETO_X:
            if not (d["score"].notna() & d[xcol].notna()).any():
                continue
            if xcol == "prefill_ms" and latency_left_out(d):  # CPU timings whose spread exceeds their differences
                continue
            fig = pareto_figure(d, xcol, styles, f"{model} / {bench}: accuracy vs {PARETO_X[xcol]}", budget_mode)
            key = f"pareto__{model}__{bench}__{xcol}"
            out.figures[key] = fig
            plots.append(_fig_html(fig, _slug(key)))
        devices = ", ".join(sorted(d["device"].dropna().astype(str).unique()))
        pareto.append({"key": _slug(f"{model}-{bench}"), "model": model, "benchmark": bench, "plots": plots, "devices": devices})
    methods_ctx = [{"name": n, "stage": i.stage, "color": styles[n].color} for n, i in catalog.items()]
    page("index.html", "index.html", title="leaderboard", rows=rows, pareto=pareto, methods=methods_ctx)

    # method pages
    want = list(catalog) if kept is True else ([] if kept is False else [m for m in kept if m in catalog])
    pictures = kept_pictures(want, site_dir / "kept") if want else {}
    if want:
        out.files.append(site_dir / "kept" / MANIFEST)
    for name, pics in pictures.items():
        for p in pics:
            if p.file:
                out.files.append(site_dir / "kept" / p.file)
                out.pictures[f"kept__{name}__r{p.ratio}__doc{p.doc_id}"] = site_dir / "kept" / p.file
    for name, info in catalog.items():
        mrows = [r for r in rows if r["method"] == name]
        pics = pictures.get(name, [])
        kept_ctx = []
        for ratio in RATIOS:
            ps = [p for p in pics if p.ratio == ratio]
            if ps:
                kept_ctx.append((ratio, [{**p.__dict__, "width": PANEL * max(1, len(p.panels)) + 6 * max(0, len(p.panels) - 1), "height": PANEL} for p in ps]))
        if name == "none":
            note = "The baseline keeps every visual token: nothing to draw."
        elif not kept_ctx:
            note = "Kept-token pictures were not drawn in this build."
        else:
            cpus = ", ".join(sorted({p.cpu or "a CPU it did not record" for p in pics}))
            note = (f"SynthVQA test documents {', '.join(map(str, IMAGES))} on the embedded tiny model (bench:tiny-llava-synth), through the harness's own "
                    "LlavaAdapter.visual_selection (and, in-LLM, one prefill with the adapter's pruning hooks). Dimmed patches are not kept. "
                    f"Drawn on {cpus}: on another CPU a near tie may round the other way (a kept count one off).")
        defaults = [(k, html.unescape(repr(v))) for k, v in info.defaults.items()]
        page(f"methods/{name}.html", "method.html", title=f"method {name}", m=info, rows=mrows, kept=kept_ctx, kept_note=note,
             models=sorted({r["model"] for r in mrows}), defaults=defaults)

    # measured vs published
    from bench.published import load_reference

    reference = load_reference(REFERENCE)
    gap = reported_gap(full, reference) if len(full) else pd.DataFrame()
    pub_plots = []
    for bench in sorted(reference["benchmark"].unique(), key=_bench_key):
        fig = published_figure(reference, full, bench, styles)
        key = f"published__{bench}"
        out.figures[key] = fig
        pub_plots.append(_fig_html(fig, _slug(key)))
    page("published.html", "published.html", title="measured vs published", gap_cols=list(gap.columns), gap_rows=gap.astype(object).where(gap.notna(), "").to_dict("records"), plots=pub_plots)

    # efficiency
    stage_of = {n: i.stage for n, i in catalog.items()}
    eff_plots = []
    for name, df in efficiency_frames(results_dir):
        for i, (title, fig) in enumerate(efficiency_figures(name, df, stage_of, styles)):
            key = f"efficiency__{name}__{i}"
            out.figures[key] = fig
            eff_plots.append(_fig_html(fig, _slug(key)))
    page("efficiency.html", "efficiency.html", title="efficiency", plots=eff_plots)

    # the directory is exactly this build: drop files an earlier build wrote and this one did not
    # (another aggregate may be writing here at the same time: its temporary files are left alone unless
    # an hour old, i.e. left by a crash, and a file or directory that vanished meanwhile is no error)
    keep = {p.resolve() for p in out.files}
    keep_dirs = {d for p in keep for d in p.parents}
    for p in sorted(site_dir.rglob("*"), reverse=True):
        try:
            if p.is_file() and p.resolve() not in keep:
                if is_temp_file(p) and time.time() - p.stat().st_mtime < 3600:
                    continue
                p.unlink()
            elif p.is_dir() and p.resolve() not in keep_dirs and not any(p.iterdir()):
                p.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # a directory another build just filled
            continue
    return out
