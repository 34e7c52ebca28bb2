"""One tracking server for many jobs: `python -m firstsight.tracking.server`, then a sweep of 8 jobs that
run and log at the same time (hydra/launcher=submitit_local: one process per job, all at once).
Nothing may be lost: every run, every param of the composed config, every metric the job wrote to
its metrics.json and every step of the per-step metrics."""

from __future__ import annotations

import json

from conftest import compose

from firstsight.config.record import config_record

LRS = ["0.001", "0.0012", "0.0014", "0.0016", "0.0018", "0.002", "0.0022", "0.0024"]
STEPS = 3
COMMON = [
    f"train.max_steps={STEPS}",
    "train.eval_at_end=false",
    "train.save_checkpoint=false",
    "train.throughput_warmup_steps=1",
    "train.progress_bar=false",
    "train.log_every_n_steps=1",
    "hardware.num_threads=1",
]


def _most_open_at_once(runs) -> int:
    """The largest number of `runs` open at one moment (start_time inclusive, end_time exclusive)."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    most = open_now = 0
    for _, change in events:  # at equal times the ends (-1) sort first: touching runs do not overlap
        open_now += change
        most = max(most, open_now)
    return most


def test_eight_concurrent_jobs_lose_nothing(run_cli, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from firstsight.tracking.tracker import flatten_config

    result = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        f"train.lr={','.join(LRS)}",
        *COMMON,
        "tracking.experiment_name=concurrent",
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "database is locked" not in result.stderr
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id])
    jobs = [r for r in runs if r.data.tags.get("firstsight.role") != "sweep"]
    (parent,) = [r for r in runs if r.data.tags.get("firstsight.role") == "sweep"]
    assert len(jobs) == len(LRS)
    assert parent.info.status == "FINISHED" and parent.data.tags["firstsight.jobs"] == str(len(LRS))
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert sorted(r.data.params["train.lr"] for r in jobs) == sorted(str(float(lr)) for lr in LRS)
    # the store served several jobs at once: by the runs' own start and end times, some runs were open
    # (their jobs writing params, tags and metrics) together; on a busy 2-core machine not all 8 need be
    assert _most_open_at_once(jobs) >= 2, [(r.info.start_time, r.info.end_time) for r in jobs]

    sweep_dirs = list(tmp_path.glob("multirun/*/*"))
    assert len(sweep_dirs) == 1 and not (tmp_path / "mlflow.db").exists()
    for run in jobs:
        assert run.info.status == "FINISHED"
        job_num = run.data.tags["firstsight.job_num"]
        # params: the whole composed config of that point, nothing missing or extra
        cfg = compose(
            [
                "hydra/launcher=submitit_local",
                f"train.lr={LRS[int(job_num)]}",
                *COMMON,
                "tracking.experiment_name=concurrent",
            ]
        )
        assert run.data.params == {k: v[:6000] for k, v in flatten_config(config_record(cfg)).items()}
        # metrics: every final value the job wrote locally reached MLflow, with the same value
        written = json.loads((sweep_dirs[0] / job_num / "metrics.json").read_text())
        assert set(written) <= set(run.data.metrics), set(written) - set(run.data.metrics)
        for key, value in written.items():
            assert abs(run.data.metrics[key] - value) <= 1e-6 * max(1.0, abs(value)), key
        # per-step metrics: one value per optimizer step
        for key in ("train/loss", "train/kd_loss", "train/ce_loss", "perf/step_time_s"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, STEPS + 1)), (key, steps)
