"""Hydra launchers for Slurm and one machine through submitit (``configs/hydra/launcher/slurm.yaml`` / ``local.yaml``):
the hydra-submitit-launcher plugin's launchers, with every submitit task of a job as one DDP rank of one run.

In each task, before the run starts: submitit's environment (rank, local rank, world size, master address and port)
is exported as torchrun's variables and the process group is joined by the same code as under torchrun; processes
other than rank 0 neither log to the run directory's files nor write them. A process that fails leaves the group
at once, so the others fail at their next collective (at the latest when they finish) and the job fails with them
(the driver reads rank 0's outcome). A job requeued after a preemption or time-out
(submitit's SIGUSR2 handling, after the run has written its checkpoint) continues with ``resume=auto``.
"""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from spartan.train.distributed import (
    all_processes_reach_this_point,
    export_submitit_environment,
    init_process_group,
    shutdown,
)

QUIET_LOGGING = ("hydra/job_logging=none", "hydra/hydra_logging=none")


class _DistributedJob:
    """The task side of both launchers (mixed in before the plugin's class)."""

    def __call__(self, sweep_overrides: list[str], *args: Any) -> JobReturn:
        rank = export_submitit_environment()
        overrides = list(sweep_overrides) if rank == 0 else [*sweep_overrides, *QUIET_LOGGING]
        init_process_group()
        try:
            result = super().__call__(overrides, *args)
            if result.status == JobStatus.COMPLETED:
                # Every process is here unless one failed: then it has left the group (below) and this fails.
                try:
                    all_processes_reach_this_point()
                except RuntimeError as err:
                    raise RuntimeError(
                        "another process of this job failed: see its log in the .submitit folder"
                    ) from err
            return result
        finally:
            shutdown()  # a failed process leaves at once, so the others' next collective fails instead of hanging

    def checkpoint(self, sweep_overrides: list[str], *args: Any) -> Any:
        """The requeued job: the same run, continued from its last checkpoint."""
        kept = [o for o in sweep_overrides if not o.startswith("resume=")]
        return super().checkpoint([*kept, "resume=auto"], *args)


class DistributedSlurmLauncher(_DistributedJob, SlurmLauncher):
    """``hydra/launcher=slurm``."""


class DistributedLocalLauncher(_DistributedJob, LocalLauncher):
    """``hydra/launcher=local``."""
