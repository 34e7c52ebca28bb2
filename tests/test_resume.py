"""Preemption and resume (firstsight/training/resume.py): checkpoints, their manifest, stop signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def _write_checkpoint(root: Path, step: int, config=None, model=None):
    import torch

    from firstsight.training.resume import Checkpointer, named_trained_tensors

    cfg = compose(["train.keep_checkpoints=5"])
    model = model or torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpointer = Checkpointer(
        cfg.train, config_record(cfg), root.parent.parent, named_trained_tensors(model), run_id="abc"
    )
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


def test_restore_gives_back_weights_optimizer_and_rng(tmp_path):
    import torch

    from firstsight.training.resume import Checkpointer, latest_valid, locate, named_trained_tensors

    cfg = compose([])
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    saved_dir = _write_checkpoint(tmp_path / "checkpoints" / "resume", 7, model=model)
    expected_next_random = torch.rand(4)  # the RNG state was saved before this draw

    fresh = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved_with = compose(["train.keep_checkpoints=5"])
    point = locate(saved_with.train, config_record(saved_with), tmp_path)
    assert point is not None and point.path == saved_dir == latest_valid(tmp_path / "checkpoints" / "resume")
    assert point.run_id == "abc" and point.data_position == {"epoch": 0, "batches_into_epoch": 7}
    step = Checkpointer(
        cfg.train, config_record(cfg), tmp_path, named_trained_tensors(fresh), run_id="abc", resume=point
    ).restore(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    assert step == 7
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
    assert optimizer.state_dict()["state"][0]["step"] == 1
    torch.testing.assert_close(torch.rand(4), expected_next_random, rtol=0, atol=0)


def test_broken_checkpoints_are_skipped(tmp_path, caplog):
    from firstsight.training.resume import MANIFEST, TENSORS, latest_valid, verify

    root = tmp_path / "checkpoints" / "resume"
    good = _write_checkpoint(root, 5)
    corrupt = _write_checkpoint(root, 10)
    half = _write_checkpoint(root, 15)
    data = bytearray((corrupt / TENSORS).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size
    (corrupt / TENSORS).write_bytes(bytes(data))
    (half / MANIFEST).unlink()  # as a write cut short leaves it

    assert "sha256" in verify(corrupt)
    assert "no manifest" in verify(half)
    assert latest_valid(root) == good
    assert "skipping checkpoint" in caplog.text and "step-0000015" in caplog.text


def test_keeps_only_the_newest_checkpoints(tmp_path):
    import torch

    from firstsight.training.resume import Checkpointer, named_trained_tensors, step_dirs

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = compose(["train.keep_checkpoints=2"])
    checkpointer = Checkpointer(cfg.train, config_record(cfg), tmp_path, named_trained_tensors(model), None)
    for step in (2, 4, 6):
        checkpointer.save(step, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), {}, {})
    assert [p.name for p in step_dirs(checkpointer.root)] == ["step-0000006", "step-0000004"]


# ----------------------------------------------------------------------------- data position


def test_batches_resume_at_the_saved_position():
    from firstsight.data.batching import ShuffledBatches

    data = list(range(10))
    identity = lambda items: list(items)  # noqa: E731
    straight = ShuffledBatches(data, identity, batch_size=3, seed=4)
    order = [next(straight) for _ in range(7)]  # 3 batches per epoch: into the third epoch
    assert order[:3] != order[3:6]  # every epoch is reshuffled

    taken = ShuffledBatches(data, identity, batch_size=3, seed=4)
    for _ in range(4):
        next(taken)
    position = taken.position()
    assert position == {"epoch": 1, "batches_into_epoch": 1}
    resumed = ShuffledBatches(data, identity, batch_size=3, seed=4, position=position)
    assert [next(resumed) for _ in range(3)] == order[4:7]


# ----------------------------------------------------------------------------- stop signals


def test_stop_signal_waits_for_the_step_then_goes_to_the_previous_handler():
    """A handler installed before the job (submitit's) still gets the signal, after the step:
    its requeue-and-exit becomes Preempted carrying its exit code; if it returns (submitit's
    SIGTERM bypass) training goes on."""
    from firstsight.core.signals import STOP, Preempted

    received = []

    def requeue_and_exit(signum, frame):
        received.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        with STOP.installed():
            with STOP.deferred():
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.01)
                assert STOP.requested == signal.SIGUSR2 and received == []  # deferred to the step's end
                with pytest.raises(Preempted) as stop:
                    STOP.pass_on(step=3, checkpoint=Path("ckpt"))
            assert received == [signal.SIGUSR2] and stop.value.exit_code == -1 and stop.value.step == 3
            signal.signal(signal.SIGUSR2, requeue_and_exit)  # installed() restores it either way
        assert signal.getsignal(signal.SIGUSR2) is requeue_and_exit

        signal.signal(signal.SIGUSR2, lambda signum, frame: received.append("bypass"))
        with STOP.installed(), STOP.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            STOP.pass_on(step=4, checkpoint=None)  # returns: training continues
        assert received[-1] == "bypass"
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_default_action_outside_training_ends_the_job_at_once():
    from firstsight.core.signals import STOP, Preempted

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Preempted) as stop, STOP.installed():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stop.value.exit_code == 128 + signal.SIGTERM and stop.value.step is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_speed_settings_may_change_across_a_resume():
    """train.logits, train.fused_optimizer, hardware.compile and hardware.generation change how fast
    a step runs, not what it computes: a checkpoint written with other values (or before they
    existed) resumes; the learning rate still may not change."""
    from firstsight.training.resume import config_differences

    old = _config(["train.logits=all_positions", "train.fused_optimizer=false", "hardware.compile=true"])
    for key in ("logits", "fused_optimizer"):
        del old["train"][key]  # as a checkpoint of the version before these keys
    assert config_differences(old, _config(["hardware.generation=hf"])) == []
    assert config_differences(old, _config(["train.lr=0.5"])) == ["train.lr: 0.001 -> 0.5"]
