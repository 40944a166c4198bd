"""Claims are leases: a live holder keeps its run, an empty, dead or expired claim is taken over.

Real processes hold the claims here: a child process claims a run directory and sleeps; the test
kills it and takes over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.claims import CLAIM, claim, claim_state, release

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from pathlib import Path
from bench.claims import claim
ok = claim(Path(sys.argv[1]))
print("claimed" if ok else "refused", flush=True)
time.sleep(120)
"""


def _holder(rdir: Path, heartbeat: float = 0.2) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_CLAIM_HEARTBEAT_S": str(heartbeat)}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(rdir)], stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline().strip()
    assert line == "claimed", line
    return p


def _read(rdir: Path) -> dict:
    return json.loads((rdir / CLAIM).read_text())


@pytest.fixture
def rdir(tmp_path) -> Path:
    d = tmp_path / "runs" / "abc123"
    d.mkdir(parents=True)
    return d


@pytest.fixture
def take_over_log(caplog):
    caplog.set_level(logging.WARNING, logger="bench")
    return caplog


def test_a_live_claim_is_kept_and_its_heartbeat_advances(rdir):
    p = _holder(rdir)
    try:
        first = _read(rdir)
        assert first["pid"] == p.pid and first["host"] == socket.gethostname()
        assert first["started_at"] and first["heartbeat"] and first["pid_start"]
        deadline = time.time() + 10
        while _read(rdir)["heartbeat"] == first["heartbeat"] and time.time() < deadline:
            time.sleep(0.05)
        assert _read(rdir)["heartbeat"] > first["heartbeat"], "the heartbeat was never refreshed"
        assert claim_state(rdir).state == "alive"
        assert not claim(rdir)
        assert not claim(rdir, overwrite=True), "overwrite=true must never take a live claim"
        assert _read(rdir)["pid"] == p.pid
    finally:
        p.kill()
        p.wait()


def test_a_killed_holders_claim_is_taken_over_with_a_log_line(rdir, take_over_log):
    p = _holder(rdir)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert claim_state(rdir).state == "dead"
    assert claim(rdir)
    try:
        assert _read(rdir)["pid"] == os.getpid()
        assert any("taking over the dead claim" in r.getMessage() and str(p.pid) in r.getMessage() for r in take_over_log.records), take_over_log.text
    finally:
        release(rdir)
    assert not (rdir / CLAIM).exists()


def test_an_empty_claim_is_taken_over(rdir, take_over_log):
    (rdir / CLAIM).touch()  # what a full disk leaves behind
    assert claim_state(rdir).state == "empty"
    assert claim(rdir)
    release(rdir)
    assert "taking over the empty claim" in take_over_log.text


def _foreign(rdir: Path, age: float, heartbeat: bool = True) -> None:
    holder = {"host": "some-other-node", "pid": 4242, "slurm_job_id": None, "token": "x", "started_at": "2026-01-01T00:00:00Z"}
    if heartbeat:
        holder["heartbeat"] = time.time() - age
    (rdir / CLAIM).write_text(json.dumps(holder))


def test_another_hosts_claim_expires_with_its_heartbeat(rdir, monkeypatch, take_over_log):
    monkeypatch.setenv("BENCH_CLAIM_TIMEOUT_S", "60")
    _foreign(rdir, age=5)
    assert claim_state(rdir).state == "alive"
    assert not claim(rdir) and not claim(rdir, overwrite=True)
    _foreign(rdir, age=120)
    st = claim_state(rdir)
    assert st.state == "expired" and "120 s old" in st.reason
    assert claim(rdir)
    release(rdir)
    assert "taking over the expired claim" in take_over_log.text


def test_overwrite_takes_over_a_claim_that_cannot_be_checked(rdir):
    _foreign(rdir, age=0, heartbeat=False)  # an older harness's claim from another host
    assert claim_state(rdir).state == "unknown"
    assert not claim(rdir)
    assert claim(rdir, overwrite=True)
    release(rdir)


def test_a_reused_pid_is_not_the_holder(rdir):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1", "heartbeat": time.time(), "token": "x"}
    (rdir / CLAIM).write_text(json.dumps(holder))
    assert claim_state(rdir).state == "dead"


def test_release_leaves_a_claim_taken_over_from_us_alone(rdir, monkeypatch):
    assert claim(rdir)
    (rdir / CLAIM).write_text(json.dumps({"host": "other", "pid": 1, "heartbeat": time.time(), "token": "theirs"}))
    release(rdir)
    assert _read(rdir)["token"] == "theirs"


@pytest.mark.slow
def test_processes_racing_for_a_stale_claim_one_wins(rdir):
    """Four processes take over one dead claim at once: exactly one gets it."""
    (rdir / CLAIM).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "heartbeat": time.time(), "token": "dead"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    go = rdir.parent / "go"
    code = (f"import os, time, sys\nfrom pathlib import Path\nfrom bench.claims import claim\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
            f"print('claimed' if claim(Path({str(rdir)!r})) else 'refused', flush=True)\ntime.sleep(1.5)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    time.sleep(2.0)  # let every interpreter start (imports)
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs.count("claimed") == 1, outs


@pytest.mark.slow
def test_run_takes_over_an_empty_claim_end_to_end(tmp_path):
    """The issue's reproduction: `touch runs/<id>/.claim`, then run: the run executes (it used to be skipped forever)."""
    from bench.status import status

    results = tmp_path / "r"
    args = ["logger=none", "benchmark.limit=4", "measure=quick", f"results_dir={results}"]
    rid = status(args)["rows"][0]["run_id"]
    (results / "runs" / rid).mkdir(parents=True)
    (results / "runs" / rid / CLAIM).touch()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "bench", "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "taking over the empty claim" in r.stdout + r.stderr
    assert json.loads((results / "runs" / rid / "record.json").read_text())["status"] == "completed"
    assert not (results / "runs" / rid / CLAIM).exists()
