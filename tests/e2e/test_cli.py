"""`python run.py` as users call it: the default job, the two sweeps, --help, --cfg job, and bad
input. Each leaves its MLflow runs in the default store of its working directory, read back
through the MLflow API."""

from __future__ import annotations

import pytest
from conftest import default_store_runs

EXPECTED_METRICS = {
    "train/loss",
    "train/kd_loss",
    "train/ce_loss",
    "perf/throughput_samples_per_s",
    "perf/throughput_tokens_per_s",
    "perf/peak_rss_gb",
    "perf/step_time_s",
    "model/params_b",
    "model/weights_gb",
    "eval/teacher_accuracy",
    "eval/student_accuracy",
    "eval/accuracy_drop",
    # each accuracy with its 95 % interval, the drop paired, the student before distillation, grey frames
    "eval/questions",
    "eval/student_accuracy_ci_low",
    "eval/student_accuracy_ci_high",
    "eval/accuracy_drop_ci_low",
    "eval/accuracy_drop_ci_high",
    "eval/full_precision_accuracy_drop",
    "eval/student_accuracy_before",
    "eval/distill_gain",
    "eval/distill_gain_ci_low",
    "eval/teacher_blind_accuracy",
    "eval/student_blind_accuracy",
}


def _jobs_and_parents(workdir):
    runs = default_store_runs(workdir)
    parents = [r for r in runs if r.data.tags.get("firstsight.role") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("firstsight.role") != "sweep"]
    return jobs, parents


def _check_job_run(run, max_steps):
    assert run.info.status == "FINISHED"
    assert EXPECTED_METRICS <= set(run.data.metrics), EXPECTED_METRICS - set(run.data.metrics)
    assert "perf/peak_vram_gb" not in run.data.metrics  # CPU: RSS, never a made-up VRAM figure
    params = run.data.params
    for key in (
        "model.name",
        "precision.dtype",
        "precision.quantization",
        "distill_loss.temperature",
        "distill_loss.alpha",
        "hardware.batch_size",
        "train.max_steps",
        "seed",
        "model.teacher.tiny.hidden_size",
    ):
        assert key in params, key
    assert int(params["train.max_steps"]) == max_steps
    tags = run.data.tags
    assert tags["firstsight.task"] == "distill"
    assert tags["firstsight.device_name"].startswith("cpu")
    assert tags["version.torch"] and tags["version.transformers"]


def test_default_run_end_to_end(run_cli, tmp_path):
    result = run_cli()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distilling" in result.stderr  # the progress bar
    jobs, parents = _jobs_and_parents(tmp_path)
    assert len(jobs) == 1 and not parents
    run = jobs[0]
    _check_job_run(run, max_steps=40)
    assert run.data.params["precision.name"] == "fp32"
    assert run.data.tags["firstsight.sweep_id"] == "none"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 41))  # one value per optimizer step
    losses = [m.value for m in history]
    assert sum(losses[-5:]) < sum(losses[:5])  # the student learns
    config_text = (tmp_path / "mlruns").rglob("config.yaml")
    assert any("precision:" in p.read_text() for p in config_text)  # the resolved config artifact
    assert list(tmp_path.glob("outputs/*/*/checkpoints/student/model.safetensors"))
    assert _mlflow_ui_lists(tmp_path) == [run.info.run_id]


@pytest.mark.slow
def test_the_main_job_lifts_the_student_clearly(run_cli, tmp_path):
    """`python run.py` as the README runs it (no preset): the student's accuracy before and after
    distillation on the same 1024 questions, the after above the before by a paired interval that
    excludes 0, and above chance. One torch thread (the same figures as two, about 95 s alone): two
    OpenMP pools on two busy cores wait for each other many times over."""
    result = run_cli("hardware.num_threads=1", full=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "before → " in log and "after distillation" in log
    (run,) = default_store_runs(tmp_path)
    m = run.data.metrics
    assert m["eval/questions"] == 1024 and int(run.data.params["train.max_steps"]) == 400
    assert m["eval/distill_gain_ci_low"] > 0, m  # clearly above its own start
    assert m["eval/student_accuracy_ci_low"] > m["eval/chance_accuracy"] + 0.05, m  # and clearly above chance
    assert m["eval/student_accuracy"] < m["eval/teacher_accuracy"], m  # with room left below its teacher


def _mlflow_ui_lists(workdir):
    """Start `mlflow ui` with no flags in `workdir` (as docs/mlflow.md says) and ask it for the
    runs."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                    data=json.dumps({"experiment_ids": ["1"]}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    return [r["info"]["run_id"] for r in json.load(response).get("runs", [])]
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _check_sweep(tmp_path, expected_points):
    jobs, parents = _jobs_and_parents(tmp_path)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert len(jobs) == len(expected_points)
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert {r.data.tags["firstsight.sweep_id"] for r in jobs} == {parent.data.tags["firstsight.sweep_id"]}
    return jobs


def test_sweep_over_fp16_and_int8(run_cli, tmp_path):
    # docs/sweeps-and-slurm.md's sweep, shortened: fp16 autocast on this CPU takes ~1.1 s a step
    result = run_cli("-m", "precision=fp16,int8", "train.max_steps=12")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _check_sweep(tmp_path, ["fp16", "int8"])
    assert sorted(r.data.params["precision.name"] for r in jobs) == ["fp16", "int8"]
    for run in jobs:
        _check_job_run(run, max_steps=12)
    by_name = {r.data.params["precision.name"]: r for r in jobs}
    assert by_name["int8"].data.params["precision.quantization"] == "int8"
    assert (
        by_name["int8"].data.metrics["model/teacher_weights_gb"]
        < by_name["fp16"].data.metrics["model/teacher_weights_gb"]
    )
    assert len(list(tmp_path.glob("multirun/*/*/[01]/.hydra/config.yaml"))) == 2


def test_sweep_over_precision_and_temperature(run_cli, tmp_path):
    result = run_cli("-m", "precision=fp32,bf16", "distill_loss.temperature=1,4", "train.max_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _check_sweep(tmp_path, range(4))
    points = sorted((r.data.params["precision.name"], float(r.data.params["distill_loss.temperature"])) for r in jobs)
    assert points == [("bf16", 1.0), ("bf16", 4.0), ("fp32", 1.0), ("fp32", 4.0)]
    for run in jobs:
        _check_job_run(run, max_steps=10)


def test_overrides_from_the_command_line(run_cli, tmp_path):
    result = run_cli("distill_loss.alpha=0.5", "hardware.batch_size=8", "train.max_steps=20", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "alpha: 0.5" in result.stdout and "batch_size: 8" in result.stdout and "max_steps: 20" in result.stdout


def test_help_lists_groups_and_choices(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0
    for line in (
        "model: llava_ov_7b_2b, qwen2vl_7b_2b, tiny, tiny_llava",
        "distill_loss: forward_kl, jsd, none, reverse_kl, skew_forward_kl, skew_reverse_kl",
        "hardware: cpu, edge_16gb, edge_4gb, edge_8gb, gpu",
        "precision: bf16, fp16, fp32, fp8, int8, int8_lm, int8_weight_only, nf4, nf4_lm",
    ):
        assert line in result.stdout


@pytest.mark.parametrize(
    "args, named, valid",
    [
        (["precision=fp64"], "precision/fp64", "fp32"),
        (["hardware.batch_size=eight"], "eight", "Integer"),
        (["hardware.batch_size=-4"], "hardware.batch_size=-4", ">= 1"),
        (["precision=int8"], "precision.quantization=int8", "precision=fp32, bf16 or fp16"),
    ],
    ids=["unknown-choice", "wrong-type", "negative-batch", "backend-cannot-run-here"],
)
def test_bad_input_exits_nonzero_before_anything_is_built(run_cli, tmp_path, monkeypatch, args, named, valid):
    if args == ["precision=int8"]:  # a machine whose bitsandbytes cannot be imported
        blocker = tmp_path / "blocker"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
        monkeypatch.setenv("PYTHONPATH", str(blocker))
    result = run_cli(*args)
    assert result.returncode != 0
    assert named in result.stderr and valid in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was created
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


def test_a_sweep_with_a_bad_shared_value_stops_before_it_starts(run_cli, tmp_path):
    result = run_cli("-m", "precision=fp16,int8", "distill_loss.temperature=-1")
    assert result.returncode == 2
    assert "distill_loss.temperature=-1.0" in result.stderr and "must be > 0" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no parent run, no job run


def test_a_sweep_whose_job_fails_closes_its_parent_run_as_failed(run_cli, tmp_path):
    result = run_cli("-m", "hardware.batch_size=-1,2")
    assert result.returncode == 2 and "hardware.batch_size=-1" in result.stderr
    jobs, parents = _jobs_and_parents(tmp_path)
    assert not jobs  # the bad point was refused before its run was created
    assert [p.info.status for p in parents] == ["FAILED"]


def test_profile_sweep_over_precisions(run_cli, tmp_path):
    """The study's quantization comparison on the CPU default: one run per precision."""
    result = run_cli(
        "-m",
        "task=profile",
        "precision=fp32,bf16,int8,nf4",
        "task.latency_queries=3",
        "task.warmup_queries=1",
        "task.throughput_batches=1",
        "task.new_tokens=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _check_sweep(tmp_path, range(4))
    weights = {}
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["firstsight.task"] == "profile"
        assert {
            "infer/load_time_s",
            "infer/latency_p50_s",
            "infer/latency_p90_s",
            "infer/throughput_qps",
            "model/weights_gb",
            "perf/peak_rss_gb",
        } <= set(run.data.metrics)
        weights[run.data.params["precision.name"]] = run.data.metrics["model/weights_gb"]
    assert weights["nf4"] < weights["int8"] < weights["bf16"] < weights["fp32"]
