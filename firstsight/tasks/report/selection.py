"""Which runs the report is about: the job runs of an experiment, or of one sweep (`task.sweep`:
latest, a parent run id or a prefix of one, or a multirun directory), and what was left out and why."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from firstsight.core.errors import FirstSightError
from firstsight.tasks.report.records import FAILED_STATUSES, FINISHED, RunRecord

log = logging.getLogger(__package__)  # firstsight.tasks.report: one logger for the whole task


@dataclass
class Selection:
    """The runs chosen for the report, and what was left out and why."""

    experiment: str
    store: str
    runs: List[RunRecord]
    scope: str  # "all job runs of the experiment" or "sweep <dir> (parent run <id>)"
    sweep_parent: Optional[RunRecord] = None
    left_out: Dict[str, int] = field(default_factory=dict)  # reason -> count


def is_sweep_parent(record: RunRecord, parent_ids: Iterable[str] = ()) -> bool:
    tags = record.tags
    return tags.get("firstsight.role") == "sweep" or "firstsight.jobs" in tags or record.run_id in set(parent_ids)


def is_report_run(record: RunRecord) -> bool:
    return record.task == "report" or record.params.get("task.name") == "report"


def select_runs(
    records: Sequence[RunRecord],
    experiment: str,
    store: str,
    sweep: Optional[str] = None,
    include_failed: bool = False,
    max_runs: int = 1000,
    cwd: Optional[str] = None,
    own_run_id: Optional[str] = None,
) -> Selection:
    """The job runs to report on: sweep parents, report runs and runs FirstSight did not create are
    never rows; FAILED/KILLED only with `include_failed`; runs still going never. Raises
    FirstSightError when nothing is left, naming the experiment (and sweep) and what exists.
    `own_run_id`: the report job's own run, which is neither a row nor counted."""
    cwd = cwd or os.getcwd()
    records = [r for r in records if r.run_id != own_run_id]
    parent_ids = {r.parent_id for r in records if r.parent_id}
    parents = [r for r in records if is_sweep_parent(r, parent_ids)]
    left_out: Dict[str, int] = {}

    def leave_out(reason: str, count: int = 1) -> None:
        if count:
            left_out[reason] = left_out.get(reason, 0) + count

    leave_out("sweep parent runs", len(parents))
    parent_set = {p.run_id for p in parents}
    candidates = []
    for record in records:
        if record.run_id in parent_set:
            continue
        if "firstsight.task" not in record.tags:
            leave_out("runs without a firstsight.task tag (not FirstSight jobs)")
        elif is_report_run(record):
            leave_out("report runs")
        else:
            candidates.append(record)

    scope = "all job runs of the experiment"
    parent: Optional[RunRecord] = None
    if sweep:
        parent, members = _resolve_sweep(sweep, parents, candidates, records, experiment, cwd)
        leave_out("job runs of other sweeps or of no sweep", len(candidates) - len(members))
        candidates = members
        sweep_dir = parent.sweep_id if parent is not None else members[0].sweep_id if members else sweep
        scope = f"sweep {sweep_dir}" + (f" (parent run {parent.run_id})" if parent is not None else "")

    selected = []
    for record in candidates:
        if record.status == FINISHED or (include_failed and record.status in FAILED_STATUSES):
            selected.append(record)
        elif record.status in FAILED_STATUSES:
            leave_out("FAILED/KILLED runs (task.include_failed=true shows them)")
        else:
            leave_out(f"{record.status} runs (not over yet)")
    selected.sort(key=lambda r: (r.start_time, int(r.tags.get("firstsight.job_num", 0) or 0), r.run_id))
    if len(selected) > max_runs:
        leave_out(f"older runs beyond task.max_runs={max_runs}", len(selected) - max_runs)
        selected = selected[-max_runs:]
    if not selected:
        raise _nothing_to_report(experiment, store, sweep, left_out)
    return Selection(
        experiment=experiment, store=store, runs=selected, scope=scope, sweep_parent=parent, left_out=left_out
    )


def _nothing_to_report(experiment: str, store: str, sweep: Optional[str], left_out: Dict[str, int]) -> FirstSightError:
    what = f"sweep {sweep!r} of experiment {experiment!r}" if sweep else f"experiment {experiment!r}"
    why = "; ".join(f"{n} {reason}" for reason, n in left_out.items()) or "it holds no runs"
    return FirstSightError(
        f"no job runs to report in {what} ({store}): {why}. Run some jobs first "
        f"(python run.py -m precision=fp32,bf16), choose another with task.experiment=<name>"
        + (", task.sweep=latest or leave task.sweep unset" if sweep else "")
        + "."
    )


def _resolve_sweep(
    sweep: str, parents: List[RunRecord], jobs: List[RunRecord], records: Sequence[RunRecord], experiment: str, cwd: str
) -> Tuple[Optional[RunRecord], List[RunRecord]]:
    """`sweep` as "latest", a parent run id (or a unique prefix of one), or a multirun directory."""
    parent: Optional[RunRecord] = None
    if sweep == "latest":
        own = [p for p in parents if p.task != "report"]
        if not own:
            raise FirstSightError(
                f"task.sweep=latest: experiment {experiment!r} holds no sweep (no parent run of a "
                f"`python run.py -m ...`); leave task.sweep unset to report on all its runs."
            )
        parent = max(own, key=lambda p: (p.start_time, p.run_id))
    else:
        by_id = [p for p in parents if p.run_id == sweep or (len(sweep) >= 6 and p.run_id.startswith(sweep))]
        if not by_id:
            by_id = _read_as_number(sweep, parents)
        if len(by_id) != 1:
            return _sweep_in_directory(sweep, parents, jobs, records, experiment, cwd)
        parent = by_id[0]
    dirs = _sweep_dirs(parent, cwd)
    members = [r for r in jobs if r.parent_id == parent.run_id or (r.sweep_id != "none" and _sweep_dirs(r, cwd) & dirs)]
    return parent, members


def _sweep_in_directory(
    sweep: str, parents: List[RunRecord], jobs: List[RunRecord], records: Sequence[RunRecord], experiment: str, cwd: str
) -> Tuple[Optional[RunRecord], List[RunRecord]]:
    """`sweep` as a multirun directory: its parent run when there is exactly one, and its job runs."""
    wanted = _path_forms(sweep, cwd)
    in_dir = {r.run_id for r in records if _sweep_dirs(r, cwd) & wanted}
    if not in_dir:
        raise FirstSightError(
            f"task.sweep={sweep!r}: no sweep of experiment {experiment!r} has that parent run id or "
            f"multirun directory. Its sweeps: {_describe_sweeps(parents, jobs, cwd)}. Give one of "
            f"those directories or parent run ids, or task.sweep=latest."
            + (
                " (Hydra reads an unquoted id made of digits, maybe with one 'e', as a number: "
                "quote it, e.g. task.sweep=\"'<id>'\".)"
                if _number(sweep) is not None
                else ""
            )
        )
    parent_ids = {p.run_id for p in parents if p.run_id in in_dir}
    parent_ids |= {r.parent_id for r in records if r.run_id in in_dir and r.parent_id}
    found = [p for p in parents if p.run_id in parent_ids]
    parent = found[0] if len(found) == 1 else None
    members = [r for r in jobs if r.run_id in in_dir or (r.parent_id and r.parent_id in parent_ids)]
    return parent, members


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _read_as_number(sweep: str, parents: List[RunRecord]) -> List[RunRecord]:
    """The parents one of whose id prefixes (6+ characters, digits with at most one 'e') has the
    value `sweep` has as a number: Hydra turns an unquoted task.sweep=17966e17 into the float
    1.7966e+21 (and 012345 into 12345) before the task sees it."""
    value = _number(sweep)
    if value is None:
        return []
    numeric_prefix = re.compile(r"[0-9]+(e[0-9]+)?")
    found = []
    for parent in parents:
        prefixes = (parent.run_id[:n] for n in range(6, len(parent.run_id) + 1))
        if any(numeric_prefix.fullmatch(p) and float(p) == value for p in prefixes):
            found.append(parent)
    if len(found) == 1:
        log.info(
            "task.sweep=%s: read as parent run %s (Hydra had read the id's prefix as a number)", sweep, found[0].run_id
        )
    return found


def _path_forms(path: str, cwd: str) -> set:
    expanded = os.path.expanduser(path)
    absolute = os.path.normpath(os.path.join(cwd, expanded))
    return {os.path.normpath(expanded), absolute, os.path.realpath(absolute)}


def _sweep_dirs(record: RunRecord, cwd: str) -> set:
    """Ways to name the sweep directory of a run: its firstsight.sweep_id tag as written, resolved
    against the current directory, and resolved through the job's own (absolute) output directory,
    which is <launch dir>/<sweep dir>/<job subdir>."""
    sweep_id = record.sweep_id
    if not sweep_id or sweep_id == "none":
        return set()
    forms = _path_forms(sweep_id, cwd)
    output_dir = record.tags.get("firstsight.output_dir", "")
    if output_dir and os.path.isabs(output_dir) and not os.path.isabs(sweep_id):
        marker = os.sep + os.path.normpath(sweep_id) + os.sep
        found = os.path.normpath(output_dir).rfind(marker)
        if found >= 0:
            launched = os.path.normpath(output_dir)[: found + len(marker) - 1]
            forms |= {launched, os.path.realpath(launched)}
    return forms


def _describe_sweeps(parents: List[RunRecord], jobs: List[RunRecord], cwd: str) -> str:
    if not parents:
        return "none"
    lines = []
    for p in sorted(parents, key=lambda p: -p.start_time)[:10]:
        count = sum(1 for j in jobs if j.parent_id == p.run_id)
        lines.append(f"{p.sweep_id} (parent run {p.run_id}, {count} job runs, task {p.task or '?'})")
    more = f", and {len(parents) - 10} more" if len(parents) > 10 else ""
    return "; ".join(lines) + more
