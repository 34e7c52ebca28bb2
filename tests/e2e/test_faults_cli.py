"""Faults during a job: out of memory, a non-finite loss, a tracking store that does not
answer, a full disk while writing a checkpoint. Each is reported in one clear message, its MLflow
run is marked FAILED with the reason, and nothing already saved is lost."""

from __future__ import annotations

from conftest import default_store_runs

OOM_ON_BATCH_2 = """
import torch
from transformers.models.qwen2_vl import modeling_qwen2_vl as m
original = m.Qwen2VLForConditionalGeneration.forward
def forward(self, *args, **kwargs):
    if kwargs["input_ids"].shape[0] == 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return original(self, *args, **kwargs)
m.Qwen2VLForConditionalGeneration.forward = forward
"""


def test_a_sweep_point_that_runs_out_of_memory_fails_alone(run_cli, tmp_path, monkeypatch):
    """Hydra's basic launcher runs the points in this process and would stop the sweep at the
    first one that exits: the point that runs out of memory is marked failed, the next one runs."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(OOM_ON_BATCH_2)  # this sweep's batch of 2 does not fit
    monkeypatch.setenv("PYTHONPATH", str(patch))
    result = run_cli(
        "-m",
        "hardware.batch_size=2,1",
        "train.max_steps=2",
        "train.throughput_warmup_steps=1",
        "train.eval_at_end=false",
        "train.save_checkpoint=false",
        "train.progress_bar=false",
        "hardware.num_threads=1",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: out of memory at training step 1 of 2 on cpu with hardware.batch_size=2" in result.stderr
    assert "Traceback" not in result.stderr
    runs = default_store_runs(tmp_path)
    jobs = {r.data.params["hardware.batch_size"]: r for r in runs if r.data.tags.get("firstsight.role") != "sweep"}
    assert jobs["2"].info.status == "FAILED" and "OutOfMemory" in jobs["2"].data.tags["firstsight.error"]
    assert jobs["1"].info.status == "FINISHED"  # ran after the failed point
    [parent] = [r for r in runs if r.data.tags.get("firstsight.role") == "sweep"]
    assert parent.info.status == "FAILED"


# ----------------------------------------------------------------------------- non-finite loss
