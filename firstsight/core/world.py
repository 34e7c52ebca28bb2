"""This process's place in a data-parallel job (rank, world size) and the process group's collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from firstsight.core.runtime import device_type

if TYPE_CHECKING:  # the section's type only: config sits above core
    from firstsight.config.schema import HardwareConfig


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> List[float]:
        """Element-wise sum (or max) of `values` over all processes (one collective)."""
        if not self.active:
            return list(values)
        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_gradients(self, parameters: Sequence[Any]) -> None:
        """For trained parameters outside the DDP module (the hidden-state projections)."""
        if not self.active:
            return
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def close(self) -> None:
        if self.active:
            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Distributed()


def launched_world() -> Optional[Distributed]:
    """The process layout a launcher set up: torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or SLURM's
    tasks of one job step (submitit); None for a single process."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world = Distributed(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and env.get("SUBMITIT_EXECUTOR") == "slurm":
        world = Distributed(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    else:
        return None
    return world if world.world_size > 1 else None


def check_layout(hardware: HardwareConfig, task: str, world: Optional[Distributed]) -> Optional[str]:
    """Why this job's process layout does not fit its config, or None (validate reports it)."""
    gpus, size = int(hardware.num_gpus), world.world_size if world else 1
    if size > 1 and task != "distill":
        return f"task={task} runs in one process; only task=distill trains data-parallel ({size} processes here)"
    if gpus > 1 and size != gpus:
        return (
            f"a job on {gpus} GPUs needs one process per GPU, this one has {size}: launch it with "
            f"torchrun --nproc_per_node {gpus} run.py ... (or on SLURM with hardware=slurm_h100x4, tasks_per_node = GPUs)"
        )
    if gpus == 1 and size > 1:
        return f"{size} processes were launched for a 1-GPU job: set hardware.num_gpus={size}"
    return None


def setup(hardware: HardwareConfig) -> Distributed:
    """Join the job's process group when it was launched as several processes; else SINGLE."""
    world = launched_world()
    if world is None:
        return SINGLE
    if "MASTER_ADDR" not in os.environ:  # SLURM tasks: rank 0's node and a port from the job id
        from submitit.helpers import TorchDistributedEnvironment  # deferred: submitit is needed on SLURM only

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    cuda = device_type(hardware) == "cuda"
    if cuda:
        torch.cuda.set_device(world.local_rank)  # "cuda" means this process's GPU from here on
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.world_size)
    return world
