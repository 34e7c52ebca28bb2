"""The report task: a real sweep read back through MLflow by `python run.py task=report`, and the
pure selection / table / baseline / target logic on synthetic run records."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import pytest
from conftest import compose, run_py

from firstsight.core.errors import FirstSightError
from firstsight.evaluation.stats import FAIL, PASS, UNRESOLVED
from firstsight.tasks.report import (
    RunRecord,
    accuracy_verdict,
    fmt,
    md_unescape,
    select_runs,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("throughput_vs_memory.png", "accuracy_vs_memory.png", "loss_curves.png")
SWEEP = (
    "-m",
    "precision=fp32,bf16",
    "train.max_steps=3",
    "train.throughput_warmup_steps=1",
    "hardware.batch_size=2",
    "train.eval_at_end=true",
    "data.validation_size=16",
    "train.save_checkpoint=false",
    "train.progress_bar=false",
)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sweep_dir(cache_dir, tmp_path_factory):
    """A working directory holding one real 2-job sweep (fp32, bf16) in its default MLflow store."""
    workdir = tmp_path_factory.mktemp("report-sweep")
    result = _cli(workdir, cache_dir, *SWEEP)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _cli(workdir, cache_dir, *args):
    return run_py(args, workdir, cache_dir)


def _client(workdir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def _runs(workdir):
    client = _client(workdir)
    experiment = client.get_experiment_by_name("firstsight")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _jobs(workdir):
    return [
        r
        for r in _runs(workdir)
        if r.data.tags.get("firstsight.task") == "distill"
        and r.data.tags.get("firstsight.role") != "sweep"
        and r.info.status == "FINISHED"
        and r.data.tags.get("firstsight.sweep_id", "none") != "none"
    ]


def _latest_report_run(workdir):
    reports = [r for r in _runs(workdir) if r.data.tags.get("firstsight.task") == "report"]
    return max(reports, key=lambda r: r.info.start_time)


def _md_section_table(markdown, heading):
    """The first table after `heading`: (headers, rows) with cells unescaped."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([md_unescape(c.strip()) for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return table[0], table[2:]


def _add_fake_runs(workdir):
    """Beside the sweep: a FAILED distill job of no sweep, and a run FirstSight did not create."""
    client = _client(workdir)
    experiment_id = client.get_experiment_by_name("firstsight").experiment_id
    failed = client.create_run(
        experiment_id, run_name="failed", tags={"firstsight.task": "distill", "firstsight.sweep_id": "none"}
    )
    client.log_param(failed.info.run_id, "precision.name", "fp16")
    client.set_terminated(failed.info.run_id, "FAILED")
    other = client.create_run(experiment_id, run_name="someone else's")
    client.set_terminated(other.info.run_id, "FINISHED")
    return failed.info.run_id


def test_report_over_a_real_sweep(sweep_dir, cache_dir):
    failed_id = _add_fake_runs(sweep_dir)
    result = _cli(sweep_dir, cache_dir, "task=report")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 2
    report_run = _latest_report_run(sweep_dir)
    assert report_run.info.status == "FINISHED"
    assert report_run.data.metrics["report/runs"] == 2
    out = Path(report_run.data.tags["firstsight.report_dir"])
    assert out.name == "report" and out.parent.parent.parent == sweep_dir / "outputs"  # <job output dir>/report
    markdown = (out / "report.md").read_text()

    # one row per job; swept values and numbers are those MLflow holds for the run
    headers, rows = _md_section_table(markdown, "## Comparison")
    assert len(rows) == 2
    assert "precision.name" in headers and "task" in headers
    assert "peak RSS GB (CPU)" in headers and not any("VRAM" in h for h in headers)  # CPU: RSS, never VRAM
    by_id = {r.info.run_id[:8]: r for r in jobs}
    assert {row[0] for row in rows} == set(by_id)
    assert failed_id[:8] not in markdown  # FAILED runs only with task.include_failed=true
    columns = {
        "train tokens/s": "perf/throughput_tokens_per_s",
        "peak RSS GB (CPU)": "perf/peak_rss_gb",
        "KD loss (last)": "train/kd_loss",
        "student acc": "eval/student_accuracy",
        "acc drop": "eval/accuracy_drop",
        "weights GB": "model/weights_gb",
    }
    for row in rows:
        run = by_id[row[0]]
        cells = dict(zip(headers, row))
        assert cells["task"] == "distill"
        assert cells["precision.name"] == run.data.params["precision.name"]
        for header, metric in columns.items():
            m = run.data.metrics
            shown = (
                f"{m[metric]:.3f} [{m[metric + '_ci_low']:.3f}, {m[metric + '_ci_high']:.3f}]"
                if metric + "_ci_low" in m
                else fmt(m[metric])
            )  # an accuracy with its interval
            assert cells[header] == shown, (header, cells[header])
    with open(out / "runs.csv", newline="") as f:
        records = list(csv.DictReader(f))
    for record in records:  # full precision
        run = next(r for r in jobs if r.info.run_id == record["run_id"])
        for metric in columns.values():
            assert float(record[metric]) == run.data.metrics[metric]

    # target checks: bf16 against the fp32 baseline, measured; VRAM not measurable on a CPU
    by_precision = {r.data.params["precision.name"]: r for r in jobs}
    ratio = (
        by_precision["bf16"].data.metrics["perf/throughput_tokens_per_s"]
        / by_precision["fp32"].data.metrics["perf/throughput_tokens_per_s"]
    )
    headers, rows = _md_section_table(markdown, "### Training throughput gain")
    assert len(rows) == 1
    cells = dict(zip(headers, rows[0]))
    assert cells["run"] == by_precision["bf16"].info.run_id[:8]
    assert cells["baseline runs"] == by_precision["fp32"].info.run_id[:8] and cells["baselines"] == "1"
    # the ratio is measured (2 steps on a shared CPU: either side of 2 happens); verdict and reason follow it
    assert cells["ratio"] == f"{ratio:.3f}×"
    expected = (PASS, "") if ratio >= 2 else (FAIL, ", not")
    assert (cells["result"], cells["why"]) == (
        expected[0],
        f"{ratio:.3f}× the median of 1 baseline value{expected[1]} ≥ 2×",
    )
    assert cells["note"] == "1 baseline run: repeat it for a spread"  # same machine, packages and code
    for job in jobs:
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", job.data.tags["firstsight.code_version"])
    vram = markdown.split("### VRAM saving", 1)[1].split("###", 1)[0]
    assert "Not measurable" in vram and "perf/peak_rss_gb" in vram
    # accuracy: the rule on each run's own metrics; 16 questions can never resolve a 1-point target
    headers, rows = _md_section_table(markdown, "### Accuracy drop")
    assert len(rows) == 2
    for row in rows:
        cells = dict(zip(headers, row))
        run = by_id[cells["run"]]
        expected = accuracy_verdict(
            RunRecord(
                run.info.run_id, params=dict(run.data.params), metrics=dict(run.data.metrics), tags=dict(run.data.tags)
            ),
            0.01,
        ).verdict
        assert (cells["result"], cells["why"]) == (expected.status, expected.reason)
        assert cells["result"] != PASS
        if "eval/accuracy_drop_ci_low" not in run.data.metrics:  # a distill that logs no interval yet
            assert cells["result"] == UNRESOLVED and cells["why"] == "no interval: rerun with this version"

    # plots: real PNGs, referenced from both documents; everything logged on the report's own run
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in markdown
    html = (out / "report.html").read_text()
    assert "<table>" in html and f'<img src="{PLOTS[0]}"' in html
    artifacts = {Path(a.path).name for a in _client(sweep_dir).list_artifacts(report_run.info.run_id, "report")}
    assert {"report.md", "report.html", "runs.csv", *PLOTS} <= artifacts
    assert not list(out.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_report_on_the_latest_sweep_leaves_earlier_reports_out(sweep_dir, cache_dir):
    result = _cli(sweep_dir, cache_dir, "task=report", "task.sweep=latest", "task.include_failed=true")
    assert result.returncode == 0, result.stderr[-3000:]
    report_run = _latest_report_run(sweep_dir)
    markdown = (Path(report_run.data.tags["firstsight.report_dir"]) / "report.md").read_text()
    parent = next(r for r in _runs(sweep_dir) if r.data.tags.get("firstsight.role") == "sweep")
    assert f"parent run {parent.info.run_id}" in markdown
    headers, rows = _md_section_table(markdown, "## Comparison")
    assert sorted(dict(zip(headers, r))["precision.name"] for r in rows) == ["bf16", "fp32"]
    assert "status" not in headers  # the FAILED run is of no sweep: not in this one
    assert report_run.data.metrics["report/runs"] == 2


def test_selecting_a_sweep_by_directory_or_parent_run(sweep_dir):
    """Read back in-process (another working directory): the sweep's dir, relative or absolute, or its parent id."""
    from firstsight.tasks.report import read_runs

    parent = next(r for r in _runs(sweep_dir) if r.data.tags.get("firstsight.role") == "sweep")
    relative = parent.data.tags["firstsight.sweep_id"]
    job_ids = {r.info.run_id for r in _jobs(sweep_dir)}
    for sweep in (
        relative,
        str(sweep_dir / relative),
        str(sweep_dir / relative) + "/",
        parent.info.run_id,
        parent.info.run_id[:8],
    ):
        # quoted: a run id's prefix such as 17966e17 would otherwise be read as the float 1.7966e21
        cfg = compose(
            ["task=report", f"task.sweep='{sweep}'", f"tracking.tracking_uri=sqlite:///{sweep_dir / 'mlflow.db'}"]
        )
        _, selection = read_runs(cfg)
        assert {r.run_id for r in selection.runs} == job_ids, sweep
    cfg = compose(
        [
            "task=report",
            "task.sweep=multirun/1999-01-01/00-00-00",
            f"tracking.tracking_uri=sqlite:///{sweep_dir / 'mlflow.db'}",
        ]
    )
    with pytest.raises(FirstSightError, match=re.escape(relative)):  # names the sweeps there
        read_runs(cfg)


def test_report_over_a_missing_experiment_exits_2(sweep_dir, cache_dir):
    result = _cli(sweep_dir, cache_dir, "task=report", "task.experiment=nope")
    assert result.returncode == 2
    assert "error:" in result.stderr and "'nope'" in result.stderr and "'firstsight'" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_over_an_empty_experiment_exits_2(run_cli, tmp_path):
    result = run_cli("task=report")
    assert result.returncode == 2
    assert "no job runs to report in experiment 'firstsight'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def _run(run_id, task="distill", precision="fp32", status="FINISHED", start=0, metrics=None, params=None, tags=None):
    dtype, quantization = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "nf4": ("bfloat16", "nf4")}[
        precision
    ]
    return RunRecord(
        run_id=run_id,
        status=status,
        start_time=start,
        params={
            "task.name": task,
            "precision.name": precision,
            "precision.dtype": dtype,
            "precision.quantization": quantization,
            "precision.teacher_quantization": "None",
            "lora.enabled": str(precision == "nf4"),
            "seed": "0",
            "tracking.run_name": run_id,
            **(params or {}),
        },
        metrics=dict(metrics or {}),
        tags={"firstsight.task": task, "firstsight.sweep_id": "none", **(tags or {})},
    )


def _parent(run_id, sweep_dir, start):
    return RunRecord(
        run_id=run_id,
        start_time=start,
        tags={"firstsight.role": "sweep", "firstsight.task": "distill", "firstsight.sweep_id": sweep_dir},
    )


def _child(run_id, parent, sweep_dir, start, status="FINISHED", job_num=0):
    return _run(
        run_id,
        start=start,
        status=status,
        tags={
            "mlflow.parentRunId": parent,
            "firstsight.sweep_id": sweep_dir,
            "firstsight.job_num": str(job_num),
            "firstsight.output_dir": f"/launch/{sweep_dir}/{job_num}",
        },
    )


def test_selection_rules():
    old, new = "multirun/d/old", "multirun/d/new"
    records = [
        _parent("p-old", old, 1),
        _child("c-old", "p-old", old, 2),
        _parent("p-new", new, 10),
        _child("c-new-1", "p-new", new, 12, job_num=1),
        _child("c-new-0", "p-new", new, 11, job_num=0),
        _child("c-new-x", "p-new", new, 13, status="FAILED", job_num=2),
        _run("single", start=20),
        _run("running", start=21, status="RUNNING"),
        _run("report", task="report", start=30),
        RunRecord("untagged", start_time=40),
    ]
    kw = dict(experiment="exp", store="sqlite:///x.db", cwd="/elsewhere")
    everything = select_runs(records, **kw)
    assert [r.run_id for r in everything.runs] == ["c-old", "c-new-0", "c-new-1", "single"]
    assert everything.left_out["sweep parent runs"] == 2 and everything.left_out["report runs"] == 1
    assert select_runs(records, include_failed=True, **kw).runs[-2].run_id == "c-new-x"
    assert [r.run_id for r in select_runs(records, max_runs=2, **kw).runs] == ["c-new-1", "single"]
    latest = select_runs(records, sweep="latest", **kw)
    assert latest.sweep_parent.run_id == "p-new" and [r.run_id for r in latest.runs] == ["c-new-0", "c-new-1"]
    for sweep in ("p-old", old, "./" + old, "/launch/" + old, "/launch/" + old + "/"):
        assert [r.run_id for r in select_runs(records, sweep=sweep, **kw).runs] == ["c-old"], sweep
    with pytest.raises(FirstSightError, match="multirun/d/new.*p-new"):
        select_runs(records, sweep="multirun/d/nope", **kw)
    with pytest.raises(FirstSightError, match="no job runs to report in experiment 'exp'"):
        select_runs(records[-2:], **kw)
    with pytest.raises(FirstSightError, match="holds no sweep"):
        select_runs([_run("single")], sweep="latest", **kw)


def test_a_run_id_prefix_hydra_read_as_a_number_still_selects_its_sweep():
    """Unquoted, task.sweep=17966e17 reaches the task as '1.7966e+21' (and 012345 as '12345'):
    the parent whose id begins with a literal of that value is meant; none: the error says to quote."""
    records = [
        _parent("17966e17aa", "multirun/d/a", 1),
        _child("c-a", "17966e17aa", "multirun/d/a", 2),
        _parent("012345bbbb", "multirun/d/b", 3),
        _child("c-b", "012345bbbb", "multirun/d/b", 4),
        _parent("99999fcccc", "multirun/d/c", 5),
        _child("c-c", "99999fcccc", "multirun/d/c", 6),
    ]
    kw = dict(experiment="exp", store="sqlite:///x.db", cwd="/elsewhere")
    assert [r.run_id for r in select_runs(records, sweep=str(17966e17), **kw).runs] == ["c-a"]
    assert [r.run_id for r in select_runs(records, sweep=str(12345), **kw).runs] == ["c-b"]
    with pytest.raises(FirstSightError, match="quote it"):
        select_runs(records, sweep=str(1.5e30), **kw)
    with pytest.raises(FirstSightError) as err:  # not a number: no quoting hint
        select_runs(records, sweep="zzzzzzzz", **kw)
    assert "quote it" not in str(err.value)


def test_the_code_version_is_the_checkout_commit(tmp_path):
    from firstsight.tracking.tracker import code_version

    assert code_version.__wrapped__(str(tmp_path)) == "none"  # not a git checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert code_version.__wrapped__(str(tmp_path)) == head
    (tmp_path / "a.txt").write_text("2")
    assert code_version.__wrapped__(str(tmp_path)) == head + "+dirty"
    (tmp_path / "sub").mkdir()  # a directory inside a checkout is not its root: not the package's checkout
    assert code_version.__wrapped__(str(tmp_path / "sub")) == "none"
