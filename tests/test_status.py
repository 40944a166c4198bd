"""``python -m bench status``: stale claims and refused combinations shown as such, and a sweep's own
overrides read from its multirun directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.status import status, sweep_dir_overrides

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _rows(st: dict) -> dict[str, dict]:
    return {r["method"]: r for r in st["rows"]}


def test_refused_combination_is_not_missing(tmp_path):
    """TransPrune cannot reach 29 tokens (layer mean) in the tiny model's 6 layers: `run` exits 2 for it,
    so status says refused, with the reason; the runnable one stays missing."""
    st = status(["method=transprune,random", "ratio=0.95", f"results_dir={tmp_path}"])
    rows = _rows(st)
    assert rows["transprune"]["status"] == "refused" and "cannot reach 29 visual tokens" in rows["transprune"]["error"]
    assert rows["random"]["status"] == "missing"
    assert st["counts"] == {"refused": 1, "missing": 1}
    assert not (tmp_path / "runs").exists(), "status must not write"


def test_stale_and_live_claims(tmp_path):
    args = ["method=random,pool,divprune", "ratio=0.5", f"results_dir={tmp_path}"]
    rows = _rows(status(args))
    runs = tmp_path / "runs"
    # an empty claim (what a full disk leaves): stale, the next run takes it over
    (runs / rows["random"]["run_id"]).mkdir(parents=True)
    (runs / rows["random"]["run_id"] / ".claim").touch()
    # a live holder (this process, heartbeat now): running, though no record is written yet
    (runs / rows["pool"]["run_id"]).mkdir(parents=True)
    (runs / rows["pool"]["run_id"] / ".claim").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(), "token": "t"}))
    # a running marker whose job is gone, with its dead claim: killed (the record says more than the claim)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = runs / rows["divprune"]["run_id"]
    d.mkdir(parents=True)
    job = {"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time(), "token": "u"}
    (d / "record.json").write_text(json.dumps({"run_id": d.name, "status": "running", "job": job, "error": None}))
    (d / ".claim").write_text(json.dumps(job))
    st = _rows(status(args))
    assert st["random"]["status"] == "stale" and "empty claim" in st["random"]["error"]
    assert st["pool"]["status"] == "running"
    assert st["divprune"]["status"] == "stale" and "job is gone" in st["divprune"]["error"]


def _hydra_like_sweep_dir(path: Path, task: list[str]) -> Path:
    """A multirun directory as Hydra's BasicSweeper leaves it (multirun.yaml; job dirs without .hydra,
    since conf/config.yaml sets output_subdir: null)."""
    path.mkdir(parents=True)
    doc = {"hydra": {"mode": "MULTIRUN", "overrides": {"hydra": [f"hydra.sweep.dir={path}", "hydra.mode=MULTIRUN"], "task": task}}, "ratio": 0.5}
    (path / "multirun.yaml").write_text(yaml.safe_dump(doc))
    for i in range(2):
        (path / str(i)).mkdir()
    return path


def test_sweep_overrides_are_read_from_the_multirun_directory(tmp_path):
    task = ["method=none,random", "ratio=0.5", "benchmark.limit=4", f"results_dir={tmp_path / 'r'}", "logger.api_key=${oc.env:BENCH_SECRET_0}"]
    mr = _hydra_like_sweep_dir(tmp_path / "multirun" / "2026-12-07_12-00-00", task)
    assert sweep_dir_overrides(mr) == task[:-1], "a hidden secret's interpolation is left out"
    assert sweep_dir_overrides(mr / "multirun.yaml") == task[:-1]
    assert sweep_dir_overrides(tmp_path) is None
    # without multirun.yaml: the jobs' .hydra/overrides.yaml, merged back into comma lists
    jobs = tmp_path / "jobs"
    for i, m in enumerate(("none", "random")):
        (jobs / str(i) / ".hydra").mkdir(parents=True)
        (jobs / str(i) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"method={m}", "ratio=0.5"]))
    assert sweep_dir_overrides(jobs) == ["method=none,random", "ratio=0.5"]


@pytest.mark.slow
def test_status_command_with_a_sweep_dir_needs_no_retyping(tmp_path):
    r_dir = tmp_path / "r"
    mr = _hydra_like_sweep_dir(tmp_path / "mr", ["method=none,random", "ratio=0.5", "benchmark.limit=4", f"results_dir={r_dir}"])
    with_args = bench("status", "method=none,random", "ratio=0.5", "benchmark.limit=4", f"results_dir={r_dir}")
    from_dir = bench("status", str(mr))
    assert from_dir.returncode == 0, from_dir.stderr[-2000:]
    assert "sweep overrides from" in from_dir.stdout
    rows = [line for line in with_args.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 2 and rows == [line for line in from_dir.stdout.splitlines() if line.startswith("  ")]
    # overrides after the directory apply on top (here: another limit, so other run ids)
    other = bench("status", str(mr), "benchmark.limit=8")
    assert [line.split()[1] for line in other.stdout.splitlines() if line.startswith("  ")] != [line.split()[1] for line in rows]


def test_status_of_a_directory_that_is_no_sweep_exits_2(tmp_path):
    bad = bench("status", str(tmp_path))
    assert bad.returncode == 2 and "is not a sweep directory" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_status_of_a_real_sweep_dir(tmp_path):
    """A real local sweep, then `status <its multirun dir>`: every run done, no override retyped."""
    mr, results = tmp_path / "mr", tmp_path / "r"
    r = bench("run", "-m", "method=none,random", "ratio=0.5", "benchmark.limit=2", "measure=quick", "logger=none",
              f"results_dir={results}", f"hydra.sweep.dir={mr}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    st = bench("status", str(mr))
    assert st.returncode == 0 and "2 runs: 2 done, 0 failed, 0 running, 0 missing" in st.stdout, st.stdout + st.stderr


def test_status_names_a_question_conditioned_run_as_run_does(tmp_path):
    """CDPruner's run id also hashes the CLIP text tower's weights: status must compute the same id as `run`,
    or a recorded CDPruner run reads as missing."""
    from bench.build import build_run, compose_config

    st = status(["method=cdpruner,random", "ratio=0.5", f"results_dir={tmp_path}"])
    for method in ("cdpruner", "random"):
        want = build_run(compose_config([f"method={method}", "ratio=0.5", f"results_dir={tmp_path}"])).run_id
        assert _rows(st)[method]["run_id"] == want
