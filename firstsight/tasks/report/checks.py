"""A target check and its rows: one run judged against one target (PASS / FAIL / unresolved / not
measurable), and the count of each verdict over checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from firstsight.evaluation.stats import FAIL, NOT_MEASURABLE, PASS, UNRESOLVED, Verdict
from firstsight.tasks.report.records import RunRecord

VERDICTS = (PASS, FAIL, UNRESOLVED, NOT_MEASURABLE)


@dataclass
class CheckRow:
    """One run judged against one target. Accuracy rows: `value` is the judged drop. Ratio rows:
    `value` the run's metric, `baselines` its like-for-like baseline runs, `baseline_value` their
    median and `ratio` = value / that median."""

    run: RunRecord
    value: Optional[float]
    target: float
    verdict: Verdict
    baselines: List[RunRecord] = field(default_factory=list)
    baseline_value: Optional[float] = None
    ratio: Optional[float] = None
    baseline_values: List[float] = field(default_factory=list)  # each baseline's, in `baselines`' order
    notes: List[str] = field(default_factory=list)
    flags: List[str] = field(default_factory=list)  # accuracy rows: "<role> not looking at the frames: ..."

    @property
    def passed(self) -> bool:
        return self.verdict.status == PASS


@dataclass
class Check:
    title: str
    metric: str
    target_text: str
    rows: List[CheckRow] = field(default_factory=list)
    not_measurable: List[str] = field(default_factory=list)  # why the whole check could not be made
    note: str = ""

    def count(self, status: str) -> int:
        return sum(r.verdict.status == status for r in self.rows)


def verdict_counts(checks: Sequence[Check]) -> Dict[str, int]:
    """How many rows of all `checks` got each verdict (PASS, FAIL, unresolved, not measurable)."""
    return {status: sum(c.count(status) for c in checks) for status in VERDICTS}
