"""Like-for-like baselines: the full-precision runs a compressed run is compared with (BASELINE_RULE),
and why a baseline is not like for like (another device, package versions or code version)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from firstsight.tasks.report.records import DEVICE_TAG, VERSION_TAG_PREFIX, RunRecord, is_none
from firstsight.tracking.tracker import CODE_VERSION_TAG

# Params that say how a run was compressed: a run and its baseline may differ in these only.
COMPRESSION_PREFIXES = ("precision.", "lora.")
BASELINE_RULE = (
    "The baselines of a run are the full-precision runs of the same task: `precision.dtype=float32`, "
    "no quantization (`precision.quantization=none`, no `precision.teacher_quantization`, no part of "
    "`precision.parts` set to another dtype or quantized), no LoRA (an fp32 LoRA run is no baseline) "
    "and, for distill, float32 trainable weights (`precision.trainable_dtype=float32`), "
    "that have the same value as the run for every other param that differs among the runs here "
    "(only `precision.*` and `lora.*`, the compression choices, may differ), and that ran like for like: "
    "on the same device (tag `firstsight.device_name`), with the same package versions (tags `version.*`) "
    "and the same code version (tag `firstsight.code_version`: the git commit, `+dirty` when the checkout "
    "had uncommitted changes, which the tag does not tell apart). The ratio is the run's value over the "
    "**median** of its baselines' values; the table shows how many baseline runs there are and the "
    "min–max of their values and of the run's ratios to each. With one baseline run the verdict stands "
    "but the row says to repeat it. A run with no like-for-like baseline is *not measurable*, with the "
    "reason; no figure is estimated for it. Baseline runs themselves are not checked."
)


def is_baseline(run: RunRecord) -> bool:
    """Full precision, nothing quantized, no LoRA (the uncompressed reference); a distill run also
    trains float32 weights (not pure bf16 training, precision.trainable_dtype=bfloat16)."""
    p = run.params
    parts_full = all(
        value in ("None", "none", "float32") for key, value in p.items() if key.startswith("precision.parts.")
    )  # no part set to another dtype or quantized
    return (
        p.get("precision.dtype") == "float32"
        and p.get("precision.quantization", "none") == "none"
        and is_none(p.get("precision.teacher_quantization"))
        and p.get("lora.enabled", "False").lower() not in ("true", "1")
        and (run.task != "distill" or p.get("precision.trainable_dtype", "float32") == "float32")
        and parts_full
    )


def find_baselines(run: RunRecord, runs: Sequence[RunRecord], swept: Sequence[str]) -> List[RunRecord]:
    """The full-precision runs of the same task with the same other swept values (see BASELINE_RULE),
    like for like or not (`unlike` tells); none for a baseline run itself."""
    if is_baseline(run):
        return []
    keys = [k for k in swept if not k.startswith(COMPRESSION_PREFIXES)]
    return [
        b
        for b in runs
        if b is not run
        and b.task == run.task
        and is_baseline(b)
        and all(b.params.get(k) == run.params.get(k) for k in keys)
    ]


def unlike(run: RunRecord, base: RunRecord) -> Optional[str]:
    """Why `base` is not a like-for-like baseline of `run`: another device, other package versions or
    another code version (by their tags); None when it is. A tag neither run has does not differ."""
    reasons = []
    here, there = run.tags.get(DEVICE_TAG), base.tags.get(DEVICE_TAG)
    if here != there:
        reasons.append(
            f"baseline {base.short_id} on {there or 'an unrecorded device'}, "
            f"this run on {here or 'an unrecorded device'}"
        )
    keys = sorted({k for k in (*run.tags, *base.tags) if k.startswith(VERSION_TAG_PREFIX)})
    versions = [
        f"{k[len(VERSION_TAG_PREFIX) :]} {base.tags.get(k, 'unrecorded')} vs {run.tags.get(k, 'unrecorded')}"
        for k in keys
        if run.tags.get(k) != base.tags.get(k)
    ]
    if versions:
        reasons.append(
            f"baseline {base.short_id} ran other package versions ({', '.join(versions)}: baseline vs this run)"
        )
    here, there = run.tags.get(CODE_VERSION_TAG), base.tags.get(CODE_VERSION_TAG)
    if here != there:
        reasons.append(
            f"baseline {base.short_id} ran code version {there or 'unrecorded'}, this run {here or 'unrecorded'}"
        )
    return "; ".join(reasons) or None
