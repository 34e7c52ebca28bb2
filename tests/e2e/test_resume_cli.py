"""Preemption and resume (firstsight/training/resume.py): checkpoints, their manifest, stop signals."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import quick

from firstsight.config.record import config_record
from tests.conftest import ROOT, compose, default_store_runs

# ----------------------------------------------------------------------------- end to end (CLI)

RUN_ARGS = [
    "train.max_steps=20",
    "train.checkpoint_every_n_steps=5",
    "train.progress_bar=false",
    "hardware.num_threads=1",
    "train.eval_at_end=false",
]


def _start(run_dir: Path, workdir: Path, cache_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *quick(RUN_ARGS), f"hydra.run.dir={run_dir}"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _when_checkpoint(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    target = run_dir / "checkpoints" / "resume" / f"step-{step:07d}" / "manifest.json"
    deadline = time.monotonic() + timeout
    while not target.is_file():
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.02)


def _final_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["train/loss"]


def test_stopped_and_killed_run_resumes_to_the_same_final_loss(run_cli, cache_dir, tmp_path):
    """SIGTERM mid-training: a checkpoint after the current step, exit 143, run KILLED. The rerun
    resumes into the same MLflow run and is SIGKILLed after a periodic checkpoint; the third run
    resumes from that one and ends with the uninterrupted run's final loss, bit for bit."""
    reference = run_cli(*RUN_ARGS, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "preempted"
    first = _start(run_dir, tmp_path, cache_dir)
    _when_checkpoint(run_dir, 5, first)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM after step" in output
    stopped_at = [p.name for p in (run_dir / "checkpoints" / "resume").iterdir()]
    [killed_run] = [r for r in default_store_runs(tmp_path) if r.info.status == "KILLED"]

    second = _start(run_dir, tmp_path, cache_dir)
    _when_checkpoint(run_dir, 15, second)
    second.kill()  # SIGKILL: nothing runs after it
    second.communicate(timeout=60)

    third = run_cli(*RUN_ARGS, f"hydra.run.dir={run_dir}")
    assert third.returncode == 0, third.stderr[-3000:]
    log = third.stdout + third.stderr
    assert "resumed from" in log and "step-0000015" in log

    assert _final_loss(run_dir) == _final_loss(tmp_path / "reference")  # bitwise on the CPU
    assert not (run_dir / "checkpoints" / "resume").exists()  # a finished run keeps only its student
    assert (run_dir / "checkpoints" / "student" / "model.safetensors").is_file()
    # the stop's checkpoint is the one of the step it stopped after: its own (step 6 or later), or
    # step 5's when the signal came while step 5 was being checkpointed (which step it lands in is
    # a matter of timing, more so on a busy machine)
    stopped_step = int(re.search(r"stopped by SIGTERM after step (\d+); checkpoint", output).group(1))
    assert stopped_step >= 5 and f"step-{stopped_step:07d}" in stopped_at, (stopped_step, stopped_at)

    runs = {r.info.run_id: r for r in default_store_runs(tmp_path)}
    assert len(runs) == 2  # the reference and the one run all three processes wrote to
    resumed = runs[killed_run.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["firstsight.resumed_at_step"] == "15"
    assert resumed.data.params["train.max_steps"] == "20"
    import mlflow

    history = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        resumed.info.run_id, "train/loss"
    )
    assert {m.step for m in history} == set(range(1, 21))


def test_resume_with_other_settings_is_refused(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = _write_checkpoint(run_dir / "checkpoints" / "resume", step=3, config=_config(["train.max_steps=20"]))
    result = run_cli("train.max_steps=20", "train.lr=0.5", f"train.resume={checkpoint}")
    assert result.returncode == 2
    assert "cannot resume from" in result.stderr and "train.lr: 0.001 -> 0.5" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was created

    nowhere = run_cli(f"train.resume={tmp_path / 'nothing-here'}")
    assert nowhere.returncode == 2 and "no resumable checkpoint there" in nowhere.stderr
    assert "valid values: auto, never or such a path" in nowhere.stderr


# ----------------------------------------------------------------------------- checkpoints


def _config(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(overrides), resolve=True, enum_to_str=True)


@functools.cache
def _saved_with():
    """The config _write_checkpoint saves its checkpoints with, and its record (composed once)."""
    cfg = compose(["train.keep_checkpoints=5"])
    return cfg, config_record(cfg)


def _write_checkpoint(root: Path, step: int, config=None, model=None):
    import torch

    from firstsight.training.resume import Checkpointer, named_trained_tensors

    cfg, record = _saved_with()
    model = model or torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpointer = Checkpointer(cfg.train, record, root.parent.parent, named_trained_tensors(model), run_id="abc")
    if config is not None:
        checkpointer.config = config
    return checkpointer.save(
        step,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cpu", enabled=False),
        {"epoch": 0, "batches_into_epoch": step},
        {"loss": 1.0},
    )
