"""The newest GPU benchmarks' plumbing on the CPU (--smoke: the tiny models): each runs end to end
and writes results holding measured figures where they belong. What they measure on a GPU is in
benchmarks/results/."""

from __future__ import annotations

import argparse
import sys

import pytest
from conftest import ROOT


def test_learning_curves_recorded_results_are_their_json_rendered():
    """The H100 curves were recorded from the exploration script's logs: the Markdown holds the JSON's
    figures exactly as the benchmark renders them; the --curve syntax."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning_curves  # benchmarks/ is no package: found through sys.path

    recorded = ROOT / "benchmarks" / "results" / "learning_curves_NVIDIA_H100_80GB_HBM3.json"
    meta, points = learning_curves.read_results(str(recorded))
    assert learning_curves.markdown({**meta, "points": points}) == recorded.with_suffix(".md").read_text()
    assert learning_curves.parse_curve('A64=ce model.student.weights=random "data.kinds=[count, held]"') == {
        "name": "A64",
        "mode": "ce",
        "overrides": ["model.student.weights=random", "data.kinds=[count, held]"],
    }
    with pytest.raises(argparse.ArgumentTypeError):
        learning_curves.parse_curve("A64=model.student.weights=random")  # no mode
