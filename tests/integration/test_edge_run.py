"""Edge deployment: per-part precision (vision tower, merger, language model) resolved on the real
Qwen2-VL classes and applied to the tiny pair; its validation; memory budgets (the verdict, an
injected out-of-memory, a CPU profile under a budget); the report's edge view."""

from __future__ import annotations

import re

import pytest
from conftest import compose

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_profile(tmp_path, overrides):
    from firstsight.suite.dispatch import run_task

    cfg = compose(
        [
            "task=profile",
            "task.latency_queries=2",
            "task.warmup_queries=1",
            "task.throughput_batches=1",
            "task.throughput_batch_size=2",
            "task.new_tokens=2",
            "train.progress_bar=false",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        ]
    )
    metrics = run_task(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("firstsight")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    return metrics, run


def test_a_profile_under_a_cpu_budget_logs_parts_and_the_rss_verdict(cache_dir, tmp_path):
    metrics, run = _run_profile(tmp_path, ["precision=int8_lm", "hardware.memory_budget_gb=64"])
    assert run.info.status == "FINISHED"
    assert metrics["edge/fits"] == 1.0 and metrics["edge/peak_gb"] == metrics["perf/peak_rss_gb"]
    assert metrics["edge/headroom_gb"] == pytest.approx(64 - metrics["edge/peak_gb"])
    assert run.data.metrics["edge/fits"] == 1.0 and run.data.tags["firstsight.edge.basis"] == "cpu_rss"
    parts = [metrics[f"model/weights_gb/{p}"] for p in ("vision", "merger", "language")]
    assert all(v > 0 for v in parts) and sum(parts) == pytest.approx(metrics["model/weights_gb"], rel=1e-9)
    tags = run.data.tags
    assert (tags["firstsight.precision.vision.dtype"], tags["firstsight.precision.vision.quantization"]) == (
        "bfloat16",
        "none",
    )
    assert (tags["firstsight.precision.language.dtype"], tags["firstsight.precision.language.quantization"]) == (
        "float16",
        "int8",
    )
    assert run.data.params["precision.parts.vision.dtype"] == "bfloat16"  # the config as given, beside it


def test_an_out_of_memory_while_profiling_finishes_the_run_with_the_verdict(cache_dir, tmp_path, monkeypatch):
    """The CUDA path on a CPU: the cap is faked and loading raises torch's out-of-memory error."""
    import torch

    import firstsight.core.memory
    import firstsight.models.loading

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(
        firstsight.core.memory, "apply_memory_budget", lambda budget, device: (firstsight.core.memory.CUDA_BASIS, {})
    )
    monkeypatch.setattr(firstsight.models.loading, "load_model", out_of_memory)
    metrics, run = _run_profile(tmp_path, ["hardware.memory_budget_gb=4"])
    assert run.info.status == "FINISHED"  # a result, not a crash of the sweep
    assert metrics["edge/fits"] == 0.0 and "edge/headroom_gb" not in metrics
    assert "infer/latency_p50_s" not in metrics
    assert run.data.metrics["edge/fits"] == 0.0
    assert run.data.tags["firstsight.edge.verdict"] == "does not fit"
    assert run.data.tags["firstsight.edge.oom_stage"] == "loading"
    assert re.search(
        r"out of memory while loading under a 4 GB budget .*Tried to allocate 4\.00 GiB",
        run.data.tags["firstsight.edge.reason"],
    )


# ----------------------------------------------------------------------------- the report's edge view


def _record(run_id, precision, budget, start, metrics, task="profile", model="qwen2vl_7b_2b", tags=None):
    from firstsight.tasks.report import RunRecord

    params = {
        "task.name": task,
        "precision.name": precision,
        "precision.dtype": "bfloat16",
        "precision.quantization": "nf4" if "nf4" in precision else "none",
        "model.name": model,
        "hardware.memory_budget_gb": str(budget),
        "hardware.name": f"edge_{budget}gb" if budget else "cpu",
    }
    return RunRecord(
        run_id=run_id,
        start_time=start,
        params=params,
        metrics=metrics,
        tags={"firstsight.task": task, "firstsight.sweep_id": "none", **(tags or {})},
    )


def _edge_metrics(budget, peak, latency=None, fits=None):
    metrics = {
        "edge/budget_gb": float(budget),
        "edge/peak_gb": peak,
        "edge/fits": float(peak <= budget if fits is None else fits),
    }
    if latency is not None:
        metrics.update({"edge/headroom_gb": budget - peak, "infer/latency_p50_s": latency})
    return metrics


OOM_TAGS = {"firstsight.edge.oom_stage": "loading", "firstsight.edge.basis": "cuda_allocator"}


def _sweep():
    """precision × budget on the real-size student, and the accuracy side from evaluate runs on tiny."""
    return [
        _record("bf16-4", "bf16", 4, 1, _edge_metrics(4, 3.9, fits=0), tags=OOM_TAGS),
        _record("int8lm-4", "int8_lm", 4, 2, _edge_metrics(4, 3.5, 1.40)),
        _record("nf4lm-4", "nf4_lm", 4, 3, _edge_metrics(4, 3.0, 1.00)),
        _record("nf4-4", "nf4", 4, 4, _edge_metrics(4, 2.0, 1.10)),
        _record("bf16-8", "bf16", 8, 5, _edge_metrics(8, 5.0, 0.90)),
        _record("nf4-8", "nf4", 8, 6, _edge_metrics(8, 2.0, 1.10)),
        _record("eval-bf16", "bf16", "None", 7, {"eval/student_accuracy": 0.40}, task="evaluate", model="tiny"),
        _record("eval-nf4lm", "nf4_lm", "None", 8, {"eval/student_accuracy": 0.38}, task="evaluate", model="tiny"),
        _record("eval-nf4", "nf4", "None", 9, {"eval/student_accuracy": 0.30}, task="evaluate", model="tiny"),
    ]


def test_the_report_shows_the_edge_view_from_mlflow(tmp_path):
    """Runs logged to a temporary MLflow store, then `task=report` in-process."""
    from mlflow.tracking import MlflowClient

    from firstsight.suite.dispatch import run_task
    from firstsight.tasks.report import md_unescape

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("firstsight")
    for record in _sweep():
        run = client.create_run(experiment_id, run_name=record.run_id, tags=record.tags, start_time=record.start_time)
        for key, value in record.params.items():
            client.log_param(run.info.run_id, key, value)
        for key, value in record.metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FINISHED")
    out = tmp_path / "report"
    metrics = run_task(compose(["task=report", f"tracking.tracking_uri={uri}", f"task.output_dir={out}"]))
    assert metrics["report/runs"] == 9
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Edge deployment", 1)[1].split("\n## ", 1)[0]
    assert "- 4 GB: 3 of 4 fit (nf4, nf4_lm, int8_lm); Pareto front on peak memory, latency p50: nf4, nf4_lm" in section
    assert "- 8 GB: 2 of 2 fit" in section
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [md_unescape(c.strip()) for c in re.split(r"(?<!\\)\|", lines[0])[1:-1]]
    rows = [
        dict(zip(header, [md_unescape(c.strip()) for c in re.split(r"(?<!\\)\|", line)[1:-1]])) for line in lines[1:]
    ]
    assert len(rows) == 6
    oom = next(r for r in rows if r["configuration"] == "bf16" and r["budget GB"] == "4")
    assert (oom["fits"], oom["Pareto front"], oom["note"]) == ("no", "", "out of memory while loading")
    nf4_8 = next(r for r in rows if r["configuration"] == "nf4" and r["budget GB"] == "8")
    assert (nf4_8["fits"], nf4_8["peak GB"], nf4_8["latency p50 s"], nf4_8["accuracy"], nf4_8["Pareto front"]) == (
        "yes",
        "2",
        "1.1",
        "0.3",
        "front",
    )
    assert (out / "edge_memory_vs_latency.png").read_bytes()[:8] == PNG_MAGIC
    assert "](edge_memory_vs_latency.png)" in markdown
    assert "Edge deployment" in (out / "report.html").read_text()
