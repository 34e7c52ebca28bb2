"""The SLURM choices of `hardware` and the pieces around them that need no cluster: the launcher
resources they compose to, the checks on the submitting machine, the failure report of the
launcher (firstsight/suite/launcher.py) and the arguments of `python -m firstsight.tracking.server`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import compose
from hydra.core.utils import JobReturn, JobStatus
from submitit.core.utils import UncompletedJobError

from firstsight.core.errors import ConfigError
from firstsight.suite.launcher import SweepJobsFailed, collect, failure_of
from firstsight.suite.validate import validate

TARGET = "hydra_plugins.firstsight_launcher.launcher.SlurmLauncher"


@pytest.mark.parametrize(
    "choice, device, gpus, tasks, partition",
    [
        ("slurm", "cuda", 1, 1, None),
        ("slurm_h100x4", "cuda", 4, 4, None),
        ("slurm_local", "cpu", None, 1, "local"),
    ],
)
def test_slurm_choices_select_the_submitit_slurm_launcher(choice, device, gpus, tasks, partition):
    cfg = compose([f"hardware={choice}"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    launcher = cfg.hydra.launcher
    assert launcher._target_ == TARGET
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (gpus, tasks, partition)
    assert launcher.cpus_per_task >= 1 and launcher.mem_gb >= 1 and launcher.timeout_min >= 10
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # logs beside the sweep's outputs
    assert cfg.hardware.name == choice and cfg.hardware.device.value == device
    assert cfg.hardware.num_gpus == (gpus or 0)


def test_launcher_resources_are_overridable_from_the_command_line():
    cfg = compose(
        [
            "hardware=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=600",
            "hydra.launcher.account=proj",
            "hydra.launcher.qos=high",
            "hydra.launcher.constraint=h100",
            "hydra.launcher.mem_gb=128",
            "hydra.launcher.setup=[module load cuda]",
            "+hydra.launcher.additional_parameters.reservation=res",
        ],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert (
        launcher.partition,
        launcher.timeout_min,
        launcher.account,
        launcher.qos,
        launcher.constraint,
        launcher.mem_gb,
    ) == ("gpu", 600, "proj", "high", "h100", 128)
    assert list(launcher.setup) == ["module load cuda"]
    assert launcher.additional_parameters == {"reservation": "res"}


def test_gpu_jobs_are_checked_for_gpus_where_they_run_not_on_the_submitting_machine():
    cfg = compose(["hardware=slurm"])
    validate(cfg, local_device=False)  # this machine has no GPU; the SLURM node will
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        validate(cfg)  # what the job itself checks on its node
    validate(compose(["hardware=slurm_h100x4"]), local_device=False)  # 4 tasks of one data-parallel distill
    with pytest.raises(ConfigError, match="only task=distill trains on several GPUs"):
        validate(compose(["hardware=slurm_h100x4", "task=profile"]), local_device=False)


class FakeJob:
    """What collect/failure_of read of a submitit job."""

    def __init__(self, folder: Path, job_id: str, result=None, error=None, state="COMPLETED", stderr=""):
        self.job_id, self._result, self._error, self.state = job_id, result, error, state
        self._results_timeout_s = 0.5  # submitit's wait for a result file (15 s)
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = SimpleNamespace(
            stderr=folder / f"{job_id}_0_log.err",
            stdout=folder / f"{job_id}_0_log.out",
            result_pickle=folder / f"{job_id}_0_result.pkl",
        )
        self.paths.stderr.write_text(stderr)
        self.paths.stdout.write_text("")
        if result is not None:
            self.paths.result_pickle.write_text("")

    def done(self):
        return True

    def results(self):
        if self._error is not None:
            raise self._error
        return [self._result]


def _job_return(status, value):
    ret = JobReturn()
    ret.status, ret.return_value = status, value
    return ret


def test_every_failed_point_is_reported_with_its_overrides_reason_and_logs(tmp_path):
    sub = tmp_path / ".submitit"
    ok = _job_return(JobStatus.COMPLETED, {"train/loss": 1.0})
    jobs = [
        FakeJob(sub / "5_0", "5_0", result=ok),
        FakeJob(sub / "5_1", "5_1", result=_job_return(JobStatus.FAILED, RuntimeError("CUDA out of memory"))),
        FakeJob(
            sub / "5_2",
            "5_2",
            error=UncompletedJobError("no output"),
            state="OUT_OF_MEMORY",
            stderr="slurmstepd: error: Detected 1 oom_kill event\n",
        ),
        FakeJob(
            sub / "5_3",
            "5_3",
            error=UncompletedJobError("no output"),
            state="FAILED",
            stderr="Traceback...\nerror: train.lr=-1.0 is invalid: the learning rate must be > 0.\n"
            "srun: error: vm: task 0: Exited with exit code 2\n",
        ),
        FakeJob(sub / "5_4", "5_4", error=UncompletedJobError("no output"), state="TIMEOUT"),
    ]
    overrides = [[f"precision={p}", "hydra.launcher.mem_gb=2"] for p in ("fp32", "bf16", "fp16", "int8", "nf4")]
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "run.log").write_text("log")
    with pytest.raises(SweepJobsFailed) as raised:
        collect(jobs, overrides, 0, tmp_path)
    message = str(raised.value)
    assert "4 of 5 sweep point(s) failed (1 finished and keep" in message
    assert "#0" not in message
    assert "#1 precision=bf16 (SLURM job 5_1)" in message and "RuntimeError: CUDA out of memory" in message
    assert "hydra.launcher.mem_gb=2" not in message  # Hydra's own overrides are not the point's
    assert "#2 precision=fp16" in message and "ran out of memory" in message and "hydra.launcher.mem_gb" in message
    assert "#3 precision=int8" in message and "error: train.lr=-1.0 is invalid" in message
    assert "#4 precision=nf4" in message and "time limit" in message
    assert str((sub / "5_1" / "5_1_0_log.err").resolve()) in message
    assert str((tmp_path / "1" / "run.log").resolve()) in message
    report = json.loads((tmp_path / "failed_jobs.json").read_text())
    assert [f["job_num"] for f in report] == [1, 2, 3, 4]
    assert [f["state"] for f in report] == [None, "OUT_OF_MEMORY", "FAILED", "TIMEOUT"]


def test_a_sweep_without_failures_returns_every_result(tmp_path):
    rets = [_job_return(JobStatus.COMPLETED, i) for i in range(3)]
    jobs = [FakeJob(tmp_path / str(i), f"7_{i}", result=r) for i, r in enumerate(rets)]
    assert collect(jobs, [["a=1"], ["a=2"], ["a=3"]], 0, tmp_path) == rets
    assert not (tmp_path / "failed_jobs.json").exists()
    assert failure_of(jobs[0], None, rets[0], ["a=1"], 0, tmp_path) is None


def test_server_arguments(tmp_path, monkeypatch):
    from firstsight.tracking import server

    monkeypatch.chdir(tmp_path)
    args = server.parse_args([])
    assert args.store == f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store run.py writes without a server
    assert args.artifacts_destination == str(tmp_path / "mlruns")
    assert (args.host, args.port) == ("127.0.0.1", 5000)
    cmd = server.server_command(args)
    assert cmd[cmd.index("--workers") + 1] == "1"  # one writer for a SQLite store
    assert "--allowed-hosts" not in cmd
    assert server.tracking_uri(args.host, args.port) == "http://127.0.0.1:5000"

    args = server.parse_args(["--host", "0.0.0.0", "--port", "5099", "--", "--static-prefix", "/ml"])
    cmd = server.server_command(args)
    assert cmd[-2:] == ["--static-prefix", "/ml"] and "--allowed-hosts" in cmd
    assert server.tracking_uri(args.host, args.port).endswith(":5099")
    assert "0.0.0.0" not in server.tracking_uri(args.host, args.port)


def test_the_sweep_callback_closes_a_cancelled_job_s_run_as_killed(tmp_path, monkeypatch):
    """The sweep parent's callback (firstsight.suite.callbacks.MLflowSweepCallback) on a file store,
    after collect() reported the failed points of five SLURM jobs as the launcher does: #0 finished,
    #1 was invalid (no run), #2 was cancelled while training (its run left RUNNING), #3 raised in its
    task with its run left RUNNING, #4 closed its run and then hit its time limit. At exit (Hydra
    skips on_multirun_end when the launcher raises), #2's run is closed KILLED and #3's FAILED, each
    with the reason; the runs #0 and #4 closed themselves are left FINISHED."""
    import atexit
    import os

    from mlflow.tracking import MlflowClient

    from firstsight.suite.callbacks import MLflowSweepCallback
    from firstsight.tracking.tracker import PARENT_RUN_ENV

    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a new SQLite store takes seconds to create
    monkeypatch.chdir(tmp_path)
    uri = (tmp_path / "mlruns").as_uri()
    sweep_dir = tmp_path / "multirun" / "sweep"
    config = compose([f"tracking.tracking_uri={uri}", f"hydra.sweep.dir={sweep_dir}"], return_hydra_config=True)
    callback = MLflowSweepCallback()
    callback.on_multirun_start(config)
    atexit.unregister(callback._finish)  # called below, as the exit would
    parent = callback.parent_run_id
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent).info.experiment_id
    runs = {}
    for num, status in (("0", "FINISHED"), ("2", "RUNNING"), ("3", "RUNNING"), ("4", "FINISHED")):  # as left
        run = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "firstsight.job_num": num})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        runs[num] = run.info.run_id

    sub = sweep_dir / ".submitit"
    jobs = [
        FakeJob(sub / "9_0", "9_0", result=_job_return(JobStatus.COMPLETED, {"train/loss": 1.0})),
        FakeJob(
            sub / "9_1",
            "9_1",
            error=UncompletedJobError("no output"),
            state="FAILED",
            stderr="error: train.max_steps=0 is invalid: at least one step.\n",
        ),
        FakeJob(sub / "9_2", "9_2", error=UncompletedJobError("no output"), state="CANCELLED by 1000"),
        FakeJob(sub / "9_3", "9_3", result=_job_return(JobStatus.FAILED, RuntimeError("the loss is nan"))),
        FakeJob(sub / "9_4", "9_4", error=UncompletedJobError("no output"), state="TIMEOUT"),
    ]
    overrides = [["train.max_steps=2"], ["train.max_steps=0"], ["train.max_steps=2000"], ["train.lr=10"], ["seed=4"]]
    with pytest.raises(SweepJobsFailed):
        collect(jobs, overrides, 0, sweep_dir)
    callback._finish(True)

    def closed(num):
        run = client.get_run(runs[num])
        return run.info.status, run.data.tags.get("firstsight.error")

    assert closed("0") == ("FINISHED", None)
    assert closed("2") == ("KILLED", "the job was cancelled (SLURM state CANCELLED by 1000)")
    assert closed("3") == ("FAILED", "RuntimeError: the loss is nan")
    assert closed("4") == ("FINISHED", None)
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert (run.data.tags["firstsight.jobs"], run.data.tags["firstsight.failed_jobs"]) == ("5", "4")
    assert run.data.tags["firstsight.failed_points"].splitlines() == [
        "#1 train.max_steps=0: the job exited with an error (SLURM state FAILED): "
        "error: train.max_steps=0 is invalid: at least one step.",
        "#2 train.max_steps=2000: the job was cancelled (SLURM state CANCELLED by 1000)",
        "#3 train.lr=10: RuntimeError: the loss is nan",
        "#4 seed=4: the job hit its time limit: raise hydra.launcher.timeout_min (SLURM state TIMEOUT)",
    ]
    assert callback.parent_run_id is None and PARENT_RUN_ENV not in os.environ
