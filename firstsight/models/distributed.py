"""Data-parallel jobs: one process per GPU, started by `torchrun --nproc_per_node N run.py ...`
locally or as N SLURM tasks per node by submitit (hardware=slurm_h100x4).

Every process runs the whole job: same config, same seed, its own replica of the frozen teacher
and of the student (DDP keeps the student's gradients equal). Each optimizer step takes one global
batch of world_size × hardware.batch_size samples, rank r taking its r-th slice, so a job on N
GPUs sees the samples a 1-GPU job with N times the batch size sees, in the same order. Rank 0
alone logs to MLflow, writes checkpoints and the final student.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from firstsight.core.world import Distributed
from firstsight.models.loading import repeated_blocks
from firstsight.models.vision_attention import plain_config

if TYPE_CHECKING:  # the section's type only
    from firstsight.config.schema import HardwareConfig


def shard(model: Any, device: str, world_size: int, hardware: Optional[HardwareConfig] = None) -> Any:
    """FSDP2: every block transformers would not split across devices (`_no_split_modules`: the
    decoder layers and vision blocks) becomes one shard unit, then the rest (embeddings, head).
    `hardware` (the config's hardware section) may set the fsdp_* levers; None: torch's defaults."""
    mesh = init_device_mesh(device, (world_size,))
    options = fsdp_options(hardware)
    blocks = list(repeated_blocks(model))
    for module in blocks:
        fully_shard(module, mesh=mesh, **options)
    # the root keeps torch's choice (gathered after forward: its backward runs first)
    root = {k: v for k, v in options.items() if k != "reshard_after_forward"}
    fully_shard(model, mesh=mesh, **root)
    prefetch_forward(blocks, lever(hardware, "fsdp_prefetch", 0))
    return model


def lever(hardware: Optional[HardwareConfig], key: str, default: Any) -> Any:
    """hardware.<key>, or `default` (today's behaviour) where no hardware section is given."""
    return default if hardware is None else getattr(hardware, key)


def torch_dtype_of(name: Optional[str]) -> Any:
    return None if name is None else getattr(torch, name)


def mixed_precision_policy(hardware: Optional[HardwareConfig]) -> Any:
    """FSDP2's MixedPrecisionPolicy from hardware.fsdp_param_dtype / fsdp_reduce_dtype; None
    when neither is set (no policy: blocks gather and reduce in the weights' own dtype)."""
    param, reduce = lever(hardware, "fsdp_param_dtype", None), lever(hardware, "fsdp_reduce_dtype", None)
    if param is None and reduce is None:
        return None
    # bf16 compute, fp32 gradient reduction unless asked otherwise: the sum over ranks keeps its precision
    reduce = reduce or ("float32" if param is not None else None)
    return MixedPrecisionPolicy(param_dtype=torch_dtype_of(param), reduce_dtype=torch_dtype_of(reduce))


def fsdp_options(hardware: Optional[HardwareConfig]) -> Dict[str, Any]:
    """fully_shard's keyword arguments for the blocks; only those set, so the defaults are torch's."""
    options: Dict[str, Any] = {}
    policy = mixed_precision_policy(hardware)
    if policy is not None:
        options["mp_policy"] = policy
    reshard = lever(hardware, "fsdp_reshard_after_forward", None)
    if reshard is not None:
        options["reshard_after_forward"] = reshard
    return options


def prefetch_forward(blocks: List[Any], depth: int) -> None:
    """Each block starts the all-gathers of the next `depth` blocks (in module order, which is the
    forward order: the vision blocks, then the decoder layers) as soon as its own is done."""
    if depth <= 0:
        return
    for i, block in enumerate(blocks[:-1]):
        block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + depth])


def gathered_copy(model: Any, is_main: bool) -> Any:
    """An unsharded copy of an FSDP-sharded model on the CPU, built from the gathered state dict (a
    collective: every process calls it; only rank 0 gets the copy, the others None). Saved with
    save_pretrained it gives the same files as a model that was never sharded."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    # fully_shard swaps the class for a subclass (FSDP<Name>); the copy is of the model's own class
    cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    with torch.device("meta"), plain_config(model) as config:
        copy = cls._from_config(config)
    copy.load_state_dict(state, strict=True, assign=True)
    copy.tie_weights()
    return copy


COMM_HOOKS = {"bfloat16": "bf16_compress_hook", "float16": "fp16_compress_hook"}  # torch's default_hooks


def ddp_options(hardware: Optional[HardwareConfig]) -> Dict[str, Any]:
    """DistributedDataParallel's keyword arguments from hardware.ddp_*; only those set."""
    options: Dict[str, Any] = {}
    cap = lever(hardware, "ddp_bucket_cap_mb", None)
    if cap is not None:
        options["bucket_cap_mb"] = cap
    if lever(hardware, "ddp_gradient_as_bucket_view", False):
        options["gradient_as_bucket_view"] = True
    if lever(hardware, "ddp_static_graph", False):
        options["static_graph"] = True
    return options


def compress_gradients(ddp: Any, dtype: str) -> None:
    """hardware.ddp_comm_dtype: torch's own compression hook (cast to bf16/fp16, pre-divide by the
    world size, all-reduce, cast back into the fp32 gradient), not a hand-written one."""
    if dtype == "float32":
        return
    ddp.register_comm_hook(None, getattr(default_hooks, COMM_HOOKS[dtype]))


def wrap(world: Distributed, model: Any, device: str, hardware: Optional[HardwareConfig] = None) -> Any:
    """The student, data-parallel, as hardware.data_parallel says: `ddp` = DistributedDataParallel
    (a full copy per process, gradients averaged); `fsdp` = FSDP2 fully_shard (weights, gradients
    and optimizer state sharded over the processes, gathered layer by layer for compute: a student
    that does not fit one GPU with its AdamW state). Both average gradients over the processes.
    `hardware` is the config's hardware section (its ddp_* / fsdp_* levers); None: plain DDP."""
    if not world.active:
        return model
    if lever(hardware, "data_parallel", "ddp") == "fsdp":
        return shard(model, device, world.world_size, hardware)
    ids = [world.local_rank] if device == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids, **ddp_options(hardware))
    compress_gradients(ddp, lever(hardware, "ddp_comm_dtype", "float32"))
    return ddp
