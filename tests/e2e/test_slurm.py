"""Sweeps on a real SLURM cluster: `python run.py -m hardware=slurm_local ...` against the local
single-node cluster that `scripts/local_slurm.sh start` brings up (.ci/run starts it before the
tests). Skipped, with the reason, where no cluster answers. Jobs log through an MLflow server
(MLFLOW_TRACKING_URI, passed to the jobs by sbatch) and are checked through `sacct` and MLflow."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import ROOT
from test_cli import EXPECTED_METRICS

PARTITION = "local"  # conf/hardware/slurm_local.yaml, scripts/local_slurm.sh
SMALL = [
    "train.eval_at_end=false",
    "train.save_checkpoint=false",
    "train.throughput_warmup_steps=1",
    "train.progress_bar=false",
]
START_HINT = "start one with: scripts/local_slurm.sh start (as root)"


def _controller_address() -> Optional[tuple]:
    """slurmctld's host and port from slurm.conf, when it names them (sinfo takes ~10 s to give up
    on a controller that is down; a refused connection says so at once)."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        lines = conf.read_text().splitlines()
    except OSError:
        return None
    settings = dict(line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#"))
    host = settings.get("SlurmctldHost", "").split("(")[0].strip()
    return (host, int(settings.get("SlurmctldPort", "6817").split("-")[0])) if host else None


def _why_no_cluster() -> Optional[str]:
    for tool in ("sinfo", "sbatch", "sacct", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: no SLURM client on this machine; {START_HINT}"
    address = _controller_address()
    if address is not None:
        try:
            socket.create_connection(address, timeout=3).close()
        except OSError as err:
            return f"no SLURM controller answers at {address[0]}:{address[1]} ({err}); {START_HINT}"
    try:
        state = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%t"], capture_output=True, text=True, timeout=15)
        accounting = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer ({err}); {START_HINT}"
    if state.returncode != 0 or not {"idle", "mix", "alloc", "comp"} & set(state.stdout.split()):
        return (
            f"no usable node in SLURM partition '{PARTITION}' ({(state.stdout + state.stderr).strip()!r}); {START_HINT}"
        )
    if accounting.returncode != 0:
        return f"SLURM accounting is off (sacct: {accounting.stderr.strip()!r}); {START_HINT}"
    return None


_REASON = _why_no_cluster()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def _runs(uri: str, experiment: str) -> List:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _sweep_dir(workdir: Path) -> Path:
    (sweep,) = workdir.glob("multirun/*/*")
    return sweep


def _array_job_id(sweep: Path) -> str:
    """The sweep's SLURM array job (submitit keeps its sbatch script in .submitit/<id>/)."""
    (job_id,) = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name.isdigit()]
    return job_id


def _sacct_states(sweep: Path, timeout: float = 30) -> Dict[str, str]:
    """SLURM's final state of each job (array task) of the sweep."""
    deadline = time.time() + timeout
    while True:  # a job's result can be read a moment before SLURM records its end
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", _array_job_id(sweep)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if line.strip())
        if all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in states.values()) or time.time() > deadline:
            return states
        time.sleep(0.5)


def test_sweep_runs_on_slurm(run_cli, tmp_path, mlflow_server, cache_dir):
    """The cluster example of docs/sweeps-and-slurm.md: each point is a SLURM job, COMPLETED in
    sacct, with its MLflow run (under the sweep's parent) holding the config and the metrics."""
    result = run_cli(
        "-m",
        "hardware=slurm_local",
        "precision=fp32,bf16",
        "train.max_steps=2",
        *SMALL,
        "tracking.experiment_name=slurm",
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = _sweep_dir(tmp_path)
    states = _sacct_states(sweep)
    assert len(states) == 2 and set(states.values()) == {"COMPLETED"}, states
    assert all("_" in job_id for job_id in states)  # one array job, one task per point

    runs = _runs(mlflow_server, "slurm")
    parents = [r for r in runs if r.data.tags.get("firstsight.role") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("firstsight.role") != "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["precision.name"] for r in jobs) == ["bf16", "fp32"]
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id  # found via the sweep dir / env
        assert {m for m in EXPECTED_METRICS if not m.startswith("eval/")} <= set(run.data.metrics)
        assert run.data.params["hardware.name"] == "slurm_local"
        assert run.data.params["cache_dir"] == str(cache_dir)  # the environment reached the job (sbatch)
    # everything went to the server: no job fell back to a SQLite file in the working directory
    assert not (tmp_path / "mlflow.db").exists()


def test_failed_and_cancelled_points_are_reported(cache_dir, tmp_path, mlflow_server):
    """A point that fails in its job (a bad value: exit status 2) and one cancelled with scancel
    while it trains: the sweep ends with status 1 naming each point, why, and its log; the point
    that finished keeps its run; the cancelled job's run, which it could not close, is KILLED."""
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=mlflow_server)
    # point 0 finishes, point 1 is invalid (max_steps=0), point 2 trains long enough to be cancelled
    sweep = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            "hardware=slurm_local",
            "train.max_steps=2,0,2000",
            *SMALL,
            "tracking.experiment_name=slurm-fail",
            "experiment=debug",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not [r for r in _runs(mlflow_server, "slurm-fail") if r.data.tags.get("firstsight.job_num") == "2"]:
            assert sweep.poll() is None and time.time() < deadline, "point 2 never started its MLflow run"
            time.sleep(0.5)
        job_id = f"{_array_job_id(_sweep_dir(tmp_path))}_2"
        subprocess.run(["scancel", job_id], check=True)
        stdout, stderr = sweep.communicate(timeout=240)
    finally:
        if sweep.poll() is None:  # the test failed: leave no job behind
            sweep.kill()
            if list(tmp_path.glob("multirun/*/*/.submitit")):
                subprocess.run(["scancel", _array_job_id(_sweep_dir(tmp_path))])
    assert sweep.returncode == 1, stderr[-4000:]
    assert "2 of 3 sweep point(s) failed" in stderr, stderr[-4000:]
    report = stderr[stderr.index("2 of 3 sweep point(s) failed") :]
    assert "#1 hardware=slurm_local train.max_steps=0" in report and "is invalid" in report
    assert "#2 hardware=slurm_local train.max_steps=2000" in report and "was cancelled" in report
    assert f"(SLURM job {job_id})" in report
    failures = {f["job_num"]: f for f in json.loads((_sweep_dir(tmp_path) / "failed_jobs.json").read_text())}
    assert set(failures) == {1, 2}
    for failure in failures.values():
        assert failure["logs"] and all(Path(p).is_file() for p in failure["logs"])
        assert failure["logs"][0] in report
    assert failures[2]["state"].startswith("CANCELLED")

    states = _sacct_states(_sweep_dir(tmp_path))
    assert sorted(s.split()[0] for s in states.values()) == ["CANCELLED", "COMPLETED", "FAILED"], states

    runs = _runs(mlflow_server, "slurm-fail")
    by_num = {r.data.tags.get("firstsight.job_num"): r for r in runs if r.data.tags.get("firstsight.role") != "sweep"}
    assert set(by_num) == {"0", "2"}  # point 1 stopped before opening a run
    assert by_num["0"].info.status == "FINISHED" and "train/loss" in by_num["0"].data.metrics
    assert by_num["2"].info.status == "KILLED" and "cancelled" in by_num["2"].data.tags["firstsight.error"]
    (parent,) = [r for r in runs if r.data.tags.get("firstsight.role") == "sweep"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["firstsight.failed_jobs"] == "2" and parent.data.tags["firstsight.jobs"] == "3"
    assert "#2 hardware=slurm_local train.max_steps=2000" in parent.data.tags["firstsight.failed_points"]


def test_a_request_the_cluster_cannot_meet_fails_at_submission(run_cli, tmp_path, mlflow_server):
    """hardware=slurm (GPU jobs) passes the checks on this GPU-less machine (the jobs check GPUs
    where they run) and reaches sbatch, which refuses GPUs the local cluster lacks: the sweep
    says so at once instead of leaving jobs pending forever."""
    result = run_cli(
        "-m",
        "hardware=slurm",
        f"hydra.launcher.partition={PARTITION}",
        "precision=bf16,fp16",
        "tracking.experiment_name=slurm-refused",
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert result.returncode == 1
    assert "error: slurm refused the sweep's jobs: sbatch: error:" in result.stderr, result.stderr[-3000:]
    assert "gpus_per_node" in result.stderr  # what to check


def test_a_preempted_job_is_requeued_and_resumes_into_its_run(cache_dir, tmp_path, mlflow_server):
    """SIGUSR2 (SLURM's warning before a time limit or preemption) while a job trains: the step
    ends with a checkpoint, submitit's handler requeues the job, and the requeued job resumes from
    that checkpoint in the same output directory, into the same MLflow run."""
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=mlflow_server)
    sweep = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            "hardware=slurm_local",
            "train.max_steps=300",
            "train.checkpoint_every_n_steps=20",
            *SMALL,
            "tracking.experiment_name=slurm-requeue",
            "experiment=debug",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob("multirun/*/*/0/checkpoints/resume/step-0000020/manifest.json")):
            assert sweep.poll() is None and time.time() < deadline, "the job never wrote its step-20 checkpoint"
            time.sleep(0.2)
        job_id = _array_job_id(_sweep_dir(tmp_path))  # one point: submitit submits a plain job, not an array
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        while (
            "PENDING"
            not in subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        ):  # requeued (SLURM holds it ~2 min)
            assert sweep.poll() is None and time.time() < deadline, "the job was not requeued"
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        stdout, stderr = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            if list(tmp_path.glob("multirun/*/*/.submitit")):
                subprocess.run(["scancel", _array_job_id(_sweep_dir(tmp_path))])
    assert sweep.returncode == 0, stderr[-4000:]
    logs = "".join(p.read_text() for p in _sweep_dir(tmp_path).glob(".submitit/*/*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "resumed from" in logs

    [run] = [r for r in _runs(mlflow_server, "slurm-requeue") if r.data.tags.get("firstsight.role") != "sweep"]
    assert run.info.status == "FINISHED"
    resumed_at = int(run.data.tags["firstsight.resumed_at_step"])
    assert 20 <= resumed_at < 300
    from mlflow.tracking import MlflowClient

    steps = {m.step for m in MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 301))
    assert not (_sweep_dir(tmp_path) / "0" / "checkpoints" / "resume").exists()
