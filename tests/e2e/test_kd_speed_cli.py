"""The KD step's speed settings through `python run.py`; what they are and the equality tests of each
against the naive path: unit/test_kd_speed.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(cache_dir, workdir, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "train.max_steps=4",
            "train.eval_at_end=false",
            "train.save_checkpoint=false",
            "tracking.enabled=false",
            "train.progress_bar=false",
            "train.throughput_warmup_steps=1",
            *overrides,
            f"hydra.run.dir={workdir}",
            "experiment=debug",
        ],
        cwd=workdir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _curves(cache_dir, tmp_path, key: str, values) -> dict:
    """The per-step history (train_history.json) of one 4-step batch-4 job per value of `key`."""
    curves = {}
    for value in values:
        result = _run(cache_dir, tmp_path / value, f"{key}={value}", "hardware.batch_size=4")
        assert result.returncode == 0, result.stderr[-3000:]
        curves[value] = json.loads((tmp_path / value / "train_history.json").read_text())
        assert len(curves[value]) == 4
    return curves


@pytest.mark.slow
def test_a_job_on_answer_positions_follows_the_full_logits_loss_curve(cache_dir, tmp_path):
    curves = _curves(cache_dir, tmp_path, "train.logits", ("all_positions", "answer_positions"))
    for full, sliced in zip(curves["all_positions"], curves["answer_positions"]):
        assert sliced["train/loss"] == pytest.approx(full["train/loss"], rel=1e-6)
        assert sliced["train/kd_loss"] == pytest.approx(full["train/kd_loss"], rel=1e-6)
        assert sliced["train/grad_norm"] == pytest.approx(full["train/grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_pure_bf16_training_holds_the_student_in_bf16(cache_dir, tmp_path):
    result = _run(
        cache_dir,
        tmp_path / "bf16",
        "precision=bf16",
        "precision.trainable_dtype=bfloat16",
        "train.save_checkpoint=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "bf16" / "train_history.json").read_text())
    assert all(math.isfinite(h["train/loss"]) and h["train/loss"] > 0 for h in history)  # neither NaN nor inf
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    from safetensors import safe_open

    saved = tmp_path / "bf16" / "checkpoints" / "student" / "model.safetensors"
    with safe_open(str(saved), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}


def test_float16_trainable_weights_are_refused(run_cli, tmp_path):
    result = run_cli("precision=fp16", "precision.trainable_dtype=float16")
    assert result.returncode == 2
    assert "precision.trainable_dtype='float16'" in result.stderr and "bfloat16" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before the MLflow run was created
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


@pytest.mark.slow
def test_a_job_with_padded_batches_follows_the_unpadded_loss_curve(cache_dir, tmp_path):
    curves = _curves(cache_dir, tmp_path, "hardware.pad_to_multiple_of", ("null", "64"))
    for plain, padded in zip(curves["null"], curves["64"]):
        assert padded["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-5)
        assert padded["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-4)
    bad = _run(cache_dir, tmp_path / "bad", "hardware.pad_to_multiple_of=0")
    assert bad.returncode != 0 and "hardware.pad_to_multiple_of=0" in bad.stderr and "e.g. 64" in bad.stderr
