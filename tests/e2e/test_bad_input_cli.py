"""The matrix of bad input: each case ends the job with exit status 2 and a message that names
the bad value and what is valid, and writes nothing (no MLflow run, no checkpoint). The cases run
the job in this process (firstsight.suite.dispatch.run_task on the composed config: validation, then the
MLflow run), which is what run.py does after composing; one case goes through run.py.

Rows of the matrix covered by other files (not repeated here):

Config
  unknown group choice ........ test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[unknown-choice]
  unknown key ................. here: test_an_unknown_key_names_the_valid_keys_and_exits_2 (run.py, -m, --cfg),
                                test_a_key_appended_with_plus_that_nothing_reads_is_refused (+key=value),
                                test_config.py::test_wrong_types_and_keys_fail_at_composition[train.bogus=1] (compose API)
  wrong type .................. test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[wrong-type],
                                test_config.py::test_wrong_types_and_keys_fail_at_composition
  batch size, temperature, alpha, learning rate, grad_accum_steps, beta
                                test_config.py::test_invalid_values_are_refused_with_the_value_and_what_is_valid,
                                test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[negative-batch]
  LoRA rank, target modules ... test_lora_export.py::test_bad_export_and_lora_input_exits_2
  top-k (teacher cache) ....... test_teacher_cache.py::test_validation
  hidden-state term ........... test_hidden_loss.py (distill_loss.hidden_* settings)
  a quantized trainable student without LoRA
                                test_config.py::test_invalid_values_are_refused...[precision.parts.language.quantization=nf4],
                                test_edge.py::test_quantizing_a_part_of_a_student_trained_in_full_is_refused
  the no-KD control with a KD weight .. test_runs.py::test_no_kd_with_a_kd_weight_is_refused
  multi-GPU on CPU ............ test_config.py::test_invalid_values_are_refused...[hardware.num_gpus=2], [hardware=gpu]
  a memory budget ............. test_edge.py::test_bad_budgets_are_refused (bad values; a budget outside task=profile).
                                A budget smaller than the model's weights is not refused: it is what
                                task=profile measures, the verdict "does not fit"
                                (test_edge.py::test_an_out_of_memory_under_a_cuda_cap_is_the_result_does_not_fit)
  a missing model path ........ test_config.py::test_invalid_values_are_refused...[model.student.source=/does/not/exist]
  a hub id while offline ...... test_config.py::test_invalid_values_are_refused...[model=qwen2vl_7b_2b]
  a quantization backend missing  test_cli.py::test_bad_input_exits_nonzero_before_anything_is_built[backend-cannot-run-here]
Data
  missing / unreadable / corrupt image or video, malformed JSON line, missing fields, answer index
  out of range, special tokens ... test_jsonl_data.py::test_bad_records_are_named_by_file_and_line_then_stop_or_are_skipped
  nothing valid in a file ..... test_jsonl_data.py::test_a_file_with_nothing_valid_is_an_error_even_when_skipping
  a missing data file (with where it was set) .. test_jsonl_data.py::test_run_py_names_a_missing_data_file_and_where_it_was_set
  bad data settings ........... test_jsonl_data.py::test_invalid_file_data_settings_are_refused
  a sample longer than the maximum length (data.max_length) .. here: test_a_sample_longer_than_max_length_*,
                                test_a_max_length_below_the_synthetic_samples_is_refused
Models
  different tokenizers ........ test_vocab_alignment.py::test_a_distill_job_with_another_tokenizer_stops_before_its_run (before any run)
  a half-written or corrupt resumable checkpoint .. test_resume.py::test_broken_checkpoints_are_skipped;
                                a resume with other settings: test_resume.py::test_resume_with_other_settings_is_refused
  safetensors that do not match config.json .. here: test_safetensors_that_do_not_match_the_config_are_refused_*
                                (before the run, from the headers; and again when loaded)
  a directory that is not a model or is an adapter .. test_lora_export.py::test_bad_export_and_lora_input_exits_2,
                                test_lora_export.py::test_evaluating_an_adapter_directory_points_at_the_merged_student
Faults (OOM, NaN, tracking store, full disk): test_faults.py. Security defaults: test_security.py.
"""

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
