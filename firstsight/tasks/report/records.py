"""What the report knows of a run: the MLflow run as a `RunRecord`, the metrics and tags the report
reads, the params that differ among runs (the swept values), and a metric with its logged interval."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from firstsight.evaluation.stats import Estimate

# Metric columns of the table, in order: (MLflow metric, column header, meaning). A column appears
# when at least one selected run has the metric; a run without it gets an empty cell.
METRIC_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    (
        "perf/throughput_tokens_per_s",
        "train tokens/s",
        "training throughput, tokens per second (steady state, warm-up excluded)",
    ),
    ("perf/throughput_samples_per_s", "train samples/s", "training throughput, samples per second (steady state)"),
    ("perf/peak_vram_gb", "peak VRAM GB", "peak GPU memory allocated (torch.cuda.max_memory_allocated), GB"),
    ("perf/peak_rss_gb", "peak RSS GB (CPU)", "peak resident memory of the process on a CPU run, GB (not VRAM)"),
    ("infer/latency_p50_s", "latency p50 s", "single-query generation latency, median, seconds (profile)"),
    ("infer/throughput_qps", "infer queries/s", "batched generation throughput, queries per second (profile)"),
    ("model/weights_gb", "weights GB", "size of the (student / profiled) model's weights as loaded, GB"),
    ("train/kd_loss", "KD loss (last)", "the KD term at the last optimizer step (before alpha and T²)"),
    ("eval/teacher_accuracy", "teacher acc", "teacher accuracy on the validation split"),
    (
        "eval/full_precision_teacher_accuracy",
        "full-precision teacher acc",
        "accuracy of the teacher unquantized (the run's own teacher when that is not quantized)",
    ),
    ("eval/student_accuracy", "student acc", "student accuracy on the validation split"),
    ("eval/accuracy_drop", "acc drop", "teacher accuracy − student accuracy (0.01 = 1 point)"),
    (
        "eval/full_precision_accuracy_drop",
        "acc drop vs full-precision teacher",
        "full-precision teacher accuracy − student accuracy on the same questions: the drop the study judges",
    ),
    ("eval/teacher_blind_accuracy", "teacher blind acc", "teacher accuracy with the frames blanked"),
    ("eval/student_blind_accuracy", "student blind acc", "student accuracy with the frames blanked"),
    ("eval/student_accuracy_before", "student acc before", "student accuracy before distillation"),
    ("eval/distill_gain", "distill gain", "student accuracy after − before distillation, on the same questions"),
)
TRAIN_THROUGHPUT = "perf/throughput_tokens_per_s"
PEAK_VRAM = "perf/peak_vram_gb"
PEAK_RSS = "perf/peak_rss_gb"
ACCURACY_DROP = "eval/accuracy_drop"
FULL_PRECISION_DROP = "eval/full_precision_accuracy_drop"
TEACHER_ACCURACY = "eval/teacher_accuracy"
FULL_PRECISION_TEACHER = "eval/full_precision_teacher_accuracy"
QUESTIONS = "eval/questions"
CHANCE = "eval/chance_accuracy"
# Tags that say where and with what a run ran: a run is compared only with baselines that agree on them.
DEVICE_TAG = "firstsight.device_name"
VERSION_TAG_PREFIX = "version."
TEACHER_PRECISION_TAG = "firstsight.teacher_precision."
NONE_VALUES = ("None", "none", "null", "")
# Params that never make runs incomparable, nor a column (names and bookkeeping).
IGNORED_PREFIXES = ("tracking.",)
FINISHED = "FINISHED"
FAILED_STATUSES = ("FAILED", "KILLED")


@dataclass
class RunRecord:
    """What the report needs of one MLflow run (built from MLflow, or by hand in tests)."""

    run_id: str
    name: str = ""
    status: str = FINISHED
    start_time: int = 0  # ms since the epoch
    params: Dict[str, str] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)
    tags: Dict[str, str] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.tags.get("firstsight.task") or self.params.get("task.name", "")

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    @property
    def sweep_id(self) -> str:
        return self.tags.get("firstsight.sweep_id", "none")

    @property
    def parent_id(self) -> Optional[str]:
        return self.tags.get("mlflow.parentRunId")


def is_none(value: Optional[str]) -> bool:
    """A param or tag that says "not set" (None as MLflow logged it)."""
    return value is None or value in NONE_VALUES


def swept_keys(runs: Sequence[RunRecord]) -> List[str]:
    """Params whose value differs among `runs` (a param a run lacks counts as a value of its own),
    task.name excepted (the task has its own column)."""
    keys = sorted({k for r in runs for k in r.params})
    return [
        k
        for k in keys
        if k != "task.name" and not k.startswith(IGNORED_PREFIXES) and len({r.params.get(k) for r in runs}) > 1
    ]


def estimate(run: RunRecord, metric: str) -> Optional[Estimate]:
    """`metric` with its logged 95 % interval (`<metric>_ci_low`, `<metric>_ci_high`) over the run's
    `eval/questions` (0 when not logged); None when the run lacks the metric or its interval."""
    m = run.metrics
    names = (metric, f"{metric}_ci_low", f"{metric}_ci_high")
    if not all(name in m and math.isfinite(m[name]) for name in names):
        return None
    questions = m.get(QUESTIONS)
    n = int(questions) if questions is not None and math.isfinite(questions) else 0
    return Estimate(m[metric], m[names[1]], m[names[2]], n)
