"""Hydra's submitit Slurm launcher, made safe on clusters without job accounting (``hydra/launcher=slurm``).

submitit learns a job's state from ``sacct`` only. Where the cluster keeps no accounting (``sacct`` fails, as on
many small clusters and on the test suite's single-node cluster), every job it cannot find a result file for stays
``UNKNOWN``, which submitit counts as unfinished: a job that died without writing its result (SIGKILL after Slurm's
``KillWait``, the OOM killer, a lost node) keeps the sweep command waiting forever. Here the states ``sacct`` does
not give come from ``squeue`` instead, so such a job ends the wait with submitit's own error (the job, its state
and its log), and the sweep fails with a message rather than hanging. The launcher itself is
``hydra_plugins.tokenprune_launcher.SlurmLauncher`` (Hydra finds launchers only in its ``hydra_plugins`` package).
"""

from __future__ import annotations

import subprocess
from typing import Any, Callable

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

#: the state given to a job that two consecutive ``squeue`` calls no longer list (it left the queue, and Slurm's
#: ``MinJobAge`` has passed): finished, as far as anyone can tell without accounting
LEFT_QUEUE = "LEFT_QUEUE"


class QueueWatcher(SlurmInfoWatcher):
    """submitit's ``sacct`` watcher; where ``sacct`` gives a job no state, ``squeue`` gives it.

    ``squeue --states=all`` lists a job for ``MinJobAge`` seconds after it ends (``CANCELLED``, ``FAILED``, ...). A
    job missing from two consecutive calls is :data:`LEFT_QUEUE`; one missing call is not enough, so that a job
    between submission and the controller's listing is never taken for finished.
    """

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self._absent: set[str] = set()
        self._queued: set[str] = set()  # jobs whose state came from squeue: asked again at every update

    def update(self) -> None:
        before = getattr(self, "_output", None)
        super().update()  # sacct: the states of clusters with accounting
        if getattr(self, "_output", None) is not before:  # sacct answered: its states stand where it has them
            self._queued -= set(self.read_info(self._output))
        open_ = sorted(j for j in self._registered - self._finished if j in self._queued or not self._info_dict.get(j, {}).get("State"))
        if not open_:
            return
        states = self._squeue(sorted({j.split("_")[0] for j in open_}))
        if states is None:
            return
        for jid in open_:
            if jid in states:
                self._info_dict[jid] = {"State": states[jid]}
                self._absent.discard(jid)
                self._queued.add(jid)
            elif jid in self._absent:
                self._info_dict[jid] = {"State": LEFT_QUEUE}
            else:
                self._absent.add(jid)
        for jid in open_:
            if self.is_done(jid, mode="cache"):
                self._finished.add(jid)

    @staticmethod
    def _squeue(main_ids: list[str]) -> dict[str, str] | None:
        """``{job id: state}`` of every array task (``-r``: one line each) of these jobs; None when ``squeue`` cannot
        answer (then nothing is concluded)."""
        try:
            out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(main_ids)],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            # every id unknown to the controller: all of them left the queue; any other error tells nothing
            return {} if "Invalid job id" in out.stderr else None
        states = {}
        for line in out.stdout.splitlines():
            jid, sep, state = line.strip().partition("|")
            if sep:
                states[jid] = state.strip()
        return states


def watched(launch: Callable[[], Any]) -> Any:
    """Run ``launch()`` with submitit's Slurm jobs watched by :class:`QueueWatcher` (the launcher's wait included)."""
    # submitit's jobs read their watcher from this class attribute; it is swapped for the launch only
    previous = SlurmJob.watcher
    SlurmJob.watcher = QueueWatcher()
    try:
        return launch()
    finally:
        SlurmJob.watcher = previous
