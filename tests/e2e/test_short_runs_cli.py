"""Short runs that just work, and a quick `--help`: a distill run no longer than its throughput
warm-up runs, warns once and logs what it could measure (docs/mlflow.md); `python run.py --help`
lists the same groups and choices as Hydra's own help (benchmarks/cli_startup.py times it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, default_store_runs


@pytest.mark.slow
def test_a_two_step_smoke_run_runs_and_warns_once(run_cli, tmp_path):
    result = run_cli("train.max_steps=2", "train.eval_at_end=false", "train.save_checkpoint=false")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("no more than train.throughput_warmup_steps=3") == 1, output[-3000:]
    [run] = default_store_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perf/measured_steps"] == 1.0
    assert run.data.metrics["perf/throughput_tokens_per_s"] > 0


def test_help_lists_what_hydras_own_help_lists(run_cli):
    """firstsight.config.composition._fast_help shares one copy of Hydra's config repository while
    --help lists the groups: the page is Hydra's, character for character."""
    fast = run_cli("--help", full=True)
    assert fast.returncode == 0, fast.stderr
    hydras = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runpy; sys.argv = ['run.py', '--help']; "
            "import firstsight.config.composition as c; c._fast_help = lambda: None; "
            f"runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert hydras.returncode == 0, hydras.stderr
    assert fast.stdout == hydras.stdout
    assert "precision: bf16, fp16, fp32" in fast.stdout
