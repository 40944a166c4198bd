"""Job claims: at most one job executes a run id, and a job that stops leaves a record that says why.

Two jobs of one run id (a resubmitted sweep while the first is still running, or ``none`` collapsed
from several ratios) must not both execute it: :func:`claim` takes ``runs/<id>/.claim`` atomically.
While the claimed run executes, :func:`running` keeps a ``running`` marker record (so that
``python -m bench status`` can tell a live job from one that died without a word) and decides what a
failure leaves behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.provenance import now
from bench.records import write_json

log = logging.getLogger("bench")


class RunKilled(BaseException):
    """SIGTERM arrived (scancel, Slurm time limit, preemption): record the run as failed, then stop."""


def _raise_killed(signum, frame):  # noqa: ARG001
    raise RunKilled(f"killed by signal {signal.Signals(signum).name} (scancel, time limit or preemption)")


def job_info() -> dict[str, Any]:
    """Where the run executes: lets `bench status` tell a live run from one killed without a word."""
    env = os.environ
    jid = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        # array tasks are addressed as <array>_<task> by scancel/squeue
        jid = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": jid}


def job_alive(job: dict[str, Any] | None) -> bool | None:
    """Whether the process behind a ``running`` record or a claim still exists (None: cannot tell)."""
    if not job:
        return None
    jid = job.get("slurm_job_id")
    if jid and shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(jid), "-o", "%T"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.returncode == 0 and bool(out.stdout.strip())
    if job.get("host") == socket.gethostname() and job.get("pid"):
        try:
            os.kill(int(job["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return None


def claim(rdir: Path) -> bool:
    """Atomically take the right to execute a run (``runs/<id>/.claim``, O_EXCL).

    A claim left by a job that is gone is taken over.
    """
    rdir.mkdir(parents=True, exist_ok=True)
    lock = rdir / ".claim"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder and job_alive(holder) is False:
                lock.unlink(missing_ok=True)
                continue
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(job_info(), fh)
        return True
    return False


def release(rdir: Path) -> None:
    (rdir / ".claim").unlink(missing_ok=True)


@contextmanager
def running(rdir: Path, base: dict[str, Any], existing: dict[str, Any] | None, t0: float, on_failed: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Execute a claimed run (:func:`claim` returned True) inside this block; the claim is released at its end.

    * A ``running`` marker is written first, unless a completed record is being overwritten (it stays
      until the new one replaces it).
    * SIGTERM raises :class:`RunKilled` inside the block (main thread only).
    * A :class:`~bench.errors.BenchError` is a refusal with a reason (e.g. ToMe cannot reach the budget
      in this tower): as for bad input, nothing stays behind (the marker is undone, an empty run
      directory removed).
    * Any other failure leaves a ``failed`` record (``base`` plus the error), given to ``on_failed``;
      unless a completed record of the run id exists, which is kept untouched.

    ``base``: the record's identity keys; ``existing``: the record read after claiming; ``t0``: the
    run's start (``time.time()``) for ``wall_s``.
    """
    marker = existing is None or existing.get("status") != "completed"
    refused = False
    if marker:
        # a marker, so `bench status` can tell a job that died without a word (SIGKILL, OOM killer)
        write_json(rdir / "record.json", {**base, "status": "running", "metrics": {}, "accuracy_measured": False, "error": None, "job": job_info()})
    previous = signal.signal(signal.SIGTERM, _raise_killed) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except BenchError:
        refused = True
        if marker:
            if existing is None:
                (rdir / "record.json").unlink(missing_ok=True)
            else:
                write_json(rdir / "record.json", existing)
        raise
    except (Exception, RunKilled) as e:
        if existing is not None and existing.get("status") == "completed":
            log.error("run %s failed; the completed record at %s is kept", base["run_id"], rdir)
        else:
            failed = {**base, "status": "failed", "metrics": {}, "accuracy_measured": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "job": job_info(), "finished_at": now(), "wall_s": round(time.time() - t0, 2)}
            try:
                write_json(rdir / "record.json", failed)
            except OSError:
                log.exception("could not write the failed record")
            on_failed(failed)
        raise
    finally:
        release(rdir)
        if refused and existing is None:
            for d in (rdir, rdir.parent):  # runs/<id>, then runs/, each only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
