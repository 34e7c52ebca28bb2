"""benchmarks/proxy_study.py: its statistics on outcomes whose answer is known, and its --smoke run
(the whole pipeline on the CPU: pre-training, distill runs, per-question outcomes, quantized
students, results files). What it measured on a GPU is in benchmarks/results/proxy_study_*.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import proxy_study  # noqa: E402  (benchmarks/ is no package)


@pytest.mark.slow
def test_smoke_runs_the_whole_study_on_the_cpu(cache_dir, tmp_path):
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "proxy_study.py"),
            "--smoke",
            "--results-dir",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    written = re.search(r"^wrote (\S+\.json) and (\S+\.md)$", done.stdout, re.MULTILINE)
    assert written, done.stdout[-2000:]
    assert Path(written.group(2)).read_text().startswith("# Proxy study")
    data = json.loads(Path(written.group(1)).read_text())
    assert data["device"] == "cpu" and data["experiment"] == "proxy_study_cpu"
    assert set(data["pretrained"]) == {"teacher", "student"}
    assert data["pretrained"]["student"]["params"] < data["pretrained"]["teacher"]["params"]
    for point in data["points"]:
        assert set(point["runs"]) == {"none", "forward_kl"} and not any("error" in r for r in point["runs"].values())
        for key in ("teacher", "base", "none", "forward_kl", "forward_kl@bf16", "forward_kl@int8_weight_only"):
            model = point["models"][key]
            right = proxy_study.unpack(model["outcomes"], point["n"])
            assert len(right) == point["n"] == 24 and model["accuracy"] == pytest.approx(sum(right) / 24)
        assert len(point["kinds"]) == 24
        # each run distilled from the pre-trained directories, on the transfer set
        overrides = point["runs"]["none"]["overrides"]
        assert f"model.teacher.source={data['pretrained']['teacher']['dir']}" in overrides
        assert "data.train_size=32" in overrides
    a = data["analysis"]
    assert a["seeds"] == [1, 2] and a["questions_per_seed"] == 24
    assert a["best_kd"]["loss"] == "forward_kl" and a["best_kd"]["verdict"] in ("MET", "MISSED", "unresolved")
    assert set(a["quantized"]) == {"bf16", "int8_weight_only"} and "drop" in a["quantized"]["int8_weight_only"]
