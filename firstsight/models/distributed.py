"""Data-parallel jobs: one process per GPU, started by `torchrun --nproc_per_node N run.py ...`
locally or as N SLURM tasks per node by submitit (hardware=slurm_h100x4).

Every process runs the whole job: same config, same seed, its own replica of the frozen teacher
and of the student (DDP keeps the student's gradients equal). Each optimizer step takes one global
batch of world_size × hardware.batch_size samples, rank r taking its r-th slice, so a job on N
GPUs sees the samples a 1-GPU job with N times the batch size sees, in the same order. Rank 0
alone logs to MLflow, writes checkpoints and the final student.
"""

from __future__ import annotations

from typing import Any

from firstsight.core.world import Distributed


def shard(model: Any, device: str, world_size: int) -> Any:
    """FSDP2: every block transformers would not split across devices (`_no_split_modules`: the
    decoder layers and vision blocks) becomes one shard unit, then the rest (embeddings, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from firstsight.models.loading import repeated_blocks

    mesh = init_device_mesh(device, (world_size,))
    for module in repeated_blocks(model):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathered_copy(model: Any, is_main: bool) -> Any:
    """An unsharded copy of an FSDP-sharded model on the CPU, built from the gathered state dict (a
    collective: every process calls it; only rank 0 gets the copy, the others None). Saved with
    save_pretrained it gives the same files as a model that was never sharded."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    # fully_shard swaps the class for a subclass (FSDP<Name>); the copy is of the model's own class
    cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    from firstsight.models.vision_attention import plain_config

    with torch.device("meta"), plain_config(model) as config:
        copy = cls._from_config(config)
    copy.load_state_dict(state, strict=True, assign=True)
    copy.tie_weights()
    return copy


def wrap(world: Distributed, model: Any, device: str, strategy: str = "ddp") -> Any:
    """The student, data-parallel: `ddp` = DistributedDataParallel (a full copy per process,
    gradients averaged); `fsdp` = FSDP2 fully_shard (weights, gradients and optimizer state
    sharded over the processes, gathered layer by layer for compute: a student that does not
    fit one GPU with its AdamW state). Both average gradients over the processes."""
    if not world.active:
        return model
    if strategy == "fsdp":
        return shard(model, device, world.world_size)
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if device == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
