"""Data-parallel distillation (firstsight/models/distributed.py) on the CPU: two torchrun processes (gloo)
against one process with twice the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import quick, run_py

from tests.conftest import ROOT, default_store_runs

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


def test_a_bad_lever_stops_run_py_with_one_line(cache_dir, tmp_path):
    result = run_py(["hardware.ddp_comm_dtype=fp8", "tracking.enabled=false"], tmp_path, cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "ddp_comm_dtype" in line]
    assert len(errors) == 1 and "'fp8'" in errors[0] and "float32, bfloat16, float16" in errors[0]
