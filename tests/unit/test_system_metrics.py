"""A job's MLflow run: the training kind on its experiment, MLflow's own system metrics
(tracking.system_metrics), and the student as an MLflow model (tracking.log_model); docs/mlflow.md."""

from __future__ import annotations

import time

import pytest
from conftest import compose

from firstsight.config.specs import tracking_spec
from firstsight.core.errors import ConfigError


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def test_experiments_are_created_with_the_training_kind_the_ui_opens_on(tmp_path):
    from firstsight.tracking.tracker import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, get_or_create_experiment

    _, client = _client(tmp_path)
    new = get_or_create_experiment(client, "new")
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    older = client.create_experiment("older")  # made before the tag: it gets it
    assert get_or_create_experiment(client, "older") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})  # a user's choice stays
    get_or_create_experiment(client, "chosen")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_the_kind_is_one_the_installed_mlflow_ui_knows():
    from pathlib import Path

    import mlflow

    from firstsight.tracking.tracker import EXPERIMENT_KIND

    bundles = list((Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js").glob("main.*.js"))
    if not bundles:
        pytest.skip("this mlflow has no UI bundle (mlflow-skinny)")
    assert any(f'"{EXPERIMENT_KIND}"' in b.read_text(errors="replace") for b in bundles)


def test_a_job_run_gets_mlflows_system_metrics(tmp_path, monkeypatch):
    from firstsight.tracking.tracker import job_tracker

    monkeypatch.chdir(tmp_path)
    uri, client = _client(tmp_path)
    cfg = compose([f"tracking.tracking_uri={uri}", "tracking.system_metrics_interval_s=0.2"])
    with job_tracker(tracking_spec(cfg)) as tracker:
        time.sleep(1.0)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    assert len(client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")) >= 2


def test_system_metrics_can_be_turned_off(tmp_path, monkeypatch):
    from firstsight.tracking.tracker import job_tracker

    monkeypatch.chdir(tmp_path)
    uri, client = _client(tmp_path)
    cfg = compose(
        [f"tracking.tracking_uri={uri}", "tracking.system_metrics=false", "tracking.system_metrics_interval_s=0.1"]
    )
    with job_tracker(tracking_spec(cfg)) as tracker:
        time.sleep(0.5)
    assert not [k for k in client.get_run(tracker.run_id).data.metrics if k.startswith("system/")]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["tracking.system_metrics_interval_s=0"], "tracking.system_metrics_interval_s=0"),
        (["tracking.log_model=true", "train.save_checkpoint=false"], "train.save_checkpoint=true"),
        (["tracking.log_model=true", "tracking.enabled=false"], "enable tracking"),
    ],
)
def test_tracking_settings_that_cannot_work_are_refused(overrides, fragment):
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match=fragment):
        validate(compose(overrides))


def test_log_model_logs_the_student_as_a_transformers_model(tiny_parts, tmp_path, monkeypatch):
    """The tiny student, saved as distill saves it, logged to a run and loaded back by MLflow."""
    import mlflow

    from firstsight.models.loading import save_model_atomically
    from firstsight.tracking.tracker import job_tracker

    monkeypatch.chdir(tmp_path)
    uri, client = _client(tmp_path)
    cfg = compose([f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"])
    save_model_atomically(tiny_parts.model("student"), tiny_parts.processor, str(tmp_path / "student"), {})
    with job_tracker(tracking_spec(cfg)) as tracker:
        model_uri = tracker.log_model(str(tmp_path / "student"))
    assert not mlflow.is_tracking_uri_set()  # MLflow's global store is left as it was
    run = client.get_run(tracker.run_id)
    assert run.data.tags["firstsight.logged_model"] == model_uri
    assert [f"models:/{m.model_id}" for m in run.outputs.model_outputs] == [model_uri]
    mlflow.set_tracking_uri(uri)
    try:
        components = mlflow.transformers.load_model(model_uri, return_type="components")
    finally:
        mlflow.set_tracking_uri(None)
    assert type(components["model"]).__name__ == "Qwen2VLForConditionalGeneration"
    assert components["task"] == "image-text-to-text"
