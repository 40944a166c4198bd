#!/usr/bin/env python
"""LLaVA-1.5-7B efficiency leaderboard on a GPU: every method at 192/128/64 kept tokens plus the
baseline, batch 1 and 16, through the harness's own efficiency-only runs
(``python -m bench run model=llava15_7b model.weights=random measure=efficiency ...``, in-process).

Random weights: FLOPs, latency and KV-cache size do not depend on weight values (gpu.md); accuracy
is absent from these records. Writes one record per run under ``--results-dir`` and
``--csv`` (one row per method x kept x batch) and ``--plot``.

    python scripts/efficiency_leaderboard.py --csv results/efficiency/llava15_7b_h100.csv \\
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


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(hcompose("config", overrides=overrides), resolve=True)


def driver_version() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def row(rec: dict, kept_nominal: int, driver: str | None) -> dict:
    e = rec["efficiency"]
    lat = e.get("latency") or {}
    roof = e.get("roofline") or {}
    p = rec["provenance"]

    def ms(stage):
        return (lat.get(stage) or {}).get("median_ms")

    def iqr(stage):
        return (lat.get(stage) or {}).get("iqr_ms")

    return {
        "method": rec["method"],
        "kept_nominal": kept_nominal,
        "visual_tokens": e["visual_tokens_kept"],
        "visual_tokens_layer_mean": e["visual_tokens_layer_mean"],
        "batch": e["measured_batch_size"],
        "tflops_prefill_counted": e["tflops_prefill"],
        "tflops_prefill_analytic_no_selection": e.get("tflops_prefill_analytic_no_selection"),
        "tflops_paper_convention": e.get("tflops_prefill_paper_convention"),
        "vision_ms": ms("vision_encoder"),
        "selection_ms": ms("selection"),
        "prefill_eager_ms": ms("prefill_eager"),
        "prefill_eager_iqr_ms": iqr("prefill_eager"),
        "prefill_graph_ms": ms("prefill_graph"),
        "prefill_graph_iqr_ms": iqr("prefill_graph"),
        "decode_step_ms": ms("decode_step"),
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
        "modes": "eager+cuda_graph",
        "timer": e["timer"],
        "repeats": e["timing_repeats"],
        "run_id": rec["run_id"],
    }


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
    fig, axes = plt.subplots(len(batches), 3, figsize=(17, 4.6 * len(batches)), dpi=110, squeeze=False)
    for row, batch in zip(axes, batches):
        d = df[df["batch"] == batch]
        for method, g in sorted(d.groupby("method"), key=lambda kv: kv[0]):
            g = g.sort_values("visual_tokens_layer_mean")
            mk = dict(marker="*", markersize=12, linestyle="none") if method == "none" else dict(marker="o", markersize=4)
            for ax, col in zip(row, ("prefill_eager_ms", "prefill_graph_ms", "tflops_prefill_counted")):
                if g[col].notna().any():
                    ax.plot(g["visual_tokens_layer_mean"], g[col], label=method, **mk)
        floor = d[d["method"].isin(["none", "pool"])].sort_values("visual_tokens_layer_mean")
        for ax in row[:2]:
            ax.plot(floor["visual_tokens_layer_mean"], floor["llm_prefill_floor_ms"], "k--", linewidth=1, label="roofline floor")
            ax.set_ylabel(f"ms per forward (batch {batch})")
        row[0].set_title(f"LLM prefill, eager (batch {batch})")
        row[1].set_title(f"LLM prefill, CUDA-graph replay (batch {batch}; in-LLM hooks not capturable)")
        row[2].set_title("prefill TFLOPs per sample (counted: vision + selection + LLM)")
        for ax in row:
            ax.set_xlabel("visual tokens entering the LLM layers (mean)")
            ax.grid(alpha=0.3)
    axes[0][2].legend(fontsize=7, ncol=2)
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
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides (e.g. model.source=... for a tiny model)")
    args = ap.parse_args()

    import pandas as pd

    from bench.errors import BenchError
    from bench.runner import execute

    methods = args.methods or sorted(p.stem for p in (ROOT / "conf/method").glob("*.yaml"))
    driver = driver_version()
    rows, failures = [], []
    t0 = time.time()
    for batch in args.batches:
        for method in methods:
            for kept in ([576] if method == "none" else args.kept):
                ratio = 0.0 if method == "none" else 1 - kept / 576
                ov = [f"model={args.model}", "model.weights=random", "measure=efficiency", f"method={method}", f"ratio={ratio}", f"measure.batch_size={batch}", f"measure.repeats={args.repeats}", "logger=none", f"results_dir={args.results_dir}", *args.extra]
                try:
                    rec = execute(compose(ov))
                    rows.append(row(rec, kept, driver))
                    r = rows[-1]
                    print(f"[eff] {method:>14} kept={kept:>3} b={batch:>2}: eager {r['prefill_eager_ms']} ms, graph {r['prefill_graph_ms']} ms, {r['tflops_prefill_counted']:.3f} TFLOPs ({time.time() - t0:.0f} s)", flush=True)
                except (BenchError, Exception) as e:  # noqa: BLE001 - one method failing must not hide the others
                    failures.append(f"{method} kept={kept} batch={batch}: {type(e).__name__}: {e}")
                    print(f"[eff] FAILED {failures[-1]}", flush=True)
    df = pd.DataFrame(rows)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.csv, index=False)
    if not df.empty:
        plot(df, args.plot)
    print(f"[eff] {len(rows)} rows -> {args.csv}; {len(failures)} failures")
    for f in failures:
        print("  -", f)


if __name__ == "__main__":
    main()
