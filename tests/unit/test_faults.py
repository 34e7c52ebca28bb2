"""Faults during a job: out of memory, a non-finite loss, a tracking store that does not
answer, a full disk while writing a checkpoint. Each is reported in one clear message, its MLflow
run is marked FAILED with the reason, and nothing already saved is lost."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import compose, default_store_runs

from firstsight.config.record import config_record
from firstsight.config.specs import tracking_spec
from firstsight.core.errors import FirstSightError


def _only_run(tmp_path):
    [run] = default_store_runs(tmp_path)
    return run


# ----------------------------------------------------------------------------- out of memory


def test_what_counts_as_out_of_memory():
    import torch

    from firstsight.tasks.distill import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_out_of_memory_message_on_a_gpu_names_allocated_and_total(monkeypatch):
    import torch

    from firstsight.tasks.distill import out_of_memory_message

    class Properties:
        total_memory = 80e9

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 79.5e9)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 80e9)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: Properties())
    cfg = compose(
        [
            "hardware.device=cuda",
            "hardware.batch_size=1",
            "hardware.grad_accum_steps=8",
            "hardware.gradient_checkpointing=true",
            "lora.enabled=true",
            "precision=nf4",
        ]
    )
    message = out_of_memory_message(cfg, "at training step 7 of 40", torch.OutOfMemoryError("CUDA out of memory."))
    assert message.startswith(
        "out of memory at training step 7 of 40 on cuda with hardware.batch_size=1 and "
        "hardware.grad_accum_steps=8: peak allocated 79.50 GB of the GPU's 80.00 GB"
    )
    assert "a smaller model or a device with more memory" in message  # every other remedy is already on


class _Store:
    """A tracking client whose log_batch fails `failures` times (forever: None) with `error`."""

    def __init__(self, failures=None, error=None):
        from mlflow.exceptions import MlflowException

        self.failures = failures
        self.error = error or MlflowException(
            "(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE"
        )
        self.calls = 0
        self.logged = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise self.error
        self.logged.extend(metrics)


@pytest.fixture
def sleeps(monkeypatch):
    """The back-off waits, recorded instead of slept."""
    import firstsight.tracking.tracker as tracking

    waited = []
    monkeypatch.setattr(tracking.time, "sleep", waited.append)
    return waited


def _tracker(store, uri, tmp_path, values=3):
    from firstsight.tracking.tracker import JobTracker, StoreClient

    tracker = JobTracker(StoreClient(store, uri), "run-1", output_dir=tmp_path)
    for step in range(1, values + 1):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    return tracker


def test_a_busy_store_is_retried_with_exponential_backoff(tmp_path, sleeps):
    store = _Store(failures=3)
    tracker = _tracker(store, "sqlite:///runs.db", tmp_path)
    tracker.flush()
    assert store.calls == 4 and sleeps == [1.0, 2.0, 4.0]
    assert [m.step for m in store.logged] == [1, 2, 3]  # logged once, all of them
    assert not (tmp_path / "unflushed_metrics.jsonl").exists()


def test_a_store_that_stays_down_fails_clearly_and_keeps_the_metrics(tmp_path, sleeps):
    from firstsight.tracking.tracker import TrackingStoreError

    store = _Store()
    tracker = _tracker(store, "sqlite:////shared/mlflow.db", tmp_path, values=1500)  # two log_batch chunks
    with pytest.raises(TrackingStoreError) as err:
        tracker.flush()
    message = str(err.value)
    assert "the MLflow tracking store sqlite:////shared/mlflow.db is unavailable: log_batch failed" in message
    assert (
        "5 attempts" in message
        and "database is locked" in message
        and "python -m firstsight.tracking.server" in message
    )
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
    saved = tmp_path / "unflushed_metrics.jsonl"
    assert f"The 1500 metric value(s) not logged are in {saved}" in message
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 1501))
    assert lines[0] == {
        "run_id": "run-1",
        "key": "train/loss",
        "value": 1.0,
        "timestamp": lines[0]["timestamp"],
        "step": 1,
    }
    tracker.flush()  # nothing left to lose: the buffer went to the file
    sleeps.clear()
    with pytest.raises(TrackingStoreError):  # the store is known to be down: later calls try once
        tracker.set_tags({"a": "b"})
    assert sleeps == []


def test_a_refused_request_is_not_retried_but_its_metrics_are_kept(tmp_path, sleeps):
    from mlflow.exceptions import MlflowException

    store = _Store(error=MlflowException("Invalid value for metric 'x'", error_code="INVALID_PARAMETER_VALUE"))
    tracker = _tracker(store, "sqlite:///runs.db", tmp_path)
    with pytest.raises(MlflowException, match="Invalid value"):
        tracker.flush()
    assert store.calls == 1 and sleeps == []
    assert len((tmp_path / "unflushed_metrics.jsonl").read_text().splitlines()) == 3


def test_an_http_store_is_retried_by_mlflow_not_again_here(tmp_path, sleeps):
    from mlflow.exceptions import MlflowException

    from firstsight.tracking.tracker import TrackingStoreError

    store = _Store(
        error=MlflowException(
            "API request to http://127.0.0.1:5999/api/2.0/mlflow/runs/log-batch failed with exception "
            "HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url (Connection refused)"
        )
    )
    tracker = _tracker(store, "http://127.0.0.1:5999", tmp_path)
    with pytest.raises(TrackingStoreError) as err:
        tracker.flush()
    assert store.calls == 1 and sleeps == []
    assert "store http://127.0.0.1:5999 is unavailable" in str(err.value)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in str(err.value) and "unflushed_metrics.jsonl" in str(err.value)


def _failing_metric_batches(monkeypatch):
    """The real store takes params, tags and status, but not metrics (as if locked at that moment)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if metrics:
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


def test_a_job_whose_metrics_cannot_be_logged_fails_and_leaves_them_in_a_file(tmp_path, monkeypatch, sleeps):
    from firstsight.tracking.tracker import TrackingStoreError, job_tracker

    monkeypatch.chdir(tmp_path)
    _failing_metric_batches(monkeypatch)
    cfg = compose([f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(TrackingStoreError, match="unflushed_metrics.jsonl"):
        with job_tracker(tracking_spec(cfg)) as tracker:
            tracker.log_metrics({"eval/student_accuracy": 0.5}, step=40)
    run = _only_run(tmp_path)
    assert run.info.status == "FAILED"  # closed, not left RUNNING
    [line] = (tmp_path / "unflushed_metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["run_id"] == run.info.run_id and json.loads(line)["value"] == 0.5

    # a job that fails for its own reason reports that reason, not the store's
    (tmp_path / "unflushed_metrics.jsonl").unlink()
    with pytest.raises(ValueError, match="its own error"):
        with job_tracker(tracking_spec(cfg)) as tracker:
            tracker.log_metrics({"train/loss": 1.0}, step=1)
            raise ValueError("its own error")
    assert (tmp_path / "unflushed_metrics.jsonl").is_file()


def _sweep_start(tmp_path, monkeypatch, failures):
    """MLflowSweepCallback.on_multirun_start on a SQLite store whose create_run fails `failures`
    times (None: always) as a locked database does. Returns the callback and the sweep directory."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from firstsight.suite.callbacks import MLflowSweepCallback
    from firstsight.tracking.tracker import PARENT_RUN_ENV

    real, calls = MlflowClient.create_run, []

    def create_run(self, *args, **kwargs):
        calls.append(1)
        if failures is None or len(calls) <= failures:
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", create_run)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "multirun" / "sweep"
    config = compose(
        [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.sweep.dir={sweep_dir}"],
        return_hydra_config=True,
    )
    callback = MLflowSweepCallback()
    callback.on_multirun_start(config)
    return callback, config, sweep_dir


def test_the_sweep_parent_run_is_retried_while_the_store_is_busy(tmp_path, monkeypatch, sleeps):
    from firstsight.tracking.tracker import PARENT_RUN_ENV, PARENT_RUN_FILE

    callback, config, sweep_dir = _sweep_start(tmp_path, monkeypatch, failures=2)
    assert sleeps == [1.0, 2.0]  # firstsight.tracking.tracker.StoreClient's back-off, as for a job's run
    parent = callback.parent_run_id
    assert (sweep_dir / PARENT_RUN_FILE).read_text() == parent
    import os

    assert os.environ[PARENT_RUN_ENV] == parent
    callback.on_multirun_end(config)  # no child ran: closed FAILED
    [run] = default_store_runs(tmp_path)
    assert (run.info.run_id, run.info.status, run.data.tags["firstsight.role"]) == (parent, "FAILED", "sweep")
    assert PARENT_RUN_ENV not in os.environ


def test_a_sweep_whose_store_stays_down_stops_before_it_starts(tmp_path, monkeypatch, capsys, sleeps):
    from firstsight.tracking.tracker import PARENT_RUN_ENV

    with pytest.raises(SystemExit) as stop:
        _sweep_start(tmp_path, monkeypatch, failures=None)
    assert stop.value.code == 2
    [message] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert (
        f"error: the MLflow tracking store sqlite:///{tmp_path / 'mlflow.db'} is unavailable: create_run failed "
        "(5 attempts over"
    ) in message
    assert "database is locked" in message and "python -m firstsight.tracking.server" in message
    assert "tracking.enabled=false" in message
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
    assert not (tmp_path / "multirun").exists()  # no sweep directory, no parent run id left for jobs
    import os

    assert PARENT_RUN_ENV not in os.environ
    assert default_store_runs(tmp_path) == []


def test_a_store_down_when_the_sweep_ends_is_logged_not_raised(tmp_path, monkeypatch, caplog, sleeps):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    callback, config, _ = _sweep_start(tmp_path, monkeypatch, failures=0)
    parent = callback.parent_run_id

    def down(self, *args, **kwargs):
        raise MlflowException(
            "(sqlite3.OperationalError) unable to open database file", error_code="TEMPORARILY_UNAVAILABLE"
        )

    monkeypatch.setattr(MlflowClient, "get_run", down)
    monkeypatch.setattr(MlflowClient, "set_terminated", down)
    callback.on_multirun_end(config)
    assert f"the sweep's MLflow run {parent} could not be closed" in caplog.text
    assert f"the MLflow tracking store sqlite:///{tmp_path / 'mlflow.db'} is unavailable: get_run failed" in caplog.text
    assert sleeps == [1.0, 2.0, 4.0, 8.0]  # retried once, then the store counts as down: closing tries once
    assert callback.parent_run_id is None  # the exit hook does not try again
    monkeypatch.undo()
    [run] = default_store_runs(tmp_path)
    assert run.info.status == "RUNNING"


# ----------------------------------------------------------------------------- disk full


def _model_and_optimizer():
    import torch

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def _full_disk(path, *args, **kwargs):
    Path(path).write_bytes(b"\x00" * 100)  # part of the file made it to the disk
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _torch_save_on_full_disk(obj, path, *args, **kwargs):
    Path(path).write_bytes(b"PK\x03\x04")
    raise RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
    )


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, writer):
    import safetensors.torch
    import torch

    from firstsight.training.resume import Checkpointer, latest_valid, named_trained_tensors, read_point

    model, optimizer, scheduler, scaler = _model_and_optimizer()
    cfg = compose(["train.keep_checkpoints=1"])
    checkpointer = Checkpointer(cfg.train, config_record(cfg), tmp_path, named_trained_tensors(model), run_id="r")
    good = checkpointer.save(5, optimizer, scheduler, scaler, {"epoch": 0, "batches_into_epoch": 5}, {"loss": 1.0})
    if writer == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, *a, **k: _full_disk(path))
    else:
        monkeypatch.setattr(torch, "save", _torch_save_on_full_disk)
    with pytest.raises(FirstSightError) as err:
        checkpointer.save(10, optimizer, scheduler, scaler, {"epoch": 0, "batches_into_epoch": 10}, {"loss": 0.5})
    message = str(err.value)
    assert f"could not write {checkpointer.root / 'step-0000010'}" in message
    assert "GB free on the file system of" in message
    assert f"the previous checkpoint {good} is kept" in message
    if writer == "safetensors":
        assert "the disk is full" in message
    assert latest_valid(checkpointer.root) == good
    assert sorted(p.name for p in checkpointer.root.iterdir()) == ["step-0000005"]  # no *.tmp-* left behind
    monkeypatch.undo()
    fresh, optimizer2, scheduler2, scaler2 = _model_and_optimizer()
    restored = Checkpointer(
        cfg.train,
        config_record(cfg),
        tmp_path,
        named_trained_tensors(fresh),
        run_id="r",
        resume=read_point(good),
    ).restore(optimizer2, scheduler2, scaler2)
    assert restored == 5 and torch.equal(fresh.weight, model.weight)  # still loadable


class _Saves:
    def __init__(self, fail):
        self.fail = fail

    def save_pretrained(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"new" * 10)
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_saving_the_student_keeps_the_previous_student(tmp_path):
    from firstsight.models.loading import save_model_atomically

    out = tmp_path / "checkpoints" / "student"
    save_model_atomically(_Saves(False), _Saves(False), str(out), {"firstsight_run.json": "{}"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FirstSightError) as err:
        save_model_atomically(_Saves(True), _Saves(False), str(out), {"firstsight_run.json": '{"new": 1}'})
    assert f"could not write {out}: the disk is full" in str(err.value)
    assert f"{out} keeps its previous contents" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["student"]


def _disk_refuses_writes(monkeypatch, error_number):
    """firstsight.core.files's writes get part of the data to the disk, then fail with `error_number`."""
    import os

    import firstsight.core.files as cache

    real_fdopen = os.fdopen

    class Refusing:
        def __init__(self, handle, mode):
            self.file = real_fdopen(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:3])
            self.file.flush()
            raise OSError(error_number, os.strerror(error_number))

    monkeypatch.setattr(cache.os, "fdopen", Refusing)


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_while_writing_a_small_file_keeps_the_previous_one(tmp_path, monkeypatch, error_number):
    """firstsight.core.files.write_atomically (metrics.json, reports, the teacher cache's records)."""
    from firstsight.core.files import write_atomically

    path = tmp_path / "out" / "metrics.json"
    write_atomically(path, '{"old": 1}')
    _disk_refuses_writes(monkeypatch, error_number)
    with pytest.raises(FirstSightError) as err:
        write_atomically(path, '{"new": 2}')
    message = str(err.value)
    assert f"could not write {path}: the disk is full (" in message
    assert f"GB free on the file system of {path.parent})" in message
    assert f"{path} keeps its previous contents" in message and "Free some space" in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == error_number
    assert path.read_text() == '{"old": 1}'
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left

    fresh = tmp_path / "out" / "report.md"
    with pytest.raises(FirstSightError, match=f"nothing was left at {fresh}"):
        write_atomically(fresh, "# report")
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_an_error_that_is_not_about_the_disk_is_not_disguised(tmp_path):
    from firstsight.core.files import staged_dir

    with pytest.raises(KeyError):
        with staged_dir(str(tmp_path / "out")):
            raise KeyError("a bug")
    assert list(tmp_path.iterdir()) == []


class _PingClient:  # module level: picklable
    def ping(self):
        return "pong"


def test_a_store_client_survives_pickling():
    """submitit pickles a sweep's callbacks, whose parent-run client is a StoreClient: unpickling
    must not recurse through __getattr__ before its client exists."""
    import pickle

    from firstsight.tracking.tracker import StoreClient

    copy = pickle.loads(pickle.dumps(StoreClient(_PingClient(), "sqlite:///x.db")))
    assert copy.ping() == "pong" and copy.uri == "sqlite:///x.db" and copy.down is False
