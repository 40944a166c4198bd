"""A failure after work has started (out of memory, disk full, SIGTERM) leaves a ``failed`` record and
never touches a completed one (issue 28).

Each case runs ``python -m bench run`` in a real subprocess with one function patched to fail the way the
fault does: ``torch.OutOfMemoryError`` from the model's generate step (inside lmms-eval), ``OSError(ENOSPC)``
when the run writes its outputs, and a real SIGTERM to a process in its accuracy pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

DRIVER = r"""
import errno, sys, time
import torch
mode, args = sys.argv[1], sys.argv[2:]
if mode == "oom":
    from bench.lmms_model import TokenPruneLlava
    def oom(self, chunk):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    TokenPruneLlava._generate = oom
elif mode == "enospc":  # the disk fills up once the answers are in: samples.jsonl cannot be written
    import bench.runner as runner
    def full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    runner.write_jsonl = full
elif mode == "slow":  # the accuracy pass is where SIGTERM (scancel, a time limit) usually lands
    from bench.lmms_model import TokenPruneLlava
    orig = TokenPruneLlava._generate
    def slow(self, chunk):
        print("GENERATING", flush=True)
        time.sleep(120)
        return orig(self, chunk)
    TokenPruneLlava._generate = slow
from bench.cli import main
main(["run", *args])
"""

ARGS = ["method=random", "ratio=0.5", "benchmark.limit=2", "benchmark.batch_size=1", "measure=quick", "logger=none", "device=cpu"]


def run(mode: str, results: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", DRIVER, mode, *ARGS, f"results_dir={results}", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def records(results: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (results / "runs").glob("*/record.json")}


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Path:
    """A results dir holding one completed record of the run every test fails."""
    results = tmp_path_factory.mktemp("completed") / "results"
    r = run("none", results)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = records(results).values()
    assert rec["status"] == "completed"
    return results


def _copy(src: Path, dst: Path) -> tuple[Path, bytes]:
    shutil.copytree(src, dst)
    (rid,) = records(dst)
    return dst / "runs" / rid / "record.json", (dst / "runs" / rid / "record.json").read_bytes()


def _no_leftovers(results: Path) -> None:
    left = [p for p in (results / "runs").rglob("*") if p.name == ".claim" or p.name.endswith(".tmp")]
    assert not left, left


def test_out_of_memory_leaves_a_failed_record(tmp_path):
    results = tmp_path / "r"
    r = run("oom", results)
    assert r.returncode == 1, r.stderr[-3000:]
    (rec,) = records(results).values()
    assert rec["status"] == "failed" and rec["error"].startswith("OutOfMemoryError: CUDA out of memory"), rec
    assert rec["traceback"] and rec["finished_at"] and rec["wall_s"] >= 0
    _no_leftovers(results)


def test_out_of_memory_never_touches_a_completed_record(completed, tmp_path):
    path, before = _copy(completed, tmp_path / "r")
    r = run("oom", tmp_path / "r", "overwrite=true")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "the completed record at" in r.stdout + r.stderr and "is kept" in r.stdout + r.stderr
    assert path.read_bytes() == before
    _no_leftovers(tmp_path / "r")


def test_disk_full_leaves_a_failed_record(tmp_path):
    results = tmp_path / "r"
    r = run("enospc", results)
    assert r.returncode == 1, r.stderr[-3000:]
    (rec,) = records(results).values()
    assert rec["status"] == "failed" and "No space left on device" in rec["error"], rec
    assert not list((results / "runs").glob("*/samples.jsonl"))
    _no_leftovers(results)


def test_disk_full_never_touches_a_completed_record(completed, tmp_path):
    path, before = _copy(completed, tmp_path / "r")
    samples = path.parent / "samples.jsonl"
    samples_before = samples.read_bytes()
    r = run("enospc", tmp_path / "r", "overwrite=true")
    assert r.returncode == 1, r.stderr[-3000:]
    assert path.read_bytes() == before and samples.read_bytes() == samples_before
    _no_leftovers(tmp_path / "r")


def _sigterm_midrun(results: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", DRIVER, "slow", *ARGS, f"results_dir={results}", *extra], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in p.stdout:  # wait until it is generating: the run has claimed its id and started work
        if "GENERATING" in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_sigterm_leaves_a_failed_record(tmp_path):
    results = tmp_path / "r"
    r = _sigterm_midrun(results)
    assert r.returncode != 0
    (rec,) = records(results).values()
    assert rec["status"] == "failed" and "SIGTERM" in rec["error"], rec
    _no_leftovers(results)


def test_sigterm_never_touches_a_completed_record(completed, tmp_path):
    path, before = _copy(completed, tmp_path / "r")
    r = _sigterm_midrun(tmp_path / "r", "overwrite=true")
    assert r.returncode != 0
    assert path.read_bytes() == before, "a SIGTERM during overwrite=true replaced the completed record"
    _no_leftovers(tmp_path / "r")
