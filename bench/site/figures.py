"""Plotly figures of the site (the same figures go to W&B): Pareto views, efficiency, published numbers.

Every figure is a pure function of its table; traces are added in sorted order and carry no random
ids, so their JSON (and the HTML around it) is the same on every build.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from bench.plotstyle import Style
from bench.report import pareto_front

PARETO_X = {"tflops_prefill": "prefill TFLOPs per sample", "prefill_ms": "prefill ms per sample", "kv_cache_mb": "KV cache per sample, MiB"}
LAYOUT = dict(template="plotly_white", width=640, height=460, margin=dict(l=60, r=20, t=50, b=50), legend=dict(font=dict(size=11)), hoverlabel=dict(font_size=12))
STAGE_NAMES = {"pre_llm": "pre-LLM", "in_vision": "in-vision", "in_llm": "in-LLM", "none": "baseline"}


def _num(v):
    return None if v is None or pd.isna(v) else float(v)


def pareto_figure(d: pd.DataFrame, xcol: str, styles: dict[str, Style], title: str, budget_mode: dict[str, str]) -> go.Figure:
    """Score (report units, 95% CI bars) vs ``xcol`` for the rows ``d`` of one model x benchmark."""
    d = d[d["score"].notna() & d[xcol].notna()].copy()
    scale = d["report_scale"].astype(float)
    d["shown"] = d["score"] * scale
    fig = go.Figure()
    for method, g in sorted(d.groupby("method"), key=lambda kv: kv[0]):
        g = g.sort_values(xcol)
        st = styles[method]
        sc = g["report_scale"].astype(float)
        lo = [_num(v) for v in g.get("score_ci_low", pd.Series([None] * len(g), index=g.index))]
        hi = [_num(v) for v in g.get("score_ci_high", pd.Series([None] * len(g), index=g.index))]
        has = all(v is not None for v in lo + hi)
        text = [
            f"<b>{method}</b> ratio {r.ratio:.3g} ({budget_mode.get(r.run_id) or 'exact'})<br>run {r.run_id}<br>"
            f"measured tokens {r.visual_tokens:g}<br>score {r.shown:.2f}" + (f" [{l * s:.2f}, {h * s:.2f}]" if l is not None and h is not None else "")
            + f"<br>{PARETO_X[xcol]}: {getattr(r, xcol):.4g}"
            for r, l, h, s in zip(g.itertuples(), lo, hi, sc)
        ]
        fig.add_trace(go.Scatter(
            x=g[xcol].tolist(), y=g["shown"].round(4).tolist(), name=method, mode="lines+markers" if len(g) > 1 else "markers",
            marker=dict(color=st.color, symbol=st.symbol, size=14 if method == "none" else 9, line=dict(width=0.5, color="#333")),
            line=dict(color=st.color, width=1.2),
            error_y=dict(type="data", symmetric=False, array=[round(h * s - y, 4) for h, s, y in zip(hi, sc, g["shown"])],
                         arrayminus=[round(y - l * s, 4) for l, s, y in zip(lo, sc, g["shown"])], thickness=1, width=3, color=st.color) if has else None,
            error_x=dict(type="data", array=(g["prefill_ms_iqr"].astype(float) / 2).round(3).tolist(), thickness=1, width=2, color=st.color)
            if xcol == "prefill_ms" and "prefill_ms_iqr" in g and g["prefill_ms_iqr"].notna().all() and (g["device"].astype(str) == "cpu").any() else None,
            hovertext=text, hoverinfo="text", customdata=g["run_id"].tolist(),
        ))
    front = pareto_front(list(zip(d[xcol].tolist(), d["shown"].tolist())))
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[round(p[1], 4) for p in front], name="Pareto front", mode="lines",
                             line=dict(color="#777", dash="dash", width=1.5), hoverinfo="skip"))
    unit = "%" if float(scale.iloc[0]) == 100 else "score"
    xtitle = PARETO_X[xcol]
    if xcol == "prefill_ms" and (d["device"].astype(str) == "cpu").any():
        xtitle += " (CPU wall clock: indicative only; IQR bars)"
    fig.update_layout(title=dict(text=title, font=dict(size=15)), xaxis_title=xtitle, yaxis_title=f"{d['metric'].iloc[0]} ({unit}), 95% CI", **LAYOUT)
    return fig


def efficiency_frames(results_dir: Path) -> list[tuple[str, pd.DataFrame]]:
    """``(name, table)`` of every GPU CSV under ``results/efficiency/`` (sorted by file name)."""
    out = []
    for p in sorted((Path(results_dir) / "efficiency").glob("*.csv")):
        try:
            out.append((p.stem, pd.read_csv(p)))
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
    return out


#: latency column -> mode, in the order the modes are shown
MODES = {"prefill_eager_ms": "eager", "prefill_graph_ms": "CUDA graph", "prefill_compiled_graph_ms": "torch.compile + CUDA graph"}


def efficiency_figures(name: str, df: pd.DataFrame, stage_of: dict[str, str], styles: dict[str, Style]) -> list[tuple[str, go.Figure]]:
    """Latency vs visual tokens per mode and batch, methods grouped by family (stage), roofline floor dashed.

    Two CSV shapes are read: the per-method leaderboard (``method, visual_tokens_layer_mean, batch,
    prefill_*_ms, llm_prefill_floor_ms``) and the per-mode probe (``mode, visual_tokens, median_ms,
    floor_ms``). Other CSVs are skipped.
    """
    figs = []
    if {"method", "visual_tokens_layer_mean", "batch", "llm_prefill_floor_ms"} <= set(df.columns):
        gpu = ", ".join(sorted(df["gpu"].dropna().astype(str).unique())) if "gpu" in df else ""
        for batch in sorted(df["batch"].unique()):
            d = df[df["batch"] == batch]
            for col, mode in MODES.items():
                if col not in d or not d[col].notna().any():
                    continue
                fig = go.Figure()
                iqr = col.replace("_ms", "_iqr_ms")
                for family in ("none", "pre_llm", "in_vision", "in_llm"):
                    for method, g in sorted(d.groupby("method"), key=lambda kv: kv[0]):
                        if stage_of.get(method, "pre_llm") != family or not g[col].notna().any():
                            continue
                        g = g.sort_values("visual_tokens_layer_mean")
                        st = styles.get(method) or Style("#555", "o", "circle")
                        fig.add_trace(go.Scatter(
                            x=g["visual_tokens_layer_mean"].tolist(), y=g[col].tolist(), name=method, legendgroup=family,
                            legendgrouptitle_text=STAGE_NAMES[family], mode="lines+markers",
                            marker=dict(color=st.color, symbol=st.symbol, size=12 if method == "none" else 8), line=dict(color=st.color, width=1),
                            error_y=dict(type="data", array=(g[iqr] / 2).round(4).tolist(), thickness=1, width=2) if iqr in g and g[iqr].notna().all() else None,
                            hovertext=[f"<b>{method}</b> ({STAGE_NAMES[family]})<br>{r.visual_tokens_layer_mean:g} tokens (layer mean)<br>{getattr(r, col):.3f} ms ({mode})<br>floor {r.llm_prefill_floor_ms:.3f} ms<br>run {getattr(r, 'run_id', '')}" for r in g.itertuples()],
                            hoverinfo="text",
                        ))
                fl = d[["visual_tokens_layer_mean", "llm_prefill_floor_ms"]].dropna().sort_values("visual_tokens_layer_mean").drop_duplicates("visual_tokens_layer_mean")
                fig.add_trace(go.Scatter(x=fl["visual_tokens_layer_mean"].tolist(), y=fl["llm_prefill_floor_ms"].tolist(), name="roofline floor (LLM prefill)",
                                         mode="lines", line=dict(color="black", dash="dash", width=1.5)))
                title = f"{name}: LLM prefill latency, {mode}, batch {batch} ({gpu})"
                fig.update_layout(title=dict(text=title, font=dict(size=14)), xaxis_title="visual tokens entering the LLM layers (mean)",
                                  yaxis_title="ms per forward (median; bars: IQR/2)", **LAYOUT)
                figs.append((title, fig))
    elif {"mode", "visual_tokens", "median_ms", "floor_ms"} <= set(df.columns):
        fig = go.Figure()
        df = df.assign(variant=df["variant"].fillna("") if "variant" in df else "")
        for (mode, variant), g in sorted(df.groupby(["mode", "variant"]), key=lambda kv: kv[0]):
            g = g.sort_values("visual_tokens")
            label = f"{mode} {variant}".strip()
            fig.add_trace(go.Scatter(x=g["visual_tokens"].tolist(), y=g["median_ms"].tolist(), name=label, mode="lines+markers",
                                     error_y=dict(type="data", array=(g["iqr_ms"] / 2).round(4).tolist(), thickness=1) if "iqr_ms" in g else None))
        fl = df[["visual_tokens", "floor_ms"]].dropna().sort_values("visual_tokens").drop_duplicates("visual_tokens")
        fig.add_trace(go.Scatter(x=fl["visual_tokens"].tolist(), y=fl["floor_ms"].tolist(), name="roofline floor", mode="lines", line=dict(color="black", dash="dash")))
        title = f"{name}: prefill latency by mode vs visual tokens"
        fig.update_layout(title=dict(text=title, font=dict(size=14)), xaxis_title="visual tokens", yaxis_title="ms per forward (median)", **LAYOUT)
        figs.append((title, fig))
    return figs


def published_figure(ref: pd.DataFrame, measured: pd.DataFrame, bench: str, styles: dict[str, Style]) -> go.Figure:
    """Published scores of one benchmark vs visual tokens (open markers), measured ones filled on top."""
    fig = go.Figure()
    r = ref[ref["benchmark"] == bench]
    for method, g in sorted(r.groupby("method"), key=lambda kv: kv[0]):
        st = styles.get(method) or Style("#555", "o", "circle")
        g = g.sort_values("visual_tokens")
        fig.add_trace(go.Scatter(x=g["visual_tokens"].tolist(), y=g["score"].tolist(), name=f"{method} (published)", mode="markers",
                                 marker=dict(color=st.color, symbol=f"{st.symbol}-open", size=10),
                                 hovertext=[f"<b>{method}</b> {t} tokens: {s} ({src})" for t, s, src in zip(g["visual_tokens"], g["score"], g["source"])], hoverinfo="text"))
    m = measured[(measured["benchmark"] == bench) & measured["score"].notna()]
    for method, g in sorted(m.groupby("method"), key=lambda kv: kv[0]):
        st = styles.get(method) or Style("#555", "o", "circle")
        fig.add_trace(go.Scatter(x=g["visual_tokens"].tolist(), y=(g["score"] * g["report_scale"]).tolist(), name=f"{method} (measured)", mode="markers",
                                 marker=dict(color=st.color, symbol=st.symbol, size=11)))
    fig.update_layout(title=dict(text=f"{bench}: published scores by visual tokens kept", font=dict(size=14)), xaxis_title="visual tokens",
                      yaxis_title="score (paper units)", **LAYOUT)
    return fig
