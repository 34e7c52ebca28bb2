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
