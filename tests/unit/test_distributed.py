"""Data-parallel distillation (firstsight/models/distributed.py) on the CPU: two torchrun processes (gloo)
against one process with twice the batch."""

from __future__ import annotations

import pytest

from tests.conftest import compose


@pytest.mark.parametrize(
    "env, overrides, message",
    [
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            ["task=profile"],
            "only task=distill trains data-parallel",
        ),
        ({}, ["hardware.device=auto", "hardware.num_gpus=2"], "needs one process per GPU"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            ["hardware.device=auto", "hardware.num_gpus=1"],
            "set hardware.num_gpus=2",
        ),
    ],
)
def test_process_layouts_that_do_not_fit_the_config_are_explained(monkeypatch, env, overrides, message):
    from firstsight.core.world import check_layout, launched_world

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose(overrides)
    problem = check_layout(cfg.hardware, cfg.task.name, launched_world())
    assert problem is not None and message in problem


def test_a_single_process_is_not_distributed(monkeypatch):
    from firstsight.core.world import check_layout, launched_world

    for key in ("RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert launched_world() is None
    cfg = compose([])
    assert check_layout(cfg.hardware, cfg.task.name, None) is None


# --- the data-parallel levers (hardware.ddp_* / fsdp_*) on a toy model, two gloo processes


class ToyBlock(__import__("torch").nn.Module):
    def __init__(self) -> None:
        import torch

        super().__init__()
        self.linear = torch.nn.Linear(32, 32)

    def forward(self, x):
        import torch

        return torch.tanh(self.linear(x))


class Toy(__import__("torch").nn.Module):
    _no_split_modules = ["ToyBlock"]  # what firstsight.models.loading.repeated_blocks shards one by one

    def __init__(self) -> None:
        import torch

        super().__init__()
        self.embed = torch.nn.Linear(8, 32)
        self.blocks = torch.nn.ModuleList([ToyBlock() for _ in range(3)])
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


LEVER_RUNS = {
    "ddp": {},
    "ddp_levers": {"ddp_bucket_cap_mb": 1, "ddp_gradient_as_bucket_view": True, "ddp_static_graph": True},
    "ddp_bf16": {"ddp_comm_dtype": "bfloat16"},
    "ddp_fp16": {"ddp_comm_dtype": "float16"},
    "fsdp": {"data_parallel": "fsdp"},
    "fsdp_levers": {
        "data_parallel": "fsdp",
        "fsdp_param_dtype": "bfloat16",
        "fsdp_reshard_after_forward": False,
        "fsdp_prefetch": 1,
    },
}


def _whole(tensor):
    """A DTensor (an FSDP shard) gathered whole; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _train_toy(rank: int, settings: dict) -> dict:
    """Three SGD steps of the toy model wrapped as `settings` say; rank r takes its own samples."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from firstsight.config.schema import HardwareConfig
    from firstsight.core.world import Distributed
    from firstsight.models.distributed import wrap

    hardware = OmegaConf.merge(OmegaConf.structured(HardwareConfig), settings)
    torch.manual_seed(0)
    model = Toy()
    wrapped = wrap(Distributed(rank, 2, rank), model, "cpu", hardware)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    samples = torch.randn(3, 2, 4, 8, generator=torch.Generator().manual_seed(1))
    record: dict = {"losses": []}
    for step in range(3):
        out = wrapped(samples[step, rank])
        record.setdefault("output_dtype", out.dtype)
        record.setdefault("block_sharded_after_forward", hasattr(model.blocks[0].linear.weight, "full_tensor"))
        loss = out.float().pow(2).mean()
        loss.backward()
        if step == 0:
            record["grads"] = {n: _whole(p.grad).clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        record["losses"].append(total.item() / 2)
    record["weights"] = {n: _whole(p.detach()).clone() for n, p in model.named_parameters()}
    if hasattr(wrapped, "bucket_bytes_cap"):  # DDP's own record of the options it was given
        record["ddp"] = (wrapped.bucket_bytes_cap, wrapped.gradient_as_bucket_view, wrapped.static_graph)
    if hasattr(model.blocks[0], "set_modules_to_forward_prefetch"):  # FSDP: whose all-gathers block 0 issues
        states = model.blocks[0]._get_fsdp_state()._states_to_forward_prefetch
        record["prefetched_by_block_0"] = [model.blocks[1]._get_fsdp_state() is s for s in states]
    return record


def _levers_worker(rank: int, init_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        records = {name: _train_toy(rank, settings) for name, settings in LEVER_RUNS.items()}
        if rank == 0:
            torch.save(records, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def lever_runs(tmp_path_factory):
    """Every LEVER_RUNS setting trained by the same two processes (one spawn: each costs a torch import)."""
    import torch
    import torch.multiprocessing as mp

    workdir = tmp_path_factory.mktemp("levers")
    mp.spawn(_levers_worker, args=(str(workdir / "init"), str(workdir / "records.pt")), nprocs=2)
    return torch.load(workdir / "records.pt")


def test_ddp_options_reach_ddp_and_leave_the_gradients_bit_identical(lever_runs):
    import torch

    assert lever_runs["ddp_levers"]["ddp"] == (1024 * 1024, True, True)
    assert lever_runs["ddp"]["ddp"] == (25 * 1024 * 1024, False, False)  # torch's defaults, as before
    for name, grad in lever_runs["ddp"]["grads"].items():  # bucketing and views change no arithmetic
        assert torch.equal(lever_runs["ddp_levers"]["grads"][name], grad), name
    assert lever_runs["ddp_levers"]["losses"] == lever_runs["ddp"]["losses"]


@pytest.mark.parametrize("run, dtype", [("ddp_bf16", "bfloat16"), ("ddp_fp16", "float16")])
def test_compressed_ddp_gradients_are_the_fp32_ones_rounded(lever_runs, run, dtype):
    import torch

    half = getattr(torch, dtype)
    exact, compressed = lever_runs["ddp"]["grads"], lever_runs[run]["grads"]
    for name, grad in compressed.items():
        assert grad.dtype == torch.float32  # the hook casts back into the fp32 gradient
        assert torch.equal(grad, grad.to(half).float()), name  # every value travelled in `dtype`
        # each rank's gradient rounded before the sum: where the two cancel, the error is the parts', not the sum's
        scale = exact[name].abs().max().item()
        torch.testing.assert_close(
            grad, exact[name], rtol=2 * torch.finfo(half).eps, atol=torch.finfo(half).eps * scale
        )
    assert any(not torch.equal(compressed[n], exact[n]) for n in exact)  # the hook did round something
    assert lever_runs[run]["losses"] == pytest.approx(lever_runs["ddp"]["losses"], rel=torch.finfo(half).eps)


def test_fsdp_mixed_precision_follows_the_fp32_run_to_bf16_tolerance(lever_runs):
    import torch

    plain, levers = lever_runs["fsdp"], lever_runs["fsdp_levers"]
    assert plain["output_dtype"] == torch.float32 and levers["output_dtype"] == torch.bfloat16  # computed in bf16
    assert plain["block_sharded_after_forward"] and not levers["block_sharded_after_forward"]  # kept gathered
    assert plain["prefetched_by_block_0"] == [] and levers["prefetched_by_block_0"] == [True]  # the next block
    assert levers["losses"] == pytest.approx(plain["losses"], rel=2e-2)
    for name, weight in plain["weights"].items():
        assert levers["weights"][name].dtype == torch.float32  # the sharded master weights stay fp32
        torch.testing.assert_close(levers["weights"][name], weight, rtol=2e-2, atol=2e-3)
    for name, weight in lever_runs["ddp"]["weights"].items():  # no policy: FSDP trains as DDP does
        torch.testing.assert_close(plain["weights"][name], weight, rtol=1e-5, atol=1e-6)


def test_the_mixed_precision_policy_reduces_in_fp32_unless_told():
    import torch

    from firstsight.models.distributed import mixed_precision_policy

    hardware = compose(["hardware.data_parallel=fsdp"]).hardware
    assert mixed_precision_policy(hardware) is None  # today's FSDP: no policy at all
    hardware.fsdp_param_dtype = "bfloat16"
    policy = mixed_precision_policy(hardware)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    hardware.fsdp_reduce_dtype = "bfloat16"
    assert mixed_precision_policy(hardware).reduce_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["hardware.ddp_comm_dtype=fp8"], "hardware.ddp_comm_dtype='fp8'"),
        (["hardware.data_parallel=fsdp", "hardware.fsdp_param_dtype=half"], "hardware.fsdp_param_dtype='half'"),
        (["hardware.data_parallel=fsdp", "hardware.fsdp_reduce_dtype=fp32"], "hardware.fsdp_reduce_dtype='fp32'"),
    ],
)
def test_an_unknown_dtype_is_refused_with_the_valid_ones(overrides, fragment):
    from firstsight.core.errors import ConfigError
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert fragment in str(err.value) and "float32, bfloat16, float16" in str(err.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["hardware.ddp_bucket_cap_mb=0"], "hardware.ddp_bucket_cap_mb=0 "),
        (["hardware.data_parallel=fsdp", "hardware.fsdp_prefetch=-1"], "hardware.fsdp_prefetch=-1 "),
        (["hardware.fsdp_param_dtype=bfloat16"], "acts under hardware.data_parallel=fsdp only"),
        (["hardware.data_parallel=fsdp", "hardware.ddp_static_graph=true"], "leave it at false"),
    ],
)
def test_out_of_range_or_unused_levers_are_refused(overrides, fragment):
    from firstsight.core.errors import ConfigError
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match="is invalid") as err:
        validate(compose(overrides))
    assert fragment in str(err.value)
