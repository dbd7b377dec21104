"""Process groups under torchrun (NCCL for CUDA tensors, gloo for CPU ones) and the helpers the loop needs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_as_ranks() -> bool:
    """Whether this is one of several processes of one run: started by torchrun, or a submitit job's task after
    :func:`export_submitit_environment`."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_by_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def export_submitit_environment() -> int:
    """In a submitit task: torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` = the job's first host, ``MASTER_PORT`` from the job id unless set) from submitit's job
    environment, so that :func:`init_process_group` joins the job's tasks; returns the global rank. A one-task job
    exports nothing. GPUs stay visible to every task (each takes ``cuda:LOCAL_RANK``)."""
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return job.global_rank


def init_process_group() -> Process:
    """Join torchrun's group (once); a plain ``python train.py`` is process 0 of 1.

    The group serves CPU tensors with gloo and, where CUDA exists, CUDA tensors with NCCL, so it can be
    created before the config says which device trains (the run directory must be agreed on first).

    After a restart (``torchrun --max-restarts``), the workers share the elastic agent's store with the attempt
    before, whose keys are still there: gloo then reads a dead worker's address (``connectFullMesh ... Connection
    refused``, or a hang) and NCCL an old unique id (pytorch/pytorch#135712). Each attempt therefore keys its
    group under its own prefix (``TORCHELASTIC_RESTART_COUNT``).
    """
    if not launched_as_ranks():
        return Process(0, 1, 0)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"spartan/attempt_{attempt}", store), rank=rank, world_size=world
        )
    return Process(dist.get_rank(), dist.get_world_size(), local_rank)


def current_process() -> Process:
    if dist.is_available() and dist.is_initialized():
        return Process(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Process(0, 1, 0)


def shared_timestamp() -> str:
    """Rank 0's ``YYYY-MM-DD/HH-MM-SS``, the same string on every process."""
    stamp = [time.strftime("%Y-%m-%d/%H-%M-%S")]
    if dist.is_initialized():
        dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over processes (float64); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return packed.tolist()


def any_process(flags: list[float]) -> list[float]:
    """The largest value of each of ``flags`` over processes (a CPU tensor through gloo: no device sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(flags)
    packed = torch.tensor(flags, dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return packed.tolist()


def all_processes_reach_this_point() -> None:
    """A barrier (one :func:`any_process` collective); raises if a process left the group (e.g. after a failure)."""
    any_process([0.0])


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj``, in rank order, on the main process (None elsewhere); ``[obj]`` on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, which drift apart per rank) on every process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every process (e.g. whether a checkpoint exists)."""
    box = [flag]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
