"""Outputs are atomic with normal permissions (issue 28): 16 concurrent ``aggregate`` processes rewrite the
leaderboard, tables, plots and site while this test reads them; no read ever sees a torn file."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _records(dest: Path) -> None:
    """Four committed records of each model: a small leaderboard with plots."""
    n: dict[str, int] = {}
    for p in sorted((ROOT / "results" / "runs").glob("*/record.json")):
        r = json.loads(p.read_text())
        if n.get(r["model"], 0) < 4:
            n[r["model"]] = n.get(r["model"], 0) + 1
            shutil.copytree(p.parent, dest / "runs" / p.parent.name)


def _whole(path: Path, data: bytes) -> str | None:
    """Why ``data`` is not a complete file of its kind, or None."""
    if path.suffix == ".png":
        return None if data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82") else "torn PNG"
    if path.suffix == ".html":
        return None if data.rstrip().endswith(b"</html>") else "torn HTML"
    if path.suffix == ".csv":
        text = data.decode()
        rows = list(csv.reader(io.StringIO(text)))
        return None if text.endswith("\n") and rows and all(len(r) == len(rows[0]) for r in rows) else "torn CSV"
    return None


@pytest.mark.slow
def test_concurrent_aggregates_never_show_a_torn_file(tmp_path):
    results = tmp_path / "results"
    _records(results)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-c", "import os, sys; os.umask(0o022); from bench.cli import main; main(sys.argv[1:])",
           "aggregate", "--results-dir", str(results), "--no-kept"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    watched = [results / "leaderboard.csv", results / "site" / "index.html", *sorted((results / "plots").glob("*.png"))]
    assert len(watched) >= 3 and all(p.exists() for p in watched)
    for p in watched:  # 0o666 & ~0o022: teammates can read them
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(16)]
    reads, torn, deadline = 0, [], time.monotonic() + 240
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        for path in watched:
            data = path.read_bytes()  # the file exists throughout: os.replace swaps it, never removes it
            reads += 1
            why = _whole(path, data)
            if why:
                torn.append(f"{path.name}: {why}")
    for p in procs:
        assert p.wait(timeout=max(1, deadline - time.monotonic())) == 0, p.stderr.read().decode()[-2000:]
    assert reads > 100 and not torn, (reads, torn[:5])
    leftovers = [p for p in results.rglob("*.tmp")]
    assert not leftovers, leftovers
    for p in watched:
        assert p.stat().st_mode & 0o777 == 0o644
