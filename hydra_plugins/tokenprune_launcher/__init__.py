"""tokenprune-bench's Slurm launcher for Hydra (``hydra/launcher=slurm``): Hydra's submitit launcher, whose wait for
its jobs also asks ``squeue`` where ``sacct`` has no answer (:mod:`bench.submitit_slurm` says why). It lives here
because Hydra instantiates launchers only from its ``hydra_plugins`` namespace package."""

from __future__ import annotations

from typing import Any, Sequence

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher


class SlurmLauncher(SubmititSlurmLauncher):
    """:class:`hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher` with
    :class:`bench.submitit_slurm.QueueWatcher` watching its jobs."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from bench.submitit_slurm import watched  # submitit is imported when a sweep is launched, not at Hydra's start

        return watched(lambda: super(SlurmLauncher, self).launch(job_overrides, initial_job_idx))
