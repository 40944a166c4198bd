"""benchmarks/compare_timings.py: the regression check's join of two timing CSVs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["method", "mode", "batch", "kept", "median_ms", "per_image_ms", "p25_ms", "p75_ms", "gpu"]


def write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def row(method, mode, med, p25, p75, gpu="NVIDIA H200"):
    return {"method": method, "mode": mode, "batch": 1, "kept": 64, "median_ms": med, "per_image_ms": med, "p25_ms": p25, "p75_ms": p75, "gpu": gpu}


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_timings.py"), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_ratio_and_spread(tmp_path):
    old = write(tmp_path / "old.csv", [row("a", "eager", 1.0, 0.9, 1.1), row("b", "graph", 0.2, 0.19, 0.21), row("c", "graph", "", "", "")])
    new = write(tmp_path / "new.csv", [row("a", "eager", 1.15, 1.1, 1.2), row("b", "graph", 0.3, 0.29, 0.31), row("c", "graph", "", "", ""),
                                       row("d", "eager", 2.0, 1.9, 2.1)])
    r = run("--old", old, "--new", new, "--out", tmp_path / "cmp.csv")
    assert r.returncode == 0, r.stderr
    got = {x["method"]: x for x in csv.DictReader((tmp_path / "cmp.csv").open())}
    assert got["a"]["ratio"] == "1.15" and got["a"]["within_spread"] == "True"  # |0.15| <= 0.2 + 0.1
    assert got["b"]["ratio"] == "1.5" and got["b"]["within_spread"] == "False"  # |0.1| > 0.02 + 0.02
    assert got["c"]["ratio"] == "" and got["d"]["old"] == ""  # unmeasured and new-only rows stay, without a ratio


def test_different_cards_are_refused(tmp_path):
    old = write(tmp_path / "old.csv", [row("a", "eager", 1.0, 0.9, 1.1, gpu="NVIDIA H100 80GB HBM3")])
    new = write(tmp_path / "new.csv", [row("a", "eager", 1.0, 0.9, 1.1)])
    r = run("--old", old, "--new", new, "--out", tmp_path / "cmp.csv")
    assert r.returncode == 2 and "different cards" in r.stderr and not (tmp_path / "cmp.csv").exists()


def test_missing_file_is_refused(tmp_path):
    r = run("--old", tmp_path / "nope.csv", "--new", tmp_path / "nope.csv", "--out", tmp_path / "cmp.csv")
    assert r.returncode == 2 and "no such file" in r.stderr
