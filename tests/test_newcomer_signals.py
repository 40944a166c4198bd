"""What a newcomer sees (issue 28): progress with an ETA, one W&B line per run, CPU latency labelled
indicative with its spread and host load (and no misleading latency Pareto plot), and a retention_pct
that says which baseline run is missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.aggregate import aggregate, baseline_notes, leaderboard_full
from bench.report import latency_left_out, paper_table

ROOT = Path(__file__).resolve().parent.parent


def rec(method, ratio, score, run_id, ms=10.0, iqr=1.0, device="cpu", load=0.5, limit=None, n=100, bench="synthvqa"):
    return {
        "status": "completed", "model": "m", "method": method, "ratio": ratio, "benchmark": bench, "run_id": run_id,
        "primary_metric": "exact_match", "accuracy_measured": True, "n_samples": n, "limit": limit,
        "metrics": {"exact_match": {"value": score, "stderr": None, "higher_is_better": True}},
        "efficiency": {"visual_tokens_kept": 576 * (1 - ratio), "tflops_prefill": 1.0 - ratio, "prefill_ms": ms, "prefill_ms_iqr": iqr,
                       "host_load": load, "kv_cache_bytes": 2**20, "device": device},
        "provenance": {"model_fingerprint": "w"}, "config": {"benchmark": {"report_scale": 100}}, "finished_at": "2026-01-01",
    }


# ----------------------------------------------------------------------------- progress
def test_sweep_progress_line_has_an_eta(capsys):
    from bench.cli import Session

    s = Session(jobs=4)
    s.started -= 30  # 30 s into the sweep
    s.tick()
    err = capsys.readouterr().err
    assert err.startswith("[bench] sweep:") and "1/4" in err and "<01:30" in err, err  # 3 jobs left at 30 s each
    Session().tick()  # not a local sweep: silent
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_local_sweep_shows_evaluation_and_sweep_progress(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "bench", "run", "-m", "method=none,random", "ratio=0.5", "benchmark.limit=2", "measure=quick",
                        "logger=none", f"results_dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 'mr'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"\[bench\] sweep:\s+50%.*1/2 \[\d\d:\d\d<\d\d:\d\d", r.stderr), r.stderr[-3000:]
    assert re.search(r"\[bench\] sweep:\s+100%.*2/2", r.stderr)
    # the evaluation's own bar: answered/total with elapsed<remaining
    assert re.search(r"tiny_llava_synth/random r=0\.5 b=\d+: +\d+%.*\d/2 \[\d\d:\d\d<\d\d:\d\d", r.stderr), r.stderr[-3000:]
    # the run line: CPU latency with its spread, host load and the word indicative
    assert re.search(r"prefill=[\d.]+ ms \(wall_clock, IQR [\d.]+ ms, host load [\d.]+/core, CPU: indicative only\)", r.stdout), r.stdout[-2000:]
    rec = json.loads(next((tmp_path / "r" / "runs").glob("*/record.json")).read_text())
    assert rec["efficiency"]["host_load"] is not None and any("indicative on CPU" in n for n in rec["notes"])


# ----------------------------------------------------------------------------- W&B
def _wandb_run(tmp_path, capfd, **logger) -> tuple[str, str | None]:
    from bench.wandb_sink import log_run

    cfg = {"name": "wandb", "mode": "offline", "project": "tokenprune-bench", "dir": str(tmp_path), **logger}
    d = log_run(rec("pool", 0.5, 0.8, "abc"), cfg)
    out = capfd.readouterr()
    return out.out + out.err, d


def test_wandb_prints_one_line_per_run(tmp_path, capfd):
    text, d = _wandb_run(tmp_path, capfd)
    assert d is not None and Path(d).is_dir()
    assert [line for line in text.splitlines() if line.startswith("wandb:")] == [], text
    lines = [line for line in text.splitlines() if "W&B" in line]
    assert len(lines) == 1 and lines[0].startswith("[bench] W&B run: offline run ") and "wandb sync" in lines[0]


@pytest.mark.slow
def test_wandb_verbose_shows_its_own_output(tmp_path, capfd):
    text, d = _wandb_run(tmp_path, capfd, verbose=True)
    assert d is not None and len([line for line in text.splitlines() if line.startswith("wandb:")]) > 5, text
    assert "[bench] W&B" not in text


# ----------------------------------------------------------------------------- CPU latency
def test_cpu_latency_left_out_when_its_spread_exceeds_the_differences():
    # the case: under load the timings are noise (IQRs larger than the range of the medians)
    noisy = leaderboard_full([rec("none", 0.0, 0.9, "a", ms=467, iqr=900), rec("pool", 0.5, 0.8, "b", ms=600, iqr=40)])
    why = latency_left_out(noisy)
    assert why and "IQR up to 900.0 ms" in why and "133.0 ms" in why
    clear = leaderboard_full([rec("none", 0.0, 0.9, "a", ms=467, iqr=5), rec("pool", 0.5, 0.8, "b", ms=300, iqr=8)])
    assert latency_left_out(clear) is None
    gpu = leaderboard_full([rec("none", 0.0, 0.9, "a", ms=4, iqr=9, device="NVIDIA H100"), rec("pool", 0.5, 0.8, "b", ms=3, iqr=9, device="NVIDIA H100")])
    assert latency_left_out(gpu) is None  # CUDA-event timings are not second-guessed
    unknown = leaderboard_full([rec("none", 0.0, 0.9, "a", iqr=None), rec("pool", 0.5, 0.8, "b", ms=3, iqr=None)])
    assert latency_left_out(unknown) is None  # no spread recorded (older records): cannot be judged, kept and labelled


def _write(tmp_path: Path, recs: list[dict]) -> None:
    for r in recs:
        (tmp_path / "runs" / r["run_id"]).mkdir(parents=True)
        (tmp_path / "runs" / r["run_id"] / "record.json").write_text(json.dumps(r))


def test_aggregate_leaves_out_a_noisy_cpu_latency_plot_and_says_why(tmp_path, capsys):
    _write(tmp_path, [rec("none", 0.0, 0.9, "a", ms=467, iqr=900, load=3.1), rec("pool", 0.5, 0.8, "b", ms=600, iqr=40, load=3.1)])
    aggregate(tmp_path, site=False)
    out = capsys.readouterr().out
    assert "latency plot of m / synthvqa left out: CPU latency spread" in out
    assert (tmp_path / "plots" / "m__synthvqa__tflops.png").exists() and not (tmp_path / "plots" / "m__synthvqa__latency.png").exists()
    lb = pd.read_csv(tmp_path / "leaderboard.csv")
    assert list(lb["prefill_ms_iqr"]) == [900.0, 40.0] and list(lb["host_load"]) == [3.1, 3.1]


def test_cpu_latency_plot_is_labelled_indicative_with_its_spread_and_load():
    from bench.report import pareto_figure

    df = leaderboard_full([rec("none", 0.0, 0.9, "a", ms=467, iqr=5, load=0.42), rec("pool", 0.5, 0.8, "b", ms=300, iqr=8, load=0.42)])
    fig, _, _ = pareto_figure(df.assign(report_scale=100.0), "m", "synthvqa", "prefill_ms")
    label = fig.axes[0].get_xlabel()
    assert "indicative only" in label and "IQR" in label and "host load up to 0.42/core" in label
    # the horizontal error bars are the IQRs
    bars = [c for c in fig.axes[0].collections if c.__class__.__name__ == "LineCollection"]
    widths = sorted(round(float(seg[1][0] - seg[0][0]), 3) for c in bars for seg in c.get_segments() if seg[0][1] == seg[1][1])
    assert widths == [5.0, 8.0], widths


def test_run_line_labels_cpu_latency():
    from bench.runner import _latency

    assert _latency({"prefill_ms": 411.84, "prefill_ms_iqr": 12.3, "timer": "wall_clock", "device": "cpu", "host_load": 0.95}) == \
        "prefill=411.8 ms (wall_clock, IQR 12.3 ms, host load 0.95/core, CPU: indicative only)"
    assert _latency({"prefill_ms": 4.2, "prefill_ms_iqr": 0.01, "timer": "cuda_events", "device": "NVIDIA H100"}) == "prefill=4.2 ms (cuda_events, IQR 0.0 ms)"


def test_host_load_is_per_core():
    from bench.measure.efficiency import host_load

    v = host_load()
    assert v is not None and abs(v - round(os.getloadavg()[0] / os.cpu_count(), 2)) < 0.5


# ----------------------------------------------------------------------------- retention
def test_retention_says_which_baseline_to_run(tmp_path, capsys):
    recs = [rec("pool", 0.5, 0.8, "b", limit=20, n=20), rec("random", 0.5, 0.7, "c", limit=20, n=20), rec("none", 0.0, 0.9, "a")]  # baseline on the full split only
    df = leaderboard_full(recs)
    hint = df.set_index("method")["baseline_hint"]
    assert pd.isna(hint["none"])
    assert hint["pool"] == ("no `none` baseline of m on synthvqa with the same 20 samples, same data: "
                            "python -m bench run method=none model=m benchmark=synthvqa benchmark.limit=20")
    assert baseline_notes(df) == [f"retention_pct empty for 2 row(s): {hint['pool']}"]
    assert "Retention is empty (–) where the unpruned baseline is missing:\n- no `none` baseline" in paper_table(df, "m")
    _write(tmp_path, recs)
    aggregate(tmp_path, site=False)
    assert "[bench] note: retention_pct empty for 2 row(s): no `none` baseline" in capsys.readouterr().out
    # with the baseline run, no hint
    ok = leaderboard_full([rec("pool", 0.5, 0.8, "b", limit=20, n=20), rec("none", 0.0, 0.9, "a2", limit=20, n=20)])
    assert ok["baseline_hint"].isna().all() and baseline_notes(ok) == []


def test_site_latency_figure_is_labelled_and_left_out_when_noisy(tmp_path):
    from bench.plotstyle import method_styles
    from bench.site.figures import pareto_figure as site_figure

    df = leaderboard_full([rec("none", 0.0, 0.9, "a", ms=467, iqr=5), rec("pool", 0.5, 0.8, "b", ms=300, iqr=8)])
    fig = site_figure(df, "prefill_ms", method_styles(df["method"].unique()), "t", {})
    assert "indicative only" in fig.layout.xaxis.title.text
    assert sorted(t.error_x.array[0] for t in fig.data if t.error_x is not None and t.error_x.array is not None) == [2.5, 4.0]
    from bench.site.build import build_site

    noisy = [rec("none", 0.0, 0.9, "a", ms=467, iqr=900), rec("pool", 0.5, 0.8, "b", ms=600, iqr=40)]
    built = build_site(leaderboard_full(noisy), noisy, tmp_path, kept=False)
    assert "pareto__m__synthvqa__tflops_prefill" in built.figures
    assert "pareto__m__synthvqa__prefill_ms" not in built.figures, "a noisy CPU latency figure was built"
    built = build_site(df, [rec("none", 0.0, 0.9, "a", ms=467, iqr=5), rec("pool", 0.5, 0.8, "b", ms=300, iqr=8)], tmp_path, kept=False)
    assert "pareto__m__synthvqa__prefill_ms" in built.figures
