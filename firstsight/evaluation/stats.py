"""Accuracy as a sample estimate: its 95 % interval, paired differences, and verdicts that use them.

- One accuracy: the Wilson score interval (scipy's `binomtest(...).proportion_ci(method="wilson")`),
  which stays inside [0, 1] and behaves at 0 and n correct, where the normal interval does not.
- A difference of two accuracies on the same questions (teacher − student, after − before):
  a paired bootstrap of the per-question differences (scipy's `bootstrap`, BCa; percentile where
  BCa is undefined), with a fixed seed so a run's interval is reproducible, and McNemar's exact
  test (a binomial test on the discordant questions) for its p-value. Where no question differs
  the bootstrap has nothing to resample: the interval is then ±3/n (the rule of three).
- A verdict against a target ("drop ≤ 1 point") reads the interval, never the point estimate:
  PASS only when the whole interval is within the target, FAIL only when the whole interval is
  beyond it, else *unresolved* with about how many questions would decide it; *not measurable*
  when the teacher is not above chance (random weights: 0 vs 0 is no evidence of anything).

"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
from scipy.stats import binomtest, bootstrap

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A sample estimate with its interval at `CONFIDENCE`, from `n` questions."""

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def metrics(self, name: str) -> Dict[str, float]:
        """`name`, `name_ci_low`, `name_ci_high`: the metric names of DESIGN.md's contract."""
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def proportion(correct: Sequence[bool], confidence: float = CONFIDENCE) -> Estimate:
    """The share of True in `correct` with its Wilson score interval."""
    n = len(correct)
    k = int(sum(bool(c) for c in correct))
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Estimate(k / n, float(ci.low), float(ci.high), n)


def paired_difference(
    first: Sequence[bool],
    second: Sequence[bool],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Estimate:
    """accuracy(first) − accuracy(second) over the same questions (first[i] and second[i] are
    one question's outcomes), with a paired bootstrap interval."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need the same questions: {len(first)} vs {len(second)}")
    n = len(first)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    diff = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    value = float(diff.mean())
    if np.all(diff == diff[0]):  # no spread to resample (e.g. both right or wrong on every question):
        # the bootstrap would claim certainty; none of n questions differing still allows a share
        # of up to ~3/n that do (the "rule of three", 95 %), so the interval is ±3/n around the value
        return Estimate(value, max(-1.0, value - 3 / n), min(1.0, value + 3 / n), n)

    def resampled(method: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning: handled by the fallback
            return bootstrap(
                (diff,),
                np.mean,
                confidence_level=confidence,
                n_resamples=resamples,
                method=method,
                vectorized=True,
                batch=max(1, 2_000_000 // n),
                rng=np.random.default_rng(seed),
            ).confidence_interval

    ci = resampled("BCa")
    if not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        ci = resampled("percentile")
    return Estimate(value, float(ci.low), float(ci.high), n)


def mcnemar_p(first: Sequence[bool], second: Sequence[bool]) -> float:
    """McNemar's exact two-sided p-value for "first and second are equally accurate" on the same
    questions: a binomial test of the questions only one of them got right."""
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    if only_first + only_second == 0:
        return 1.0
    return float(binomtest(only_first, only_first + only_second, 0.5).pvalue)


def questions_needed(estimate: Estimate, target: float) -> Optional[int]:
    """About how many questions would make `estimate`'s interval clear `target` (its half-width
    shrinks as 1/√n), or None when the estimate sits on the target (no number of questions will)."""
    gap = abs(estimate.value - target)
    if estimate.n == 0 or gap < 1e-12 or not math.isfinite(estimate.half_width):
        return None
    if estimate.half_width <= 0:
        return estimate.n
    return int(math.ceil(estimate.n * (estimate.half_width / gap) ** 2))


PASS, FAIL, UNRESOLVED, NOT_MEASURABLE = "PASS", "FAIL", "unresolved", "not measurable"


@dataclass(frozen=True)
class Verdict:
    status: str  # PASS | FAIL | unresolved | not measurable
    reason: str  # one line: why (the interval against the target, or what is missing)

    def __str__(self) -> str:
        return self.status if not self.reason else f"{self.status} ({self.reason})"


def at_most(
    estimate: Estimate,
    target: float,
    teacher: Optional[Estimate] = None,
    chance: Optional[float] = None,
    unit: float = 100.0,
    unit_name: str = "points",
) -> Verdict:
    """Is `estimate` (e.g. the teacher − student drop) ≤ `target`? PASS when its interval's upper
    bound is ≤ target, FAIL when its lower bound is > target, else unresolved. Not measurable
    when `teacher` (the accuracy the drop is taken from) is not above `chance` by its interval."""
    if teacher is not None and chance is not None and not teacher.low > chance:
        return Verdict(
            NOT_MEASURABLE,
            f"the teacher ({teacher}) is not above chance ({chance:.3f}): "
            "its accuracy says nothing (random or untrained weights?)",
        )
    if estimate.n == 0 or not math.isfinite(estimate.value):
        return Verdict(NOT_MEASURABLE, "no questions were answered")
    shown = (
        f"{unit * estimate.value:+.1f} [{unit * estimate.low:+.1f}, {unit * estimate.high:+.1f}] {unit_name}, "
        f"{estimate.n} questions"
    )
    if estimate.high <= target + 1e-12:
        return Verdict(PASS, f"{shown}: upper bound ≤ {unit * target:g}")
    if estimate.low > target + 1e-12:
        return Verdict(FAIL, f"{shown}: lower bound > {unit * target:g}")
    needed = questions_needed(estimate, target)
    need = f"need ~{needed}" if needed is not None else "the estimate sits on the target"
    return Verdict(UNRESOLVED, f"too few questions: {need}; {shown}")
