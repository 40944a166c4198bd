#!/usr/bin/env python
"""LLaVA-1.5-7B efficiency leaderboard on a GPU: every method at 192/128/64 kept tokens plus the
baseline, batch 1 and 16, through the harness's own efficiency-only runs
(``python -m bench run model=llava15_7b model.weights=random measure=efficiency ...``, in-process).

Random weights: FLOPs, latency and KV-cache size do not depend on weight values (gpu.md); accuracy
is absent from these records. Writes one record per run under ``--results-dir`` and
``--csv`` (one row per method x kept x batch, rewritten after every run) and ``--plot``.

Latency modes (``--modes``): eager, CUDA-graph replay, and the compiled prefill replayed in a CUDA
graph (``compiled_graph:<--compile-variant>``, see ``bench.measure.latency.CompiledPrefill``).
``--merge`` keeps the rows of an earlier CSV that this invocation does not re-measure, so a sweep
too long for one GPU call can be split (e.g. by ``--batches`` or ``--methods``) and joined.

    python benchmarks/efficiency_leaderboard.py --csv results/efficiency/llava15_7b_h100.csv \\
        --plot results/efficiency/llava15_7b_h100.png
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def driver_version() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def row(rec: dict, requested: int, driver: str | None) -> dict:
    """One CSV row. ``budget`` is where the row belongs: the requested budget where the run met it, else the
    count it measured (``budget_measure`` says which count: kept tokens, the layer mean, or the count after
    the first pruning stage); ``budget_requested`` is what was asked for (the merge key)."""
    e = rec["efficiency"]
    lat = e.get("latency") or {}
    roof = e.get("roofline") or {}
    p = rec["provenance"]

    def ms(stage):
        return (lat.get(stage) or {}).get("median_ms")

    def iqr(stage):
        return (lat.get(stage) or {}).get("iqr_ms")

    comp = lat.get("prefill_compiled_graph") or {}
    floor = roof.get("llm_prefill_floor_ms")

    def floor_x(stage):
        t = ms(stage)
        return None if (t is None or not floor) else round(t / floor, 3)

    modes = [m for m, stage in (("eager", "prefill_eager"), ("cuda_graph", "prefill_graph")) if stage in lat]
    if comp:
        modes.append(f"compiled_graph({comp.get('variant')})")

    return {
        "method": rec["method"],
        "budget_requested": requested,
        "budget": requested if e.get("budget_met") else e.get("budget_measured"),
        "budget_mode": e.get("budget_mode"),
        "budget_measure": e.get("budget_measure"),
        "budget_measured": e.get("budget_measured"),
        "budget_met": e.get("budget_met"),
        "visual_tokens": e["visual_tokens_kept"],
        "visual_tokens_layer_mean": e["visual_tokens_layer_mean"],
        "batch": e["measured_batch_size"],
        "tflops_prefill_counted": e["tflops_prefill"],
        "tflops_prefill_analytic_no_selection": e.get("tflops_prefill_analytic_no_selection"),
        "tflops_paper_convention": e.get("tflops_prefill_paper_convention"),
        "paper_convention_text_tokens": e.get("paper_convention_text_tokens"),
        "vision_ms": ms("vision_encoder"),
        "selection_ms": ms("selection"),
        "selection_graph_ms": ms("selection_graph"),
        "prefill_eager_ms": ms("prefill_eager"),
        "prefill_eager_iqr_ms": iqr("prefill_eager"),
        "prefill_graph_ms": ms("prefill_graph"),
        "prefill_graph_iqr_ms": iqr("prefill_graph"),
        "prefill_compiled_graph_ms": ms("prefill_compiled_graph"),
        "prefill_compiled_graph_iqr_ms": iqr("prefill_compiled_graph"),
        "compile_variant": comp.get("variant"),
        "compile_s": comp.get("compile_s"),
        "compiled_max_abs_diff_vs_eager": comp.get("max_abs_diff_vs_eager"),
        "prefill_graph_floor_x": floor_x("prefill_graph"),
        "prefill_compiled_graph_floor_x": floor_x("prefill_compiled_graph"),
        "decode_step_ms": ms("decode_step"),
        "decode_tokens_per_s": (lat.get("decode_step") or {}).get("tokens_per_s"),
        "llm_prefill_floor_ms": roof.get("llm_prefill_floor_ms"),
        "matmul_tflops_per_s": roof.get("matmul_tflops_per_s"),
        "copy_gb_per_s": roof.get("copy_gb_per_s"),
        "kv_cache_mb": None if e.get("kv_cache_bytes") is None else e["kv_cache_bytes"] / 2**20,
        "peak_mem_gb": None if e.get("peak_mem_bytes") is None else e["peak_mem_bytes"] / 2**30,
        "gpu": e["device"],
        "driver": driver,
        "torch": p["versions"]["torch"],
        "transformers": p["versions"]["transformers"],
        "dtype": p["dtype"],
        "attn_backend": p["attn_implementation"],
        "modes": "+".join(modes),
        "timer": e["timer"],
        "repeats": e["timing_repeats"],
        "run_id": rec["run_id"],
    }


def write_table(rows: list[dict], path: Path, merge: Path | None = None, drop: tuple[str, ...] = ()):
    """Rows of this invocation, plus those of ``merge`` for (method, kept, batch) not measured here, less the
    merged rows of the methods in ``drop`` (stale: measured under defaults that have changed since); the file
    is replaced atomically. Rows measured on another GPU are never mixed in (``bench.measure.gpu_csv.rows_to_keep``:
    exit 2, nothing written)."""
    import pandas as pd

    from bench.measure.gpu_csv import replaced_atomically, rows_to_keep

    df = pd.DataFrame(rows)
    if merge is not None and merge.exists():
        old = pd.read_csv(merge)
        old = old.rename(columns={"kept_nominal": "budget_requested"})  # CSVs written before the budget fields
        old = old.iloc[rows_to_keep(rows, old.to_dict("records"), key=["method", "budget_requested", "batch"], device="gpu",
                                    drop=drop, source=f"--merge {merge}")]
        df = pd.concat([old, df], ignore_index=True).sort_values(["batch", "method", "budget_requested"], ascending=[True, True, False], ignore_index=True)
    with replaced_atomically(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def plot(df, path: Path) -> None:
    """Prefill latency (eager, CUDA graph) and TFLOPs vs visual tokens, batch 1 and 16.

    x is the mean number of visual tokens entering the LLM layers, so in-LLM methods (which keep
    all 576 for their first layers) sit where their compute is; the dashed line is the roofline
    floor of the LLM prefill.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(df["batch"].unique())
    cols = ["prefill_eager_ms", "prefill_graph_ms", "tflops_prefill_counted"]
    if "prefill_compiled_graph_ms" in df and df["prefill_compiled_graph_ms"].notna().any():
        cols.insert(2, "prefill_compiled_graph_ms")
    nlat = len(cols) - 1
    fig, axes = plt.subplots(len(batches), len(cols), figsize=(5.7 * len(cols), 4.6 * len(batches)), dpi=110, squeeze=False)
    for row, batch in zip(axes, batches):
        d = df[df["batch"] == batch]
        for method, g in sorted(d.groupby("method"), key=lambda kv: kv[0]):
            g = g.sort_values("visual_tokens_layer_mean")
            mk = dict(marker="*", markersize=12, linestyle="none") if method == "none" else dict(marker="o", markersize=4)
            for ax, col in zip(row, cols):
                if g[col].notna().any():
                    ax.plot(g["visual_tokens_layer_mean"], g[col], label=method, **mk)
        floor = d[d["method"].isin(["none", "pool"])].sort_values("visual_tokens_layer_mean")
        for ax in row[:nlat]:
            ax.plot(floor["visual_tokens_layer_mean"], floor["llm_prefill_floor_ms"], "k--", linewidth=1, label="roofline floor")
            ax.set_ylabel(f"ms per forward (batch {batch})")
        row[0].set_title(f"LLM prefill, eager (batch {batch})")
        row[1].set_title(f"LLM prefill, CUDA-graph replay (batch {batch})")
        if nlat == 3:
            variant = ", ".join(sorted(d["compile_variant"].dropna().unique()))
            row[2].set_title(f"LLM prefill, torch.compile ({variant}) + CUDA graph (batch {batch})")
        row[-1].set_title("prefill TFLOPs per sample (counted: vision + selection + LLM)")
        for ax in row:
            ax.set_xlabel("visual tokens entering the LLM layers (mean)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"LLaVA-1.5-7B shapes, random weights, {df['gpu'].iloc[0]}, fp16, SDPA")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, default=ROOT / "results/efficiency/llava15_7b_h100.csv")
    ap.add_argument("--plot", type=Path, default=ROOT / "results/efficiency/llava15_7b_h100.png")
    ap.add_argument("--results-dir", default=str(ROOT / "results"))
    ap.add_argument("--model", default="llava15_7b")
    ap.add_argument("--methods", nargs="*", help="default: every conf/method/*.yaml")
    ap.add_argument("--kept", nargs="*", type=int, default=[192, 128, 64])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--modes", nargs="*", default=["eager", "graph", "compiled_graph"], help="latency modes (measure.modes)")
    ap.add_argument("--compile-variant", default=None, help="torch.compile variant of compiled_graph (bench.measure.latency.COMPILE_VARIANTS; default: its DEFAULT_COMPILE_VARIANT)")
    ap.add_argument("--merge", type=Path, help="an earlier CSV: its rows not re-measured here are kept")
    ap.add_argument("--drop", nargs="*", default=[], help="methods whose rows in --merge are stale (their defaults changed): removed, not kept")
    ap.add_argument("--no-measure", action="store_true", help="measure nothing: only rewrite --merge into --csv (with --drop); no GPU needed")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides (e.g. model.source=... for a tiny model)")
    args = ap.parse_args()
    from bench.measure.latency import DEFAULT_COMPILE_VARIANT

    variant = args.compile_variant or DEFAULT_COMPILE_VARIANT
    # the variant is spelled out in the mode, so it is part of the config (and of the run id)
    modes = [f"compiled_graph:{variant}" if m == "compiled_graph" else m for m in args.modes]
    modes_override = "measure.modes=[" + ",".join(f"'{m}'" for m in modes) + "]"

    from bench.build import ModelCache, compose_config
    from bench.errors import BenchError
    from bench.runner import execute

    methods = [] if args.no_measure else args.methods or sorted(p.stem for p in (ROOT / "conf/method").glob("*.yaml"))
    driver = driver_version()
    rows, failures = [], []
    models = ModelCache()  # one 7B model for the whole sweep
    t0 = time.time()
    for batch in args.batches:
        for method in methods:
            for kept in ([576] if method == "none" else args.kept):
                ratio = 0.0 if method == "none" else 1 - kept / 576
                ov = [f"model={args.model}", "model.weights=random", "measure=efficiency", f"method={method}", f"ratio={ratio}", f"measure.batch_size={batch}", f"measure.repeats={args.repeats}", modes_override, "logger=none", f"results_dir={args.results_dir}", *args.extra]
                try:
                    rec = execute(compose_config(ov), models=models).record
                    rows.append(row(rec, kept, driver))
                    r = rows[-1]
                    comp = f", compiled+graph {r['prefill_compiled_graph_ms']} ms (compile {r['compile_s']} s)" if r["compile_variant"] else ""
                    print(f"[eff] {method:>14} kept={kept:>3} b={batch:>2}: eager {r['prefill_eager_ms']} ms, graph {r['prefill_graph_ms']} ms{comp}, floor {r['llm_prefill_floor_ms']}, {r['tflops_prefill_counted']:.3f} TFLOPs ({time.time() - t0:.0f} s)", flush=True)
                    write_table(rows, args.csv, args.merge, tuple(args.drop))
                except BenchError as e:  # refused with a reason (e.g. a budget no schedule of the method reaches)
                    failures.append(f"{method} kept={kept} batch={batch}: refused: {e}")
                    print(f"[eff] REFUSED {failures[-1]}", flush=True)
                except Exception as e:  # noqa: BLE001 - one method failing must not hide the others
                    failures.append(f"{method} kept={kept} batch={batch}: {type(e).__name__}: {e}")
                    print(f"[eff] FAILED {failures[-1]}", flush=True)
    df = write_table(rows, args.csv, args.merge, tuple(args.drop))
    if not df.empty:
        plot(df, args.plot)
    print(f"[eff] {len(rows)} rows -> {args.csv}; {len(failures)} failures")
    for f in failures:
        print("  -", f)


if __name__ == "__main__":
    main()
