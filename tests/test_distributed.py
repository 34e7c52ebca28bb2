"""Data-parallel distillation (firstsight/models/distributed.py) on the CPU: two torchrun processes (gloo)
against one process with twice the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import quick, run_py

from tests.conftest import ROOT, compose, default_store_runs

ARGS = [
    "train.max_steps=6",
    "train.progress_bar=false",
    "hardware.num_threads=1",
    "train.eval_at_end=false",
    "train.throughput_warmup_steps=1",
]


@pytest.fixture(scope="module")
def one_process(cache_dir, tmp_path_factory):
    """The reference: one process with the global batch (8)."""
    workdir = tmp_path_factory.mktemp("one-process")
    result = run_py([*ARGS, "hardware.batch_size=8", f"hydra.run.dir={workdir / 'single'}"], workdir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "single"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(one_process, cache_dir, tmp_path, strategy):
    """DDP: a whole student per process; FSDP: the student sharded over the two (checkpoints and
    the saved student gathered whole)."""
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    parallel = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "run.py"),
            *quick(ARGS),
            "hardware.batch_size=4",
            f"hardware.data_parallel={strategy}",
            "train.checkpoint_every_n_steps=3",
            f"hydra.run.dir={tmp_path / 'parallel'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert parallel.returncode == 0, (parallel.stdout + parallel.stderr)[-3000:]

    two = json.loads((tmp_path / "parallel" / "train_history.json").read_text())
    assert [h["step"] for h in two] == list(range(1, 7))
    one = json.loads((one_process / "train_history.json").read_text())
    for a, b in zip(one, two):  # the same samples per step; only float summation order differs
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)

    metrics = json.loads((tmp_path / "parallel" / "metrics.json").read_text())
    assert metrics["perf/processes"] == 2
    assert metrics["perf/throughput_tokens_per_s_per_process"] == pytest.approx(
        metrics["perf/throughput_tokens_per_s"] / 2
    )
    assert metrics["perf/peak_rss_gb_all_processes"] > metrics["perf/peak_rss_gb"] > 0

    runs = [r for r in default_store_runs(tmp_path) if r.data.params.get("hardware.batch_size") == "4"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone logs
    assert runs[0].data.metrics["perf/processes"] == 2
    assert "checkpoint written" in parallel.stdout + parallel.stderr  # step 3, gathered whole under fsdp
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "parallel" / "checkpoints" / "student" / "model.safetensors"))
    reference = load_file(str(one_process / "checkpoints" / "student" / "model.safetensors"))
    assert saved.keys() == reference.keys()
    for name, tensor in reference.items():  # whole tensors (not one process's shard), the same weights
        # atol: where a gradient is near 0 Adam's normalised step (lr 1e-3) turns the all-reduce's summation
        # order into a few 1e-5 on that weight
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-4)


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


def test_a_bad_lever_stops_run_py_with_one_line(cache_dir, tmp_path):
    result = run_py(["hardware.ddp_comm_dtype=fp8", "tracking.enabled=false"], tmp_path, cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "ddp_comm_dtype" in line]
    assert len(errors) == 1 and "'fp8'" in errors[0] and "float32, bfloat16, float16" in errors[0]
