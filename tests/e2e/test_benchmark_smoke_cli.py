"""The newest GPU benchmarks' plumbing on the CPU (--smoke: the tiny models): each runs end to end
and writes results holding measured figures where they belong. What they measure on a GPU is in
benchmarks/results/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import ROOT


def _smoke(script: str, *args: str, cache_dir: Path, tmp_path: Path) -> Dict[str, Any]:
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    written = re.search(r"^wrote (\S+\.json) and (\S+\.md)$", done.stdout, re.MULTILINE)
    assert written, done.stdout[-2000:]
    assert Path(written.group(2)).read_text().startswith("# ")
    return json.loads(Path(written.group(1)).read_text())


def test_answer_breakdown_times_the_prefill_and_the_decode_steps_per_precision(cache_dir, tmp_path):
    data = _smoke("answer_breakdown.py", cache_dir=cache_dir, tmp_path=tmp_path)
    assert data["device"] == "cpu" and data["prompt_tokens"] > 0 and data["new_tokens"] == 4
    assert [p["precision"] for p in data["points"]] == ["bf16", "int8_weight_only"]
    for point in data["points"]:
        assert point["method"] == "static_eager"  # the CPU: no graphs, nothing compiled
        # every part measured (how they compare is the GPU's business: medians of 2 on a busy CPU are noise)
        assert point["answer_s"] > 0 and point["prefill_s"] > 0 and point["decode_steps_s"] > 0
        assert abs(point["decode_step_ms"] - 1000 * point["decode_steps_s"] / 3) < 1e-9


def test_kd_step_profile_profiles_the_steps_after_the_skipped_ones(cache_dir, tmp_path):
    data = _smoke("kd_step_profile.py", "--point", "naive", cache_dir=cache_dir, tmp_path=tmp_path)
    result = data["result"]
    assert data["point"] == "naive" and "train.logits=all_positions" in data["overrides"]
    assert len(result["step_seconds"]) == 4 + 2 + 2 and all(s > 0 for s in result["step_seconds"])
    assert result["profiled_steps"] == [5, 6]
    assert result["profiled_step_median_s"] > 0 and result["unprofiled_step_median_s"] > 0
    assert "aten::" in result["top_host"]  # the profiler recorded the steps' operators
    assert result["gpu_kernel_s_per_step"] is None and result["gpu_busy_fraction"] is None  # no GPU: not made up


@pytest.mark.slow  # two curve processes side by side: ~10 s on 2 cores
def test_learning_curves_evaluates_every_curve_on_the_same_questions_as_it_trains(cache_dir, tmp_path):
    data = _smoke("learning_curves.py", cache_dir=cache_dir, tmp_path=tmp_path)
    assert data["device"] == "cpu" and data["commit"] and [c["name"] for c in data["points"]] == ["ce", "kd"]
    ce, kd = data["points"]
    for curve in (ce, kd):
        assert "error" not in curve and "stopped" not in curve
        # the large train split, with the pre-trainings pinned: the shipped teacher and base, not new ones
        assert "data.train_size=1000000" in curve["overrides"] and curve["settings"]["train_size"] == 1_000_000
        assert curve["student"]["pretraining"]["steps"] == 700  # the shipped base
        assert curve["student"]["pretraining"]["train_size"] == 1_000_000  # its own split, not the curve's
        assert [p["step"] for p in curve["checkpoints"]] == [0, 2, 4]
        assert [p["samples"] for p in curve["checkpoints"]] == [0, 8, 16]
        for point in curve["checkpoints"]:
            assert point["accuracy"] == point["correct"] / 16 and point["low"] <= point["accuracy"] <= point["high"]
            assert set(point["by_kind"]) <= {"colour_at", "shape_of", "count", "held", "moved"}
        assert all(p["mean_loss"] > 0 for p in curve["checkpoints"][1:])
    # the same model answers the same questions before either curve trains
    assert ce["checkpoints"][0]["correct"] == kd["checkpoints"][0]["correct"]
    assert "teacher" not in ce and ce["settings"]["loss"] == "ce"
    assert kd["teacher"]["pretraining"]["steps"] == 2500 and kd["settings"]["loss"] == "forward_kl"
