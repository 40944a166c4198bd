"""Uncertainty (intervals, paired tests, tied ranks), readable static plots, and the site as a pure function of the records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import stats
from bench.aggregate import aggregate, leaderboard_full
from bench.uncertainty import STAT_COLUMNS, with_uncertainty

N = 100


def rec(method, ratio, run_id, correct, model="m", bench="synthvqa", tokens=None, tflops=None, when="2026-01-01T00:00:00", metric="exact_match", value=None):
    """A completed record and its per-document 0/1 scores (``correct``: doc ids answered right)."""
    n = N if isinstance(correct, set) else len(correct)
    scores = [1.0 if i in correct else 0.0 for i in range(n)] if isinstance(correct, set) else list(correct)
    tokens = tokens if tokens is not None else round(576 * (1 - ratio), 1)
    r = {
        "status": "completed", "model": model, "method": method, "ratio": ratio, "benchmark": bench, "run_id": run_id,
        "primary_metric": metric, "accuracy_measured": True, "n_samples": n, "limit": None,
        "metrics": {metric: {"value": float(np.mean(scores)) if value is None else value, "stderr": None, "higher_is_better": True}},
        "efficiency": {"visual_tokens_kept": tokens, "tflops_prefill": tflops if tflops is not None else 0.001 + tokens * 1e-5,
                       "prefill_ms": 10 + tokens / 50, "kv_cache_bytes": int(tokens * 4096), "device": "cpu", "budget_mode": None},
        "config": {"benchmark": {"report_scale": 100}}, "finished_at": when,
    }
    samples = [{"doc_id": i, "prediction": "x", metric: s} for i, s in enumerate(scores)]
    return r, samples


def write_results(root: Path, items) -> Path:
    for r, samples in items:
        d = root / "runs" / r["run_id"]
        d.mkdir(parents=True, exist_ok=True)
        (d / "record.json").write_text(json.dumps(r))
        if samples is not None:
            (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return root


def first(k):
    return set(range(k))


# ----------------------------------------------------------------------------- statistics
def test_wilson_interval_known_values():
    lo, hi = stats.wilson(85, 100)
    assert abs(lo - 0.7672) < 1e-4 and abs(hi - 0.9069) < 1e-4
    assert stats.wilson(0, 10)[0] == 0.0 and stats.wilson(10, 10)[1] == 1.0
    lo, hi, how = stats.score_interval([1.0] * 85 + [0.0] * 15)
    assert how == "wilson" and abs(lo - 0.7672) < 1e-4


def test_mcnemar_exact_equals_scipy_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 5), (3, 9), (10, 10), (1, 0), (17, 4), (0, 0)]:
        want = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
        assert abs(stats.mcnemar_exact(b, c) - want) < 1e-12, (b, c)


def test_paired_test_uses_discordant_pairs_only():
    x = np.array([1] * 50 + [0] * 50, dtype=float)
    y = x.copy()
    y[:8] = 0  # x right where y is wrong on 8 documents, never the reverse
    d, p, test = stats.paired_test(x, y)
    assert test == "mcnemar_exact" and abs(d - 0.08) < 1e-12 and abs(p - 2 / 2**8) < 1e-12
    # the same marginal accuracies with 8 discordant pairs each way: no evidence at all
    y2 = x.copy()
    y2[:8], y2[50:58] = 0, 1
    assert stats.paired_test(x, y2)[1] == 1.0


def test_bootstrap_for_non_binary_scores_is_deterministic():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    lo, hi, how = stats.score_interval(a)
    assert how == "bootstrap" and lo < a.mean() < hi
    assert stats.score_interval(a) == (lo, hi, how)
    d, p, test = stats.paired_test(a + 0.2, a + rng.normal(0, 0.05, 200))
    assert test == "paired_bootstrap" and p < 0.01 and abs(d - 0.2) < 0.02
    assert stats.paired_test(a, a)[1] == 1.0


def test_tied_ranks_share_a_rank_when_intervals_overlap():
    # A [0.9, 0.97], B [0.85, 0.95] overlap -> both 1; C [0.6, 0.8] is below both -> 3; D overlaps C only -> 3
    assert stats.tied_ranks([0.9, 0.85, 0.6, 0.55], [0.97, 0.95, 0.8, 0.7]) == [1, 1, 3, 3]
    assert stats.tied_ranks([0.1, 0.3], [0.2, 0.4], higher_is_better=False) == [1, 2]


# ----------------------------------------------------------------------------- uncertainty columns
def test_uncertainty_columns_from_samples(tmp_path):
    items = [
        rec("none", 0.0, "b0", first(90)),
        rec("pool", 0.5, "p1", first(88)),  # 2 fewer right, p = 0.5
        rec("random", 0.9, "r1", first(60)),  # 30 fewer: significant
        rec("fastv", 0.9, "f1", first(59)),
    ]
    write_results(tmp_path, items)
    records = [r for r, _ in items]
    df = with_uncertainty(leaderboard_full(records), records, tmp_path).set_index("run_id")
    assert list(df["method"]) == ["none", "pool", "random", "fastv"]
    lo, hi = stats.wilson(88, 100)
    assert abs(df.at["p1", "score_ci_low"] - lo) < 1e-6 and abs(df.at["p1", "score_ci_high"] - hi) < 1e-6
    assert df.at["p1", "ci_method"] == "wilson" and df.at["p1", "paired_test"] == "mcnemar_exact"
    assert abs(df.at["p1", "delta_vs_baseline"] + 0.02) < 1e-9 and df.at["p1", "p_vs_baseline"] == 0.5 and not df.at["p1", "sig_vs_baseline"]
    assert df.at["r1", "sig_vs_baseline"] and df.at["r1", "p_vs_baseline"] < 1e-6
    assert df.at["b0", "delta_vs_baseline"] is None  # the baseline is not compared with itself
    # neighbour = the row ranked directly above
    assert df.at["f1", "neighbour_run_id"] == "r1" and abs(df.at["f1", "delta_vs_neighbour"] + 0.01) < 1e-9 and df.at["f1", "p_vs_neighbour"] == 1.0
    assert df.at["b0", "neighbour_run_id"] is None
    # none and pool overlap (tie at 1); random and fastv lie entirely below both (rank 3, tied)
    assert [df.at[r, "rank"] for r in ("b0", "p1", "r1", "f1")] == [1, 1, 3, 3]


def test_no_interval_without_per_document_means(tmp_path):
    mme, mme_s = rec("none", 0.0, "x0", [1.0, 0.0, 1.0, 1.0], bench="mme", metric="mme_total", value=1500.0)  # not a mean
    nos, _ = rec("pool", 0.5, "x1", first(70))
    write_results(tmp_path, [(mme, mme_s), (nos, None)])
    df = with_uncertainty(leaderboard_full([mme, nos]), [mme, nos], tmp_path).set_index("run_id")
    assert df.at["x0", "ci_method"] == "none: mme_total is not the mean of its per-document scores" and df.at["x0", "score_ci_low"] is None
    assert df.at["x1", "ci_method"] == "none: no samples.jsonl"
    assert df.at["x1", "rank"] == 1  # ranked on its point estimate


# ----------------------------------------------------------------------------- aggregate outputs
SIXTEEN = ["dart", "divprune", "fastervlm", "fastv", "hiprune", "pdrop", "pool", "prumerge", "prumerge_plus", "random",
           "sparsevlm", "tome", "transprune", "visionzip", "vispruner"]


def sixteen_methods():
    """none + 15 methods at 3 budgets, scores and compute in tight clusters (the hard case for labels)."""
    items = [rec("none", 0.0, "none0", first(95), tokens=576)]
    for i, m in enumerate(SIXTEEN):
        for j, ratio in enumerate((0.5, 0.75, 0.9)):
            items.append(rec(m, ratio, f"{m[:6]}{j}", first(93 - 3 * j - (i % 5)), tflops=0.002 - 0.0004 * j + i * 1e-6))
    return items


def test_static_plot_colours_markers_and_labels_do_not_overlap():
    from bench.plotstyle import _overlaps, method_styles
    from bench.report import pareto_figure

    items = sixteen_methods()
    records = [r for r, _ in items]
    full = leaderboard_full(records)
    styles = method_styles(full["method"].unique())
    assert len({s.color for s in styles.values()}) == 16  # 16 methods, 16 colours
    assert len({(s.color, s.marker) for s in method_styles([f"m{i}" for i in range(40)]).values()}) == 41  # + none
    fig, placed, skipped = pareto_figure(full, "m", "synthvqa", "tflops_prefill", styles)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    looks = {lab: (h[0].get_color() if isinstance(h, tuple) else h.lines[0].get_color(), h.lines[0].get_marker()) for h, lab in zip(handles, labels) if lab != "Pareto front"}
    assert len(looks) == 16 and len(set(looks.values())) == 16
    assert len(placed) == 4 and skipped == 0  # one label per budget: 576, 288, 144, 58 tokens
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in placed]
    for i in range(len(boxes)):
        for j in range(i):
            assert not _overlaps(boxes[i], boxes[j], pad=0), (placed[i].get_text(), placed[j].get_text())


def test_site_and_tables_are_a_pure_function_of_the_records(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    res = write_results(tmp_path / "results", sixteen_methods())
    (res / "efficiency").mkdir()
    pd.DataFrame([{"mode": "eager", "variant": "", "visual_tokens": t, "median_ms": 5 + t / 100, "iqr_ms": 0.1, "floor_ms": 2 + t / 300} for t in (64, 576)]).to_csv(res / "efficiency" / "probe.csv", index=False)
    aggregate(res, quiet=True, kept=["random"])
    files = {p: p.read_bytes() for p in res.rglob("*") if p.is_file() and "runs" not in p.parts}
    site = res / "site"
    for rel in ("index.html", "published.html", "efficiency.html", "methods/random.html", "methods/vispruner.html", "assets/plotly.min.js", "assets/site.js"):
        assert (site / rel) in files, rel
    assert len(list((site / "kept").glob("random__r*__doc*.png"))) == 9
    index = (site / "index.html").read_text()
    assert index.count("assets/plotly.min.js") == 1 and "cdn" not in index.lower()
    assert 'href="../runs/none0/record.json"' in index
    # the same statistics in the CSV and the markdown tables
    lb = pd.read_csv(res / "leaderboard.csv")
    assert list(lb.columns)[-len(STAT_COLUMNS):] == list(STAT_COLUMNS) and lb["score_ci_low"].notna().all()
    ranked = (res / "tables" / "m__synthvqa__ranked.md").read_text()
    lo, hi = stats.wilson(95, 100)
    assert f"| 95.0 [{lo * 100:.1f}, {hi * 100:.1f}] |" in ranked and "p=" in ranked
    assert f"95.0 [{lo * 100:.1f}, {hi * 100:.1f}]" in (res / "tables" / "m.md").read_text()
    # files get the permissions open() would give, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}
    # a stale file of an earlier build goes; everything else comes back byte for byte
    (site / "methods" / "gone.html").write_text("old")
    aggregate(res, quiet=True, kept=["random"])
    again = {p: p.read_bytes() for p in res.rglob("*") if p.is_file() and "runs" not in p.parts}
    assert again.keys() == files.keys()
    assert [p for p in files if files[p] != again[p]] == []


def test_a_shipped_site_keeps_its_pictures_on_any_cpu_and_redraws_a_tampered_one(tmp_path, monkeypatch):
    """A site directory whose ``kept/manifest.json`` has this code's key is reused without drawing (another CPU may
    round the tiny model's near ties otherwise, and would rewrite the committed pictures); a picture whose bytes differ
    from the manifest, or a manifest of other code, is drawn again. Every picture names the CPU that drew it."""
    import hashlib

    from bench.environment import cpu
    from bench.site import kept as kept_mod

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    res = write_results(tmp_path / "results", [rec("none", 0.0, "b0", first(90)), rec("random", 0.5, "r0", first(80))])
    aggregate(res, quiet=True, kept=["random"])
    kdir = res / "site" / "kept"
    man = json.loads((kdir / "manifest.json").read_text())
    pics = man["pictures"]["random"]
    assert man["key"] == kept_mod.cache_key() and len(pics) == 9 and {p["cpu"] for p in pics} == {cpu()}
    assert f"Drawn on {cpu()}" in (res / "site" / "methods" / "random.html").read_text()
    before = {p: p.read_bytes() for p in kdir.iterdir()}

    # a fresh machine: empty cache; the shipped pictures are used as they are, whatever this CPU would draw
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache2"))
    drawn = []
    real = kept_mod._compute
    monkeypatch.setattr(kept_mod, "_compute", lambda methods, cache: drawn.append(list(methods)) or real(methods, cache))
    other = b"\x89PNG other machine's picture"  # stands for a different rounding
    (kdir / "random__r0.5__doc0.png").write_bytes(other)
    man["pictures"]["random"][0]["sha256"] = hashlib.sha256(other).hexdigest()
    (kdir / "manifest.json").write_text(json.dumps(man))
    aggregate(res, quiet=True, kept=["random"])
    assert drawn == [] and (kdir / "random__r0.5__doc0.png").read_bytes() == other

    # tampered bytes (the manifest's hash no longer matches): drawn again, and the drawing is the original one
    (kdir / "random__r0.5__doc0.png").write_bytes(b"corrupt")
    aggregate(res, quiet=True, kept=["random"])
    assert drawn == [["random"]] and {p: p.read_bytes() for p in kdir.iterdir()} == before

    # a manifest of other code (another key): not reused
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache3"))
    (kdir / "manifest.json").write_text(json.dumps({**json.loads((kdir / "manifest.json").read_text()), "key": "0" * 16}))
    aggregate(res, quiet=True, kept=["random"])
    assert drawn == [["random"], ["random"]] and {p: p.read_bytes() for p in kdir.iterdir()} == before


def test_wandb_summary_gets_tables_figures_and_kept_pictures(tmp_path, monkeypatch):
    from bench.wandb_sink import read_offline_run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    items = [rec("none", 0.0, "b0", first(90)), rec("random", 0.5, "r0", first(80))]
    res = write_results(tmp_path / "results", items)
    aggregate(res, quiet=True, kept=["random"], wandb={"name": "wandb", "mode": "offline", "project": "t", "dir": str(tmp_path / "wb"), "group": "g"})
    import wandb

    wandb.teardown()  # the run's records reach the .wandb file when the service process flushes them
    (run,) = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    summary = read_offline_run(run)["summary"]
    assert summary["table/leaderboard/_type"] == "table-file"
    assert any(k.startswith("figure/pareto__m__synthvqa__tflops_prefill") for k in summary)
    kept = [k for k in summary if k.startswith("kept/kept__random__r0.5__doc0")]
    assert kept and summary[f"kept/kept__random__r0.5__doc0/_type"] == "image-file"
    table = json.loads(next((run / "files").rglob("leaderboard_*.table.json")).read_text())
    assert "score_ci_low" in table["columns"] and "p_vs_baseline" in table["columns"]


def test_catalog_reads_every_method_config():
    from bench.site.catalog import CONF_METHOD, method_catalog

    cat = method_catalog()
    assert sorted(cat) == sorted(p.stem for p in CONF_METHOD.glob("*.yaml"))
    assert cat["divprune"].paper == "https://arxiv.org/abs/2503.02175" and cat["divprune"].code == "https://github.com/vbdi/divprune"
    assert cat["fastv"].stage == "in_llm" and cat["fastv"].defaults["k_layer"] == 2
    # a port-dependent stage (a property: FlowCut) is read from an instance, never printed as "<property object at 0x..>",
    # whose address changed the committed site on every build
    assert {m.stage for m in cat.values()} <= {"none", "pre_llm", "in_vision", "in_llm"}
    assert cat["flowcut"].stage == "in_vision" and cat["tome"].stage == "in_vision"


@pytest.mark.slow
def test_committed_leaderboard_reports_and_site_are_what_aggregate_builds(tmp_path):
    """Aggregation is a pure function of the records: `bench aggregate` over a copy of the committed results/ writes
    the committed leaderboards, tables, plots and site byte for byte (a stale committed page, or one that differs per
    build, fails here rather than dirtying `git status` after `make demo`)."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    res = tmp_path / "results"
    shutil.copytree(root / "results", res)
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "bench", "aggregate", "--results-dir", str(res)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    built = ["leaderboard.csv", "leaderboards", "tables", "plots", "site"]
    def files(base: Path) -> dict[str, bytes]:
        out = {}
        for name in built:
            p = base / name
            for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
                if f.is_file():
                    out[str(f.relative_to(base))] = f.read_bytes()
        return out
    committed, rebuilt = files(root / "results"), files(res)
    assert sorted(rebuilt.keys() - committed.keys()) == [], "aggregate writes files that are not committed"
    assert sorted(committed.keys() - rebuilt.keys()) == [], "committed files that aggregate no longer writes"
    assert sorted(k for k in committed if committed[k] != rebuilt[k]) == []
