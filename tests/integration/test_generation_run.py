"""Generation inside the tasks, in process; the decoding paths and their equality with generate:
unit/test_generation.py."""

from __future__ import annotations

import pytest
from conftest import compose


def _task(tmp_path, overrides):
    from mlflow.tracking import MlflowClient

    from firstsight.suite.dispatch import run_task

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = run_task(compose([*overrides, "train.progress_bar=false", f"tracking.tracking_uri={uri}"]))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("firstsight")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    return metrics, run.data.tags


def test_evaluate_gives_the_same_accuracies_under_both_methods(cache_dir, tmp_path):
    results = {}
    for method in ("static", "hf"):
        metrics, tags = _task(
            tmp_path / method, ["task=evaluate", "data.validation_size=24", f"hardware.generation={method}"]
        )
        expected = {"static": "static_eager", "hf": "hf_generate"}[method]
        assert tags["firstsight.generation"] == tags["firstsight.teacher_generation"] == expected
        results[method] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    assert results["static"] == results["hf"]  # every accuracy, per kind too
    assert results["static"]["eval/teacher_accuracy"] > results["static"]["eval/chance_accuracy"] + 0.1


@pytest.mark.parametrize("method, tag", [("static", "static_eager"), ("hf", "hf_generate")])
def test_profile_runs_under_each_method(cache_dir, tmp_path, method, tag):
    metrics, tags = _task(
        tmp_path,
        [
            "task=profile",
            f"hardware.generation={method}",
            "task.new_tokens=4",
            "task.warmup_queries=1",
            "task.latency_queries=3",
            "task.throughput_batch_size=3",
            "task.throughput_batches=2",
        ],
    )
    assert tags["firstsight.generation"] == tag
    assert 0 < metrics["infer/latency_p50_s"] <= metrics["infer/latency_p90_s"]
    assert metrics["infer/throughput_tokens_per_s"] == pytest.approx(4 * metrics["infer/throughput_qps"])
