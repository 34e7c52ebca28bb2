"""The optional hidden-state distillation term (firstsight.losses.kd.HiddenStateLoss and
HiddenDistillation) against a float64 reference written out token by token here, its config
checks, its training (optimize(extra_parameters=...)) and one short `python run.py` with it on."""

from __future__ import annotations

import math

import pytest
from conftest import default_store_runs

# tiny tensors: extra OpenMP threads only wait for each other on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_run_with_the_hidden_term_logs_it(run_cli, tmp_path):
    result = run_cli(
        "distill_loss.hidden_weight=0.5",
        "distill_loss.hidden_loss=cosine",
        "distill_loss.hidden_layers=[1,-1]",
        "train.max_steps=3",
        "train.throughput_warmup_steps=1",
        "train.eval_at_end=false",
        "hardware.batch_size=2",
        "train.progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = default_store_runs(tmp_path)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "train/hidden_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert all(math.isfinite(m.value) and 0 <= m.value <= 2 for m in history)  # a cosine term: in [0, 2]
    # each step's loss is the KD loss plus hidden_weight x the term, as logged
    alpha, temperature = (
        float(run.data.params["distill_loss.alpha"]),
        float(run.data.params["distill_loss.temperature"]),
    )
    logged = {
        key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, f"train/{key}"), key=lambda m: m.step)]
        for key in ("loss", "kd_loss", "ce_loss", "hidden_loss")
    }
    for loss, kd, ce, hidden in zip(*logged.values()):
        expected = alpha * temperature**2 * kd + (1 - alpha) * ce + 0.5 * hidden
        assert loss == pytest.approx(expected, rel=1e-5), (loss, kd, ce, hidden)
    assert run.data.params["distill_loss.hidden_weight"] == "0.5"
    # the saved student is a stock model: the projections are not in it
    from safetensors import safe_open

    [weights] = tmp_path.glob("outputs/*/*/checkpoints/student/model.safetensors")
    with safe_open(str(weights), "pt") as f:
        assert not any("projection" in key or "hidden" in key for key in f.keys())
