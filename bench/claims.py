"""Job claims: at most one job executes a run id, and a job that stops leaves a record that says why.

Two jobs of one run id (a resubmitted sweep while the first is still running, or ``none`` collapsed
from several ratios) must not both execute it: :func:`claim` takes ``runs/<id>/.claim`` atomically.

A claim is a *lease*: it records the holder's host, pid (and the process's start time, against pid
reuse), Slurm job id, start time and a heartbeat that a daemon thread refreshes every
:func:`heartbeat_s` seconds while the run lives. A claim is taken over, with a log line, when it is

* **empty or unreadable** (a full disk leaves a 0-byte file; claims are written whole before they
  appear, so a live one is never empty),
* **dead**: its process is provably gone (same host and pid gone or reused, or its Slurm job left
  the queue), or
* **expired**: its heartbeat is older than :func:`timeout_s` (a claim from another host, outside Slurm).

A claim of an older harness (no heartbeat) whose process cannot be checked is *unknown*: kept, unless
``overwrite=true``, which takes over any claim that is not alive. Takeovers happen under an advisory
lock on the run directory, so two jobs never both take over the same stale claim.

While the claimed run executes, :func:`running` keeps a ``running`` marker record (so that
``python -m bench status`` can tell a live job from one that died without a word) and decides what a
failure leaves behind.

Environment: ``BENCH_CLAIM_HEARTBEAT_S`` (default 30) and ``BENCH_CLAIM_TIMEOUT_S`` (default 600;
raise it where a shared disk's clocks drift).
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
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.provenance import now
from bench.records import write_json

log = logging.getLogger("bench")

CLAIM = ".claim"


def heartbeat_s() -> float:
    """Seconds between two heartbeats of a live claim (``BENCH_CLAIM_HEARTBEAT_S``, default 30)."""
    return float(os.environ.get("BENCH_CLAIM_HEARTBEAT_S", 30))


def timeout_s() -> float:
    """Age of a heartbeat after which a claim counts as expired (``BENCH_CLAIM_TIMEOUT_S``, default 600)."""
    return float(os.environ.get("BENCH_CLAIM_TIMEOUT_S", 600))


class RunKilled(BaseException):
    """SIGTERM arrived (scancel, Slurm time limit, preemption): record the run as failed, then stop."""


def _raise_killed(signum, frame):  # noqa: ARG001
    raise RunKilled(f"killed by signal {signal.Signals(signum).name} (scancel, time limit or preemption)")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22): a pid
    and this pair name one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def job_info() -> dict[str, Any]:
    """Where the run executes: lets `bench status` tell a live run from one killed without a word."""
    env = os.environ
    jid = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        # array tasks are addressed as <array>_<task> by scancel/squeue
        jid = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "slurm_job_id": jid}


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
        pid = int(job["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        if job.get("pid_start") and _proc_start(pid) not in (None, job["pid_start"]):
            return False  # the pid now names another process
        return True
    return None


@dataclass
class ClaimState:
    """What a run directory's ``.claim`` says (:func:`claim_state`)."""

    #: free (no claim) | alive | empty | dead | expired (the last three: stale, taken over) | unknown
    #: (an older claim without heartbeat whose process cannot be checked: taken over only by overwrite=true)
    state: str
    reason: str
    holder: dict[str, Any] = field(default_factory=dict)

    @property
    def stale(self) -> bool:
        return self.state in ("empty", "dead", "expired")


def _who(holder: dict[str, Any]) -> str:
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']}")
    if holder.get("started_at"):
        parts.append(f"since {holder['started_at']}")
    return ", ".join(parts)


def claim_state(rdir: Path) -> ClaimState:
    """Classify the claim on a run directory (see the module docstring)."""
    lock = Path(rdir) / CLAIM
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return ClaimState("free", "no claim")
    except OSError as e:
        return ClaimState("empty", f"unreadable claim ({e.strerror})")
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or not holder:
        return ClaimState("empty", "empty claim file (a full disk or a crash while claiming)" if not text.strip() else "unreadable claim file")
    who = _who(holder)
    alive = job_alive(holder)
    if alive is False:
        return ClaimState("dead", f"its job is gone ({who})", holder)
    hb = holder.get("heartbeat")
    age = None if not isinstance(hb, (int, float)) else time.time() - float(hb)
    if alive:
        return ClaimState("alive", f"held by a live job ({who})", holder)
    if age is None:
        return ClaimState("unknown", f"an older claim without heartbeat ({who}) whose job cannot be checked from here", holder)
    if age > timeout_s():
        return ClaimState("expired", f"heartbeat {age:.0f} s old, timeout {timeout_s():.0f} s ({who})", holder)
    return ClaimState("alive", f"heartbeat {max(age, 0):.0f} s ago ({who})", holder)


@contextmanager
def _dir_lock(rdir: Path) -> Iterator[None]:
    """An advisory lock (flock) on the run directory: takeovers and heartbeats happen one at a time.

    Where the file system has no flock the O_EXCL-style link in :func:`_publish` still keeps two
    fresh claims apart; only two simultaneous takeovers of one stale claim could then both succeed.
    """
    import fcntl

    try:
        fd = os.open(rdir, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _publish(rdir: Path, info: dict[str, Any]) -> bool:
    """Create ``.claim`` holding ``info`` if none exists (False if one does).

    Written to a temporary file first and hard-linked into place (atomic, fails if the name exists),
    so a claim is never seen empty or half-written.
    """
    lock = rdir / CLAIM
    tmp = rdir / f".claim.{info['token']}.tmp"
    try:
        tmp.write_text(json.dumps(info))
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then write
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(info))
            return True
    finally:
        tmp.unlink(missing_ok=True)


class _Lease(threading.Thread):
    """Refreshes the heartbeat of our claim until stopped; stops if the claim is no longer ours."""

    def __init__(self, rdir: Path, info: dict[str, Any]):
        super().__init__(name=f"claim-heartbeat-{rdir.name}", daemon=True)
        self.rdir, self.info, self.halt = rdir, info, threading.Event()

    def run(self) -> None:
        from bench.records import atomic_write_text

        while not self.halt.wait(heartbeat_s()):
            try:
                with _dir_lock(self.rdir):
                    if self.halt.is_set():
                        return
                    if _token(self.rdir) != self.info["token"]:
                        log.error("run %s: this job's claim was taken over by another job (%s)", self.rdir.name, claim_state(self.rdir).reason)
                        return
                    self.info["heartbeat"] = time.time()
                    atomic_write_text(self.rdir / CLAIM, json.dumps(self.info))
            except OSError as e:  # e.g. a full disk: try again at the next beat; the claim stays
                log.warning("run %s: could not refresh the claim's heartbeat: %s", self.rdir.name, e)


def _token(rdir: Path) -> str | None:
    try:
        return json.loads((rdir / CLAIM).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


_LEASES: dict[str, _Lease] = {}
_LEASES_LOCK = threading.Lock()


def claim(rdir: Path, overwrite: bool = False) -> bool:
    """Atomically take the right to execute a run (``runs/<id>/.claim``) and keep it alive with a heartbeat.

    An empty, dead or expired claim is taken over (logged); with ``overwrite`` also one whose job
    cannot be checked. A live claim is never taken: False. :func:`release` ends the lease.
    """
    rdir = Path(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    info = {**job_info(), "token": uuid.uuid4().hex, "started_at": now(), "heartbeat": time.time()}
    if not _publish(rdir, info):
        with _dir_lock(rdir):
            st = claim_state(rdir)
            if st.state != "free":
                if not (st.stale or (overwrite and st.state != "alive")):
                    return False
                log.warning("run %s: taking over the %s claim: %s", rdir.name, st.state if st.stale else f"{st.state} (overwrite=true)", st.reason)
                (rdir / CLAIM).unlink(missing_ok=True)
            info["heartbeat"] = time.time()
            if not _publish(rdir, info):
                return False
    lease = _Lease(rdir, info)
    with _LEASES_LOCK:
        _LEASES[str(rdir.resolve())] = lease
    lease.start()
    return True


def release(rdir: Path) -> None:
    """End this process's claim on ``rdir``: stop its heartbeat and remove ``.claim`` if it is still ours."""
    rdir = Path(rdir)
    with _LEASES_LOCK:
        lease = _LEASES.pop(str(rdir.resolve()), None)
    if lease is None:
        return
    lease.halt.set()
    with _dir_lock(rdir) if rdir.is_dir() else _nothing():
        if _token(rdir) == lease.info["token"]:
            (rdir / CLAIM).unlink(missing_ok=True)
    lease.join(timeout=5)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


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
