"""The bad-input matrix through `python run.py`: each case exits 2 with one line naming the bad value
and what is valid, and writes nothing. The matrix and where each row is tested: unit/test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firstsight.config.schema import Config, DistillLossConfig, HardwareConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOOD_RECORD = json.loads((FIXTURES / "egoschema.jsonl").read_text().splitlines()[0])


def test_run_py_refuses_a_zero_kd_term_in_one_line(run_cli, tmp_path):
    """Through run.py: exit status 2, one line naming the override, before any model or run (Hydra's
    outputs/ directory, with its log, exists already)."""
    result = run_cli("distill_loss=jsd", "distill_loss.beta=0", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "error: distill_loss.beta=0.0 (command-line override 'distill_loss.beta=0') is invalid: "
        "at beta 0 and 1 the generalized JSD is identically zero"
    ), line
    assert "distill_loss=none" in line, line
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was created
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


# ----------------------------------------------------------------------------- unknown keys (run.py)


def _keys(schema):
    import dataclasses

    return ", ".join(f.name for f in dataclasses.fields(schema))


HARDWARE_KEYS = f"Valid keys of hardware: {_keys(HardwareConfig)}."  # the schema's fields, in order

UNKNOWN_KEY_CASES = {
    "in-a-section": (
        ["hardware.batchsize=4"],
        [
            "error: hardware.batchsize (command-line override 'hardware.batchsize=4') is not a key of hardware "
            "(hardware=cpu); did you mean hardware.batch_size?",
            HARDWARE_KEYS,
        ],
    ),
    "at-the-top": (
        ["batchsize=4"],
        [
            "error: batchsize (command-line override 'batchsize=4') is not a key of the config (top level); did you "
            f"mean hardware.batch_size? Valid keys of the top level: {_keys(Config)}."
        ],
    ),
    "a-misspelt-section": (
        ["hardwar.batch_size=4"],
        [
            "error: hardwar (command-line override 'hardwar.batch_size=4') is not a key of the config (top level); "
            "did you mean hardware?"
        ],
    ),
    "of-another-choice": (
        ["distill_loss.beta=0.3"],
        [
            "error: distill_loss.beta (command-line override 'distill_loss.beta=0.3') is not a key of distill_loss "
            f"(distill_loss=forward_kl). It is a key of distill_loss=jsd: choose that too. Valid keys of distill_loss: "
            f"{_keys(DistillLossConfig)}."
        ],
    ),
    "nested": (
        ["model.teacher.tiny.hidden=3"],
        [
            "error: model.teacher.tiny.hidden (command-line override 'model.teacher.tiny.hidden=3') is not a key of "
            "model.teacher.tiny (model=tiny); did you mean model.teacher.tiny.hidden_size?"
        ],
    ),
    "swept": (
        ["-m", "seed=1,2", "hardware.batchsize=4,8"],
        [
            "error: hardware.batchsize (command-line override 'hardware.batchsize=4,8') is not a key of hardware "
            "(hardware=cpu); did you mean hardware.batch_size?",
            HARDWARE_KEYS,
        ],
    ),
    "in-a-sweep": (
        ["-m", "seed=1,2", "hardware.batchsize=4"],
        ["error: hardware.batchsize (command-line override 'hardware.batchsize=4') is not a key of hardware"],
    ),
    "cfg-job": (
        ["--cfg", "job", "hardware.batchsize=4"],
        ["error: hardware.batchsize (command-line override 'hardware.batchsize=4') is not a key of hardware"],
    ),
}


@pytest.mark.parametrize("case", sorted(UNKNOWN_KEY_CASES))
def test_an_unknown_key_names_the_valid_keys_and_exits_2(run_cli, tmp_path, case):
    """Hydra finds an unknown key while composing; run.py (firstsight.config.composition) turns its report
    into one line: the key, the override it came from, the valid keys of that node and the closest
    one; exit status 2; nothing written (no outputs/ or multirun/ directory, no MLflow store)."""
    args, fragments = UNKNOWN_KEY_CASES[case]
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    for fragment in fragments:
        assert fragment in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "+hardware.batchsize=4",
            "error: hardware.batchsize (command-line override '+hardware.batchsize=4') is not a key "
            f"of hardware; did you mean hardware.batch_size? {HARDWARE_KEYS}",
        ),
        (
            "+foo=1",
            f"error: foo (command-line override '+foo=1') is not a key of the config (top level). "
            f"Valid keys of the top level: {_keys(Config)}.",
        ),
    ],
)
def test_a_key_appended_with_plus_that_nothing_reads_is_refused(run_cli, tmp_path, override, fragment):
    """`+key=value` makes Hydra append the key; validation refuses one its section's schema lacks,
    before any model or run (else a typo would be silently ignored)."""
    result = run_cli(override, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.glob("outputs/*/*/checkpoints"))


def test_hydra_full_error_still_gives_the_traceback_of_an_unknown_key(run_cli, tmp_path):
    result = run_cli("hardware.batchsize=4", env={"HYDRA_FULL_ERROR": "1"}, timeout=120)
    assert result.returncode == 1
    assert (
        "Traceback" in result.stderr
        and "ConfigCompositionException: Could not override 'hardware.batchsize'" in result.stderr
        and "error: " not in result.stderr
    )


def test_other_composition_errors_keep_hydras_report(run_cli, tmp_path):
    result = run_cli("hardware.batch_size=abc", timeout=120)
    assert result.returncode == 1 and "could not be converted to Integer" in result.stderr


# ----------------------------------------------------------------------------- model directories


def _record(**changes):
    record = dict(GOOD_RECORD, frames=[str(FIXTURES / f) for f in GOOD_RECORD["frames"]])
    record.update(changes)
    return json.dumps(record)


def test_run_py_refuses_a_bad_record_before_anything_is_written(run_cli, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(_record() + "\n" + _record(answer=-2) + "\n")
    result = run_cli(
        "data=egoschema", f"data.train_file={train}", f"data.validation_file={FIXTURES / 'egoschema.jsonl'}"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {train}:2: answer index -2 is out of range for 5 options (0..4)" in result.stderr
    assert "data.on_bad_sample=skip" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before the MLflow run was created
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


# ----------------------------------------------------------------------------- sample length
