"""Faults during a job: out of memory, a non-finite loss, a tracking store that does not
answer, a full disk while writing a checkpoint. Each is reported in one clear message, its MLflow
run is marked FAILED with the reason, and nothing already saved is lost."""

from __future__ import annotations

import errno

import pytest
from conftest import compose, default_store_runs

# A short in-process distillation (no Hydra context: its output directory is the working directory)
SHORT = [
    "train.max_steps=5",
    "train.throughput_warmup_steps=1",
    "train.eval_at_end=false",
    "train.progress_bar=false",
    "hardware.num_threads=1",
    "hardware.batch_size=2",
    "train.log_every_n_steps=1",
]


def _distill_in_process(tmp_path, monkeypatch, overrides, student_forward):
    """Run task=distill through firstsight.suite.dispatch.run_task (validation, MLflow run, exit status) with
    `student_forward(original, call_number, *args, **kwargs)` in place of the student's forward.
    Returns the SystemExit (None if the job ended normally)."""
    import firstsight.models.loading as models
    from firstsight.suite.dispatch import run_task

    real_load = models.load_model

    def load_model(spec, role, processor, device, frozen):
        loaded = real_load(spec, role, processor, device, frozen)
        if role == "student":
            original, calls = loaded.model.forward, []

            def forward(*args, **kwargs):
                calls.append(1)
                return student_forward(original, len(calls), *args, **kwargs)

            loaded.model.forward = forward  # nn.Module.__call__ looks forward up on the instance
        return loaded

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    cfg = compose([*SHORT, *overrides])
    try:
        run_task(cfg)
    except SystemExit as stop:
        return stop
    return None


def _only_run(tmp_path):
    [run] = default_store_runs(tmp_path)
    return run


# ----------------------------------------------------------------------------- out of memory


def test_out_of_memory_in_training_is_one_line_with_batch_memory_and_what_to_change(
    tmp_path, monkeypatch, capsys, cache_dir
):
    import torch

    def forward(original, call, *args, **kwargs):
        if call == 3:  # one micro-batch per step: the third step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
        return original(*args, **kwargs)

    stop = _distill_in_process(tmp_path, monkeypatch, [], forward)
    assert stop is not None and stop.code == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "out of memory at training step 3 of 5 on cpu" in line
    assert "hardware.batch_size=2 and hardware.grad_accum_steps=1" in line
    assert "peak RSS" in line and "GB of the machine's" in line
    assert "hardware.batch_size=1 hardware.grad_accum_steps=2" in line  # the same effective batch
    for tip in ("hardware.gradient_checkpointing=true", "lora.enabled=true", "precision.teacher_quantization=nf4"):
        assert tip in line
    assert "Traceback" not in err
    run = _only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["firstsight.error"].startswith("OutOfMemory: out of memory at training step 3 of 5")
    assert [m.step for m in _history(tmp_path, run, "train/loss")] == [1, 2]  # the steps before it are logged
    assert not (tmp_path / "checkpoints" / "student").exists()


def _history(tmp_path, run, key):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.info.run_id, key)


def test_a_non_finite_loss_stops_at_its_step_and_saves_nothing_broken(tmp_path, monkeypatch, capsys, cache_dir):
    from firstsight.training.resume import checkpoint_root, step_dirs

    def forward(original, call, *args, **kwargs):
        out = original(*args, **kwargs)
        if call == 3:
            out.logits = out.logits * float("nan")
        return out

    stop = _distill_in_process(
        tmp_path, monkeypatch, ["train.checkpoint_every_n_steps=1", "train.keep_checkpoints=1"], forward
    )
    assert stop is not None and stop.code == 2
    err = capsys.readouterr().err
    assert "error: the loss is nan at step 3" in err and "precision=fp32 or bf16" in err
    run = _only_run(tmp_path)
    assert run.info.status == "FAILED" and "the loss is nan at step 3" in run.data.tags["firstsight.error"]
    assert [p.name for p in step_dirs(checkpoint_root(tmp_path))] == ["step-0000002"]  # the last good one
    assert not (tmp_path / "checkpoints" / "student").exists()


# ----------------------------------------------------------------------------- tracking store


def _disk_refuses_writes(monkeypatch, error_number):
    """firstsight.core.files's writes get part of the data to the disk, then fail with `error_number`."""
    import os

    import firstsight.core.files as cache

    real_fdopen = os.fdopen

    class Refusing:
        def __init__(self, handle, mode):
            self.file = real_fdopen(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:3])
            self.file.flush()
            raise OSError(error_number, os.strerror(error_number))

    monkeypatch.setattr(cache.os, "fdopen", Refusing)


def test_a_full_disk_while_writing_the_jobs_metrics_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """metrics.json is written after the job's run is closed (firstsight.suite.dispatch.run_task): a full disk
    there is `error: ...` and exit status 2 too, not a traceback."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    import firstsight.suite.dispatch as tasks

    out = tmp_path / "outputs" / "job"
    out.mkdir(parents=True)
    monkeypatch.setattr(
        HydraConfig, "get", staticmethod(lambda: SimpleNamespace(runtime=SimpleNamespace(output_dir=str(out))))
    )
    monkeypatch.setattr(tasks, "_run_in_process", lambda cfg, world: {"train/loss": 1.0})  # the job itself: done
    _disk_refuses_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(SystemExit) as stop:
        tasks.run_task(compose(["hardware.num_threads=1"]))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: could not write {out / 'metrics.json'}: the disk is full" in err and "Traceback" not in err
    assert list(out.iterdir()) == []
