"""A real single-node Slurm cluster: a SynthVQA sweep through Hydra's submitit launcher, a job
killed mid-run, and a resubmission that completes the grid without duplicates or lost records.

Part of `make test` (which installs Debian's slurm-wlm and munge). Where Slurm cannot be started,
the test fails with the reason rather than skipping.
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
SCRIPT = ROOT / "scripts" / "slurm_localhost.sh"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Slurm cannot be started: {', '.join(missing)} not installed (`make slurm-deps` installs Debian's slurm-wlm and munge)")
    d = tmp_path_factory.mktemp("slurm")
    r = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)
        pytest.fail(f"Slurm cannot be started: {r.stdout}{r.stderr}")
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PYTHONUNBUFFERED": "1"}
    yield env
    subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)


def bench(args, env, timeout=900):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_records(results: Path) -> dict[str, dict]:
    out = {}
    for p in (results / "runs").glob("*/record.json"):
        try:
            out[p.parent.name] = json.loads(p.read_text())
        except json.JSONDecodeError:
            pass
    return out


def sweep_args(tmp_path: Path, tiny_model_dir, results: Path) -> list[str]:
    """The Slurm launcher and a small CPU run of the tiny model, shared by the sweeps here."""
    return [
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "+slurm.timeout_min=15",
        "+slurm.cpus_per_task=1",
        f"model.source={tiny_model_dir}",
        "model.sha256=null",  # another checkpoint than the pinned embedded one
        "benchmark.limit=48",
        "benchmark.batch_size=1",
        f"results_dir={results}",
        "logger=none",
        "device=cpu",
        "measure.repeats=2",
    ]


def wait_running(results: Path, proc: subprocess.Popen, timeout: float = 600, skip_method: str | None = None) -> dict | None:
    """The first ``running`` record that names its Slurm job (of another method than ``skip_method``), while the sweep
    command lives."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for rec in read_records(results).values():
            if rec.get("status") == "running" and (rec.get("job") or {}).get("slurm_job_id") and rec.get("method") != skip_method:
                return rec
        time.sleep(0.5)
    return None


def test_slurm_sweep_kill_and_resume(slurm_env, tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    sweep = ["method=none,random,pool", "ratio=0.5,0.9"]  # none collapses to ratio 0: 5 runs
    common = sweep_args(tmp_path, tiny_model_dir, results)
    status_args = ["status", *sweep, *[c for c in common if not c.startswith(("hydra", "+slurm"))]]
    st = bench(status_args, slurm_env)
    assert st.returncode == 0 and "5 runs: 0 done, 0 failed, 0 running, 5 missing" in st.stdout, st.stdout + st.stderr

    # first submission; kill one job while it is running
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "-m", *sweep, *common], cwd=ROOT, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # not `none`: its duplicate job (none collapses across ratios) could legitimately redo it
    victim = wait_running(results, proc, skip_method="none")
    killed = victim["run_id"] if victim else None
    if victim:
        subprocess.run(["scancel", str(victim["job"]["slurm_job_id"])], env=slurm_env, check=True)
    out, _ = proc.communicate(timeout=900)
    assert killed is not None, "no job was seen running:\n" + out[-4000:]
    assert proc.returncode != 0, "a killed job must make the sweep command fail"
    # the sweep command returns at the first failed job it reaches; the jobs after it run on (a failure stops
    # no other job), so their records may still be `running` for a moment
    deadline = time.time() + 300
    while time.time() < deadline and sum(r["status"] == "completed" for r in read_records(results).values()) < 4:
        time.sleep(1)
    recs = read_records(results)
    assert recs[killed]["status"] == "failed" and "SIGTERM" in recs[killed]["error"], recs[killed]
    assert sum(r["status"] == "completed" for r in recs.values()) == 4, {k: r["status"] for k, r in recs.items()}
    completed_before = {rid: (results / "runs" / rid / "record.json").read_bytes() for rid, r in recs.items() if r["status"] == "completed"}
    st = bench(status_args, slurm_env)
    assert "5 runs: 4 done, 1 failed, 0 running, 0 missing" in st.stdout, st.stdout

    # resubmission: only the failed run executes; nothing recorded is lost or duplicated
    r = bench(["run", "-m", *sweep, *common], slurm_env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    recs = read_records(results)
    assert len(recs) == 5 and all(v["status"] == "completed" for v in recs.values())
    for rid, blob in completed_before.items():
        assert (results / "runs" / rid / "record.json").read_bytes() == blob, "a finished run was re-run"
    st = bench(status_args, slurm_env)
    assert "5 runs: 5 done, 0 failed, 0 running, 0 missing" in st.stdout, st.stdout
    lb = (results / "leaderboard.csv").read_text().splitlines()
    assert len(lb) == 1 + 5


def test_a_job_killed_without_a_word_fails_the_sweep(slurm_env, tiny_model_dir, tmp_path):
    """SIGKILL leaves no result file, and this cluster keeps no accounting (``sacct`` fails), as many small ones:
    the sweep learns from ``squeue`` that the job ended (bench.submitit_slurm) and fails with submitit's message,
    instead of waiting forever for a job it can no longer see."""
    results = tmp_path / "results"
    common = sweep_args(tmp_path, tiny_model_dir, results)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "-m", "method=random", "ratio=0.5", *common], cwd=ROOT,
                            env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rec = wait_running(results, proc)
    assert rec is not None, "the job was never seen running:\n" + (proc.communicate()[0] or "")[-4000:]
    os.kill(int(rec["job"]["pid"]), signal.SIGKILL)  # as the OOM killer would (`scancel -s KILL` is a plain scancel)
    t0 = time.time()
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the sweep still waits for a job killed with SIGKILL 300 s ago")
    assert proc.returncode != 0 and "has not produced any output" in out, out[-4000:]
    assert time.time() - t0 < 300
    assert "sacct" in out  # the cluster has no accounting: the answer came from squeue
    status_args = ["status", "method=random", "ratio=0.5", *[c for c in common if not c.startswith(("hydra", "+slurm"))]]
    st = bench(status_args, slurm_env)
    # the job left its claim behind, and status names it as gone: re-running the sweep takes it over
    assert "1 stale claim(s)" in st.stdout and "its job is gone" in st.stdout, st.stdout + st.stderr


def test_status_reports_a_silently_killed_job(tmp_path):
    """A `running` record whose process is gone (SIGKILL, OOM killer) counts as killed."""
    from bench.claims import job_alive

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert job_alive({"host": os.uname().nodename, "pid": dead.pid}) is False
    assert job_alive({"host": os.uname().nodename, "pid": os.getpid()}) is True
