"""QA samples read from files: LLaVA / Qwen conversations and EgoSchema-style multiple choice, bad data
named by file and line (stop or skip-and-count), the config checks, and run.py on the fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import default_store_runs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MEDIA = FIXTURES / "media"
GOOD_EGO = {"question": "Which way?", "options": ["left", "right"], "answer": 0, "frames": [str(MEDIA / "frame0.png")]}


def _with(base, **changes):
    record = {k: v for k, v in base.items() if k not in changes or changes[k] is not None}
    record.update({k: v for k, v in changes.items() if v is not None})
    return json.dumps(record)


def test_distill_and_evaluate_on_egoschema_files_end_to_end(run_cli, tmp_path):
    data = FIXTURES / "egoschema.jsonl"
    common = ["data=egoschema", f"data.train_file={data}", "train.progress_bar=false", "hardware.batch_size=2"]
    result = run_cli(
        *common,
        f"data.validation_file={data}",
        "task=distill",
        "train.max_steps=2",
        "train.throughput_warmup_steps=1",
        "train.save_checkpoint=false",
        "tracking.enabled=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    bad = tmp_path / "validation.jsonl"  # the fixture's records plus one with an answer out of range
    lines = (FIXTURES / "egoschema.jsonl").read_text().splitlines()
    bad.write_text("\n".join([*lines[:3], _with(GOOD_EGO, answer=5)]) + "\n")
    result = run_cli(
        *common,
        "task=evaluate",
        f"data.validation_file={bad}",
        f"data.image_root={FIXTURES}",
        "data.on_bad_sample=skip",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{bad}:4: answer index 5 is out of range" in result.stdout + result.stderr  # logged (Hydra: stdout)
    [run] = default_store_runs(tmp_path)
    metrics = run.data.metrics
    assert metrics["data/skipped_samples"] == 1
    # the accuracies are the shares right of the 3 questions kept, as the job's per-question record has them
    outcomes = json.loads((Path(run.data.tags["firstsight.output_dir"]) / "eval_outcomes.json").read_text())
    assert metrics["eval/questions"] == len(outcomes) == 3
    assert metrics["eval/student_accuracy"] == pytest.approx(sum(o["student"] for o in outcomes) / 3, abs=1e-12)
    assert metrics["eval/teacher_accuracy/egoschema"] == pytest.approx(
        sum(o["teacher"] for o in outcomes) / 3, abs=1e-12
    )
    assert metrics["eval/chance_accuracy"] == pytest.approx((1 / 5 + 1 / 5 + 1 / 4) / 3)


def test_run_py_names_a_missing_data_file_and_where_it_was_set(run_cli, tmp_path):
    result = run_cli(
        "data=egoschema", "data.train_file=nope.jsonl", f"data.validation_file={FIXTURES / 'egoschema.jsonl'}"
    )
    assert result.returncode == 2
    assert "data.train_file='nope.jsonl' (command-line override 'data.train_file=nope.jsonl')" in result.stderr
    assert f"no such file {tmp_path / 'nope.jsonl'}" in result.stderr and "Traceback" not in result.stderr
