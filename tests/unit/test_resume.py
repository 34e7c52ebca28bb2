"""Preemption and resume (firstsight/training/resume.py): checkpoints, their manifest, stop signals."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from firstsight.config.record import config_record
from tests.conftest import compose

# ----------------------------------------------------------------------------- end to end (CLI)


def _config(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(overrides), resolve=True, enum_to_str=True)


@functools.cache
def _saved_with():
    """The config _write_checkpoint saves its checkpoints with, and its record (composed once)."""
    cfg = compose(["train.keep_checkpoints=5"])
    return cfg, config_record(cfg)


def _write_checkpoint(root: Path, step: int, config=None, model=None):
    import torch

    from firstsight.training.resume import Checkpointer, named_trained_tensors

    cfg, record = _saved_with()
    model = model or torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpointer = Checkpointer(cfg.train, record, root.parent.parent, named_trained_tensors(model), run_id="abc")
    if config is not None:
        checkpointer.config = config
    return checkpointer.save(
        step,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cpu", enabled=False),
        {"epoch": 0, "batches_into_epoch": step},
        {"loss": 1.0},
    )


def test_restore_gives_back_weights_optimizer_and_rng(tmp_path):
    import torch

    from firstsight.training.resume import Checkpointer, latest_valid, locate, named_trained_tensors

    cfg = compose([])
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    saved_dir = _write_checkpoint(tmp_path / "checkpoints" / "resume", 7, model=model)
    expected_next_random = torch.rand(4)  # the RNG state was saved before this draw

    fresh = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved_with = compose(["train.keep_checkpoints=5"])
    point = locate(saved_with.train, config_record(saved_with), tmp_path)
    assert point is not None and point.path == saved_dir == latest_valid(tmp_path / "checkpoints" / "resume")
    assert point.run_id == "abc" and point.data_position == {"epoch": 0, "batches_into_epoch": 7}
    step = Checkpointer(
        cfg.train, config_record(cfg), tmp_path, named_trained_tensors(fresh), run_id="abc", resume=point
    ).restore(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    assert step == 7
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
    assert optimizer.state_dict()["state"][0]["step"] == 1
    torch.testing.assert_close(torch.rand(4), expected_next_random, rtol=0, atol=0)


def test_broken_checkpoints_are_skipped(tmp_path, caplog):
    from firstsight.training.resume import MANIFEST, TENSORS, latest_valid, verify

    root = tmp_path / "checkpoints" / "resume"
    good = _write_checkpoint(root, 5)
    corrupt = _write_checkpoint(root, 10)
    half = _write_checkpoint(root, 15)
    data = bytearray((corrupt / TENSORS).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size
    (corrupt / TENSORS).write_bytes(bytes(data))
    (half / MANIFEST).unlink()  # as a write cut short leaves it

    assert "sha256" in verify(corrupt)
    assert verify(half) == "no manifest.json (the write did not finish)"
    assert latest_valid(root) == good
    assert "skipping checkpoint" in caplog.text and "step-0000015" in caplog.text


def test_keeps_only_the_newest_checkpoints(tmp_path):
    import torch

    from firstsight.training.resume import Checkpointer, named_trained_tensors, step_dirs

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = compose(["train.keep_checkpoints=2"])
    checkpointer = Checkpointer(cfg.train, config_record(cfg), tmp_path, named_trained_tensors(model), None)
    for step in (2, 4, 6):
        checkpointer.save(step, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), {}, {})
    assert [p.name for p in step_dirs(checkpointer.root)] == ["step-0000006", "step-0000004"]


# ----------------------------------------------------------------------------- data position


def test_batches_resume_at_the_saved_position():
    from firstsight.data.batching import ShuffledBatches

    data = list(range(10))
    identity = lambda items: list(items)  # noqa: E731
    straight = ShuffledBatches(data, identity, batch_size=3, seed=4)
    order = [next(straight) for _ in range(7)]  # 3 batches per epoch: into the third epoch
    assert order[:3] != order[3:6]  # every epoch is reshuffled

    taken = ShuffledBatches(data, identity, batch_size=3, seed=4)
    for _ in range(4):
        next(taken)
    position = taken.position()
    assert position == {"epoch": 1, "batches_into_epoch": 1}
    resumed = ShuffledBatches(data, identity, batch_size=3, seed=4, position=position)
    assert [next(resumed) for _ in range(3)] == order[4:7]


# ----------------------------------------------------------------------------- stop signals


def test_stop_signal_waits_for_the_step_then_goes_to_the_previous_handler():
    """A handler installed before the job (submitit's) still gets the signal, after the step:
    its requeue-and-exit becomes Preempted carrying its exit code; if it returns (submitit's
    SIGTERM bypass) training goes on."""
    from firstsight.core.signals import STOP, Preempted

    received = []

    def requeue_and_exit(signum, frame):
        received.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        with STOP.installed():
            with STOP.deferred():
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.01)
                assert STOP.requested == signal.SIGUSR2 and received == []  # deferred to the step's end
                with pytest.raises(Preempted) as stop:
                    STOP.pass_on(step=3, checkpoint=Path("ckpt"))
            assert received == [signal.SIGUSR2] and stop.value.exit_code == -1 and stop.value.step == 3
            signal.signal(signal.SIGUSR2, requeue_and_exit)  # installed() restores it either way
        assert signal.getsignal(signal.SIGUSR2) is requeue_and_exit

        signal.signal(signal.SIGUSR2, lambda signum, frame: received.append("bypass"))
        with STOP.installed(), STOP.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            STOP.pass_on(step=4, checkpoint=None)  # returns: training continues
        assert received[-1] == "bypass"
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_default_action_outside_training_ends_the_job_at_once():
    from firstsight.core.signals import STOP, Preempted

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Preempted) as stop, STOP.installed():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stop.value.exit_code == 128 + signal.SIGTERM and stop.value.step is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_speed_settings_may_change_across_a_resume():
    """train.logits, train.fused_optimizer, hardware.compile and hardware.generation change how fast
    a step runs, not what it computes: a checkpoint written with other values (or before they
    existed) resumes; the learning rate still may not change."""
    from firstsight.training.resume import config_differences

    old = _config(["train.logits=all_positions", "train.fused_optimizer=false", "hardware.compile=true"])
    for key in ("logits", "fused_optimizer"):
        del old["train"][key]  # as a checkpoint of the version before these keys
    assert config_differences(old, _config(["hardware.generation=hf"])) == []
    assert config_differences(old, _config(["train.lr=0.5"])) == ["train.lr: 0.001 -> 0.5"]


# ----------------------------------------------------------------------------- what a resume restores


def _checkpointer(cfg, root_dir, tensors, **kwargs):
    from firstsight.training.resume import Checkpointer

    return Checkpointer(cfg.train, config_record(cfg), root_dir, tensors, **{"run_id": "run-1", **kwargs})


def test_round_trip_restores_every_field(tmp_path):
    """Weights (of the model and of the extra modules; not the frozen ones), AdamW moments, the
    schedule, the GradScaler's scale, every RNG, and what state.json gives the task: step, run id,
    data position, metrics, config."""
    import random

    import numpy as np
    import torch

    from firstsight.training.resume import locate, named_trained_tensors

    def parts(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model[0].bias.requires_grad_(False)  # frozen: not a trained tensor
        projection = torch.nn.Linear(2, 2)
        tensors = named_trained_tensors(model, {"hidden_projections": projection})
        optimizer = torch.optim.AdamW([t for t in tensors.values()], lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        return model, projection, tensors, optimizer, scheduler

    model, projection, tensors, optimizer, scheduler = parts(1)
    assert sorted(tensors) == ["0.weight", "1.bias", "1.weight", "hidden_projections.bias", "hidden_projections.weight"]
    for _ in range(3):
        projection(model(torch.randn(5, 3))).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    cfg = compose([])
    flushed = []
    saved = _checkpointer(cfg, tmp_path, tensors, before_save=lambda: flushed.append(True)).save(
        3, optimizer, scheduler, scaler, {"epoch": 1, "batches_into_epoch": 2}, {"loss": 0.25, "kd": 0.5}
    )
    assert flushed == [True]  # the tracker's flush before the checkpoint
    after = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    point = locate(cfg.train, config_record(cfg), tmp_path)
    assert point.path == saved and point.step == 3 and point.run_id == "run-1"
    assert point.data_position == {"epoch": 1, "batches_into_epoch": 2}
    assert point.state["metrics"] == {"loss": 0.25, "kd": 0.5}
    assert point.state["config"] == config_record(cfg)

    fresh, fresh_projection, fresh_tensors, fresh_optimizer, fresh_scheduler = parts(2)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=2.0, enabled=True)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    step = _checkpointer(cfg, tmp_path, fresh_tensors, resume=point).restore(
        fresh_optimizer, fresh_scheduler, fresh_scaler
    )
    assert step == 3
    for name, tensor in tensors.items():
        torch.testing.assert_close(fresh_tensors[name], tensor, rtol=0, atol=0, msg=name)
    assert not torch.equal(fresh[0].bias, model[0].bias)  # frozen: not saved, not restored
    restored, original = fresh_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert restored.keys() == original.keys()
    for index, moments in original.items():
        for key, value in moments.items():
            torch.testing.assert_close(restored[index][key], value, rtol=0, atol=0)
    assert fresh_scheduler.state_dict()["last_epoch"] == 3
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.1 / 4
    assert fresh_scaler.get_scale() == 1024.0
    torch.testing.assert_close(torch.rand(3), after[0], rtol=0, atol=0)
    assert np.array_equal(np.random.rand(3), after[1])
    assert [random.random() for _ in range(3)] == after[2]


def test_a_run_without_gradient_scaling_resumes_with_its_scaler_untouched(tmp_path):
    import torch

    from firstsight.training.resume import locate, named_trained_tensors

    cfg = compose([])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tensors = named_trained_tensors(model)
    _checkpointer(cfg, tmp_path, tensors).save(
        1, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), {}, {}
    )
    point = locate(cfg.train, config_record(cfg), tmp_path)
    assert point.state["scaler"] is None
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True)
    _checkpointer(cfg, tmp_path, tensors, resume=point).restore(optimizer, scheduler, scaler)
    assert scaler.get_scale() == 8.0


def test_gpu_rng_states_are_saved_and_restored_when_cuda_is_in_use(monkeypatch):
    """On a GPU run (CUDA initialized) the CUDA generators' states travel with the checkpoint; on a
    machine with CUDA available but unused none are saved (reading them would initialize CUDA)."""
    import torch

    from firstsight.training.resume import rng_states, set_rng_states

    gpu_states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gpu_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in rng_states()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    states = json.loads(json.dumps(rng_states()))  # as state.json holds them
    assert states["cuda"] == [[1, 2, 3], [4, 5]]

    set_rng_states(states)
    [given] = restored
    assert [s.dtype for s in given] == [torch.uint8, torch.uint8]
    assert [s.tolist() for s in given] == [[1, 2, 3], [4, 5]]

    set_rng_states({k: v for k, v in states.items() if k != "cuda"})  # a checkpoint of a CPU run
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_states(states)  # a GPU run's checkpoint resumed on the CPU: its CUDA states are left out
    assert len(restored) == 1


def test_cpu_rng_states_survive_state_json():
    import random

    import numpy as np
    import torch

    from firstsight.training.resume import rng_states, set_rng_states

    states = json.loads(json.dumps(rng_states()))
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    set_rng_states(states)
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]


# ----------------------------------------------------------------------------- which checkpoint


def _resume_from(asked, output_dir):
    from firstsight.training.resume import locate

    cfg, record = _saved_with()
    train = copy.deepcopy(cfg.train)
    train.resume = asked
    point = locate(train, record, output_dir)
    return None if point is None else point.path


def test_train_resume_finds_the_checkpoint_it_names(tmp_path, monkeypatch):
    """auto: this job's newest; never: none; a run's output directory, its checkpoints/resume
    directory or one step directory; a relative path from the directory the job was launched in."""
    from hydra.core.hydra_config import HydraConfig

    run = tmp_path / "run"
    root = run / "checkpoints" / "resume"
    older, newest = _write_checkpoint(root, 3), _write_checkpoint(root, 12)
    _write_checkpoint(root, 7)

    assert _resume_from("auto", run) == newest
    assert _resume_from("auto", tmp_path / "elsewhere") is None
    assert _resume_from("never", run) is None
    assert _resume_from(str(run), tmp_path / "elsewhere") == newest
    assert _resume_from(str(root), tmp_path / "elsewhere") == newest
    assert _resume_from(str(older), tmp_path / "elsewhere") == older  # an older step, asked for by name

    monkeypatch.chdir(tmp_path)  # outside a Hydra job: relative to the working directory
    assert _resume_from("run", tmp_path / "elsewhere").resolve() == newest
    assert _resume_from("run/checkpoints/resume/step-0000003", tmp_path / "elsewhere").resolve() == older

    # inside a Hydra job the working directory may be the job's: relative to where it was launched
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    launch = SimpleNamespace(runtime=SimpleNamespace(cwd=str(tmp_path)))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: launch))
    assert _resume_from("run", job_dir) == newest
    assert _resume_from(str(older), job_dir) == older  # an absolute path stays as it is


def test_unusable_checkpoints_named_by_train_resume_are_refused_with_the_reason(tmp_path):
    from firstsight.core.errors import FirstSightError
    from firstsight.training.resume import MANIFEST, OPTIMIZER

    root = tmp_path / "run" / "checkpoints" / "resume"
    broken, half = _write_checkpoint(root, 4), _write_checkpoint(root, 8)
    (broken / OPTIMIZER).unlink()
    (half / MANIFEST).unlink()

    with pytest.raises(FirstSightError) as error:
        _resume_from(str(broken), tmp_path)
    assert f"train.resume={str(broken)!r}: that checkpoint is not usable: optimizer.pt is missing" in str(error.value)

    for asked, root_named in ((tmp_path / "run", root), (root, root)):
        with pytest.raises(FirstSightError) as error:
            _resume_from(str(asked), tmp_path)
        assert f"train.resume={str(asked)!r}: no checkpoint under {root_named} is whole" in str(error.value)

    nowhere = tmp_path / "nothing-here"
    for asked in (nowhere, tmp_path / "run" / "checkpoints"):
        with pytest.raises(FirstSightError) as error:
            _resume_from(str(asked), tmp_path)
        message = str(error.value)
        assert f"train.resume={str(asked)!r}: no resumable checkpoint there" in message
        assert "valid values: auto, never or such a path" in message


def test_verify_names_what_is_wrong_with_a_checkpoint(tmp_path, caplog):
    """Each way a checkpoint is broken, and the warning that skips it says which."""
    from firstsight.training.resume import MANIFEST, OPTIMIZER, STATE, TENSORS, latest_valid, verify

    root = tmp_path / "checkpoints" / "resume"
    good = _write_checkpoint(root, 1)
    assert verify(good) is None

    missing = _write_checkpoint(root, 2)
    (missing / STATE).unlink()
    assert verify(missing) == "state.json is missing"

    short = _write_checkpoint(root, 3)
    size = (short / OPTIMIZER).stat().st_size
    (short / OPTIMIZER).write_bytes((short / OPTIMIZER).read_bytes()[:-10])
    assert verify(short) == f"optimizer.pt has {size - 10} bytes, the manifest says {size}"

    flipped = _write_checkpoint(root, 4)
    data = bytearray((flipped / TENSORS).read_bytes())
    data[len(data) // 2] ^= 1
    (flipped / TENSORS).write_bytes(bytes(data))
    assert verify(flipped) == "trainable.safetensors does not match its sha256 in the manifest"

    garbled = _write_checkpoint(root, 5)
    (garbled / MANIFEST).write_text("{not json")
    assert verify(garbled).startswith("unreadable manifest.json (")

    with caplog.at_level("WARNING"):
        assert latest_valid(root) == good
    for path, problem in ((garbled, "unreadable manifest.json"), (short, "optimizer.pt has")):
        assert f"skipping checkpoint {path}: {problem}" in caplog.text


def test_a_manifest_that_lists_no_files_is_a_broken_checkpoint(tmp_path):
    """JSON, but not a manifest of files with their bytes and sha256: skipped like any broken
    checkpoint, not a crash of the resume."""
    from firstsight.training.resume import MANIFEST, latest_valid, verify

    listless = "manifest.json does not list its files with their bytes and sha256"
    for i, manifest in enumerate(['{"step": 6}', "[]", '{"files": {"state.json": 3}}', '{"files": {"a": {}}}']):
        root = tmp_path / str(i) / "checkpoints" / "resume"
        odd = _write_checkpoint(root, 1)
        (odd / MANIFEST).write_text(manifest)
        assert verify(odd) == listless
        assert latest_valid(root) is None


# ----------------------------------------------------------------------------- the settings check


def test_config_differences_names_each_changed_setting():
    """A setting only one side has is `<unset>` on the other; `tracking.*` (a prefix) may change."""
    from firstsight.training.resume import config_differences

    saved = {"train": {"lr": 0.1, "old": 1, "steps": 5}, "tracking": {"experiment_name": "a"}, "cache_dir": "x"}
    current = {"train": {"lr": 0.1, "steps": 6, "new": 2}, "tracking": {"experiment_name": "b"}, "cache_dir": "y"}
    assert config_differences(saved, current) == [
        "train.new: <unset> -> 2",
        "train.old: 1 -> <unset>",
        "train.steps: 5 -> 6",
    ]
    assert config_differences({"trackingx": 1}, {"trackingx": 2}) == ["trackingx: 1 -> 2"]  # not under tracking.


@pytest.mark.parametrize("changed", [1, 8, 9])
def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path, changed):
    """The error names the checkpoint and up to 8 differences, `...` for more, and what to do."""
    from firstsight.core.errors import FirstSightError
    from firstsight.training.resume import locate

    saved = {"train": {f"k{i}": i for i in range(9)}}
    current = {"train": {f"k{i}": i + (i < changed) for i in range(9)}}
    checkpoint = _write_checkpoint(tmp_path / "checkpoints" / "resume", 2, config=saved)
    cfg = compose([])
    with pytest.raises(FirstSightError) as error:
        locate(cfg.train, current, tmp_path)
    shown = "; ".join(f"train.k{i}: {i} -> {i + 1}" for i in range(min(changed, 8)))
    assert str(error.value) == (
        f"cannot resume from {checkpoint}: the run it belongs to was configured differently "
        f"({shown}{'; ...' if changed > 8 else ''}). "
        "Resume with the same settings, or start a new run with train.resume=never"
    )
    assert locate(cfg.train, saved, tmp_path).path == checkpoint  # the same settings resume


# ----------------------------------------------------------------------------- restoring into this run


def test_restore_refuses_tensors_that_are_not_this_runs(tmp_path):
    import torch

    from firstsight.core.errors import FirstSightError
    from firstsight.training.resume import locate

    cfg = compose([])
    saved = {f"extra{i}": torch.nn.Parameter(torch.zeros(2)) for i in range(7)}
    saved["shared"] = torch.nn.Parameter(torch.zeros(2, 3))
    optimizer = torch.optim.AdamW(saved.values())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    no_scaling = torch.amp.GradScaler("cpu", enabled=False)
    _checkpointer(cfg, tmp_path, saved).save(2, optimizer, scheduler, no_scaling, {}, {})
    point = locate(cfg.train, config_record(cfg), tmp_path)

    def restore(tensors):
        with pytest.raises(FirstSightError) as error:
            _checkpointer(cfg, tmp_path, tensors, resume=point).restore(optimizer, scheduler, no_scaling)
        return str(error.value)

    mine = {name: torch.nn.Parameter(t.detach().clone()) for name, t in saved.items()}
    message = restore({**mine, "lora_A": torch.nn.Parameter(torch.zeros(1))})  # only one missing
    assert message == (
        f"checkpoint {point.path} does not hold this run's trained tensors (missing: ['lora_A'], unexpected: [])"
    )
    message = restore({**mine, **{f"new{i}": torch.nn.Parameter(torch.zeros(1)) for i in range(6)}})
    assert message.endswith("(missing: ['new0', 'new1', 'new2', 'new3', 'new4'], unexpected: [])")  # the first 5
    message = restore({"shared": mine["shared"]})  # only unexpected ones: the first 5 named
    assert message.endswith("(missing: [], unexpected: ['extra0', 'extra1', 'extra2', 'extra3', 'extra4'])")
    message = restore({**mine, "shared": torch.nn.Parameter(torch.zeros(4, 3))})
    assert message == f"checkpoint {point.path}: shared has shape (2, 3), this run's has (4, 3)"


def test_checkpoints_are_due_every_n_steps_but_not_after_the_last():
    from firstsight.training.resume import Checkpointer

    def due(every, last_step):
        train = SimpleNamespace(checkpoint_every_n_steps=every, keep_checkpoints=2)
        checkpointer = Checkpointer(train, {}, Path("unused"), {}, None)
        return [step for step in range(1, last_step + 1) if checkpointer.due(step, last_step)]

    assert due(5, 20) == [5, 10, 15]
    assert due(5, 17) == [5, 10, 15]
    assert due(1, 4) == [1, 2, 3]
    assert due(0, 6) == []


def test_a_finished_run_discards_its_checkpoints_on_the_writer_only(tmp_path):
    from firstsight.training.resume import Checkpointer

    root = tmp_path / "checkpoints" / "resume"
    _write_checkpoint(root, 1)
    train = SimpleNamespace(checkpoint_every_n_steps=1, keep_checkpoints=2)
    Checkpointer(train, {}, tmp_path, {}, None, writer=False).discard()
    assert root.is_dir()
    Checkpointer(train, {}, tmp_path, {}, None).discard()
    assert not root.exists() and (tmp_path / "checkpoints").is_dir()


def test_a_failed_write_names_the_checkpoint_that_is_kept(tmp_path, monkeypatch):
    """A full disk while writing: the error says which earlier checkpoint a rerun resumes from (the
    last one written, else the one this run resumed from), or that there is none."""
    import errno

    import safetensors.torch
    import torch

    from firstsight.core.errors import FirstSightError
    from firstsight.training.resume import locate, named_trained_tensors, step_dirs

    cfg = compose([])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    no_scaling = torch.amp.GradScaler("cpu", enabled=False)
    tensors = named_trained_tensors(model)
    save_file = safetensors.torch.save_file

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(checkpointer, step):
        with pytest.raises(FirstSightError) as error:
            checkpointer.save(step, optimizer, scheduler, no_scaling, {}, {})
        return str(error.value)

    first = _checkpointer(cfg, tmp_path, tensors)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert "The partial write was removed and no earlier checkpoint of this run exists." in save(first, 1)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    written = first.save(2, optimizer, scheduler, no_scaling, {}, {})
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    kept = f"the previous checkpoint {written} is kept (rerunning the same command resumes from it)"
    assert kept in save(first, 3)

    resumed = _checkpointer(cfg, tmp_path, tensors, resume=locate(cfg.train, config_record(cfg), tmp_path))
    assert kept in save(resumed, 4)
    assert step_dirs(tmp_path / "checkpoints" / "resume") == [written]


def test_an_fsdp_run_writes_whole_tensors_and_restores_them_into_its_shards(tmp_path):
    """With FSDP the trained tensors and the AdamW moments are gathered and written whole, as
    without sharding (a checkpoint does not depend on the GPU count), and scattered back into the
    shards on resume (one process on the CPU: gloo, a mesh of one)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from firstsight.training.resume import OPTIMIZER, TENSORS, locate, named_trained_tensors

    cfg = compose([])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def sharded(seed):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
            fully_shard(model, mesh=mesh)
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
            return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

        model, optimizer, scheduler = sharded(1)
        for _ in range(2):
            model(torch.randn(5, 3)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        no_scaling = torch.amp.GradScaler("cpu", enabled=False)
        tensors = named_trained_tensors(model)
        whole = {name: t.full_tensor().detach().clone() for name, t in tensors.items()}
        saved = _checkpointer(cfg, tmp_path, tensors, sharded_model=model).save(
            2, optimizer, scheduler, no_scaling, {}, {}
        )

        written = load_file(str(saved / TENSORS))
        assert written.keys() == whole.keys()
        for name, tensor in whole.items():
            assert torch.equal(written[name], tensor), name
        moments = torch.load(saved / OPTIMIZER, map_location="cpu", weights_only=True)["state"]
        assert sorted(moments) == sorted(whole)  # keyed by parameter name: the whole optimizer state
        assert all(type(moments[n]["exp_avg"]) is torch.Tensor for n in whole)
        assert all(moments[n]["exp_avg"].shape == whole[n].shape for n in whole)

        fresh, fresh_optimizer, fresh_scheduler = sharded(2)
        point = locate(cfg.train, config_record(cfg), tmp_path)
        fresh_tensors = named_trained_tensors(fresh)
        _checkpointer(cfg, tmp_path, fresh_tensors, resume=point, sharded_model=fresh).restore(
            fresh_optimizer, fresh_scheduler, no_scaling
        )
        for name, tensor in whole.items():
            assert torch.equal(fresh_tensors[name].full_tensor(), tensor), name
        original, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
        assert restored.keys() == original.keys()
        for index, state in original.items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(restored[index][key].full_tensor(), state[key].full_tensor()), (index, key)
    finally:
        dist.destroy_process_group()


def test_a_file_system_without_fsync_still_gets_its_checkpoint(tmp_path, monkeypatch):
    """fsync is a best effort: where the file system refuses it (EINVAL), the checkpoint is written."""
    import errno

    from firstsight.training.resume import verify

    def refused(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refused)
    assert verify(_write_checkpoint(tmp_path / "checkpoints" / "resume", 1)) is None
