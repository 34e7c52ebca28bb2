"""Short runs that just work, and a quick `--help`: a distill run no longer than its throughput
warm-up runs, warns once and logs what it could measure (docs/mlflow.md); `python run.py --help`
lists the same groups and choices as Hydra's own help (benchmarks/cli_startup.py times it)."""

from __future__ import annotations

import logging

from firstsight.core.perf import ThroughputMeter


def _meter(warmup: int, seconds) -> ThroughputMeter:
    meter = ThroughputMeter(warmup)
    for s in seconds:
        meter.add_step(s, samples=4, tokens=100)
    return meter


def _warnings(caplog) -> list:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "firstsight.core.perf"]


def test_throughput_leaves_the_warmup_steps_out(caplog):
    summary = _meter(3, [9.0, 9.0, 9.0, 1.0, 1.0]).summary()
    assert summary == {
        "perf/throughput_samples_per_s": 4.0,
        "perf/throughput_tokens_per_s": 100.0,
        "perf/measured_steps": 2.0,
    }
    assert not _warnings(caplog)


def test_a_run_no_longer_than_its_warmup_measures_the_steps_after_its_first(caplog):
    summary = _meter(3, [9.0, 2.0, 2.0]).summary()
    assert summary["perf/measured_steps"] == 2.0 and summary["perf/throughput_samples_per_s"] == 2.0
    [warning] = _warnings(caplog)
    assert "train.throughput_warmup_steps=3" in warning.getMessage() and "last 2" in warning.getMessage()


def test_a_one_step_run_logs_throughput_as_not_measured(caplog):
    assert _meter(3, [9.0]).summary() == {"perf/measured_steps": 0.0}
    [warning] = _warnings(caplog)
    assert "not measured" in warning.getMessage()
    assert _meter(3, []).summary() == {}  # a resumed job with no step left: nothing to say
