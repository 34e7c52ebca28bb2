"""A sweep's comparison in MLflow, as a user opens it (docs/mlflow.md): one real sweep of two
precisions leaves on its parent run the swept values, the report's table and plots as artifacts,
a saved view of its runs, and prints the `mlflow ui` command and the addresses to open; then its
store, served by `mlflow server` on 127.0.0.1, is loaded in headless Chromium (Debian's `chromium`)
and the pages' DOM, after the UI's scripts ran, must show the child runs with their throughput,
peak memory and KD loss, and list the comparison's images. Screenshots of both pages are the
test's artefacts (in its tmp_path; set FIRSTSIGHT_UI_SCREENSHOTS=<dir> to keep copies there)."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator

import pytest
from conftest import free_port, run_py

from firstsight.tracking.server import wait_healthy

SWEEP = [
    "-m",
    "precision=fp32,bf16",
    "train.max_steps=4",
    "train.throughput_warmup_steps=1",
    "data.validation_size=16",
    "train.eval_before=false",
    "train.eval_blind=false",
    "train.save_checkpoint=false",
    "train.progress_bar=false",
]
PLOTS = ("throughput_vs_memory.png", "accuracy_vs_memory.png", "loss_curves.png", "kd_loss_curves.png")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOWN_METRICS = ("perf/throughput_tokens_per_s", "perf/peak_rss_gb", "train/kd_loss")


@pytest.fixture(scope="module")
def sweep(cache_dir, tmp_path_factory) -> Dict:
    """`python run.py -m precision=fp32,bf16 ...` (short) in a fresh directory: its output and store."""
    workdir = tmp_path_factory.mktemp("ui-sweep")
    result = run_py(SWEEP, workdir, cache_dir, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("firstsight")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("firstsight.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {
        "workdir": workdir,
        "uri": uri,
        "client": client,
        "experiment": experiment,
        "parent": parent,
        "children": children,
        "stdout": result.stdout,
    }


def _printed(stdout: str, label: str) -> str:
    match = re.search(rf"^\s+{re.escape(label)}:\s+(\S+(?: \S+)*)$", stdout, re.M)
    assert match, f"{label!r} not printed:\n{stdout[-2000:]}"
    return match.group(1)


@pytest.mark.slow
def test_a_sweep_leaves_its_comparison_on_its_parent_run(sweep):
    client, parent, children = sweep["client"], sweep["parent"], sweep["children"]
    assert sweep["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"  # the training view
    assert parent.info.status == "FINISHED" and len(children) == 2
    points = sorted(next(p for p in c.info.run_name.split(",") if p.startswith("precision=")) for c in children)
    assert points == ["precision=bf16", "precision=fp32"]
    # the swept values, as params of the parent (the runs list's parent row shows them)
    assert parent.data.params["precision.name"] == "fp32, bf16"
    assert "precision.name" in parent.data.tags["firstsight.swept_keys"]
    # the report of the sweep, as artifacts of the parent
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{f}" for f in ("report.html", "report.md", "runs.csv", *PLOTS)} <= files, files
    csv = (sweep["workdir"] / Path(parent.data.tags["firstsight.sweep_id"]) / "report" / "runs.csv").read_text()
    assert "fp32" in csv and "bf16" in csv
    # a saved view of the sweep's runs, and where to look, printed
    view = sweep["experiment"].tags[f"mlflow.sharedViewState.sweep-{parent.info.run_id}"]
    assert "perf/throughput_tokens_per_s" in view and "precision.name" in view
    stdout = sweep["stdout"]
    assert _printed(stdout, "open the UI") == f"mlflow ui --backend-store-uri {sweep['uri']}"
    compare = _printed(stdout, "compare the runs")
    assert compare.startswith("http://127.0.0.1:5000/#/compare-runs?runs=")
    assert all(c.info.run_id in compare for c in children)
    assert f"viewStateShareKey=sweep-{parent.info.run_id}" in _printed(stdout, "the runs, listed")
    assert _printed(stdout, "the comparison").endswith(
        "/artifacts/report/throughput_vs_memory.png?workflowType=machine_learning"
    )


@pytest.fixture(scope="module")
def ui(sweep) -> Iterator[str]:
    """`mlflow server` on the sweep's store, on 127.0.0.1 and a free port: its base URL."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    port = free_port()
    log = open(sweep["workdir"] / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sweep["uri"]]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=sweep["workdir"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(server, base, timeout=180)  # the suite's own wait (firstsight/tracking/server.py)
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {(sweep['workdir'] / 'mlflow-server.log').read_text()[-3000:]}") from err
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _chromium(url: str, *action: str, width: int = 1600) -> str:
    """Headless Chromium on `url`, given 20 s of virtual time for the UI's scripts and requests."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
            + ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
            + [f"--user-data-dir={profile}", f"--window-size={width},1000", "--virtual-time-budget=20000"]
            + [*action, url],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _text(dom: str) -> str:
    """The page's visible text, its elements' text separated by ' | '."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    return html.unescape(re.sub(r"(\s*\|\s*)+", " | ", re.sub(r"<[^>]+>", " | ", dom)))


def _shot(url: str, path: Path) -> Path:
    _chromium(url, f"--screenshot={path}")
    assert path.is_file() and path.stat().st_size > 10_000
    keep = os.environ.get("FIRSTSIGHT_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def _at(url: str, base: str) -> str:
    return url.replace("http://127.0.0.1:5000", base)


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_sweep_and_its_comparison(sweep, ui, tmp_path):
    children = sweep["children"]
    # the experiment's runs list, opened on the sweep's saved view: its runs, flat, with their figures
    runs_url = _at(_printed(sweep["stdout"], "the runs, listed"), ui)
    page = _text(_chromium(runs_url, "--dump-dom", width=2400))
    assert "2 | matching runs" in page, page[:3000]
    for name in ("precision=fp32", "precision=bf16"):
        assert name in page
    for metric in SHOWN_METRICS:
        assert f"| {metric} |" in page, metric
        for child in children:
            value = child.data.metrics[metric]
            assert repr(value)[:5] in page, (metric, value)
    _shot(runs_url, tmp_path / "mlflow_ui_sweep_runs.png")

    # the parent's artifacts, opened on the comparison's first plot: the report's files listed, the plot shown
    comparison_url = _at(_printed(sweep["stdout"], "the comparison"), ui)
    dom = _chromium(comparison_url, "--dump-dom")
    listed = _text(dom)
    for name in (*PLOTS, "report.html", "runs.csv"):
        assert f"| {name} |" in listed, name
    assert 'alt="report/throughput_vs_memory.png"' in dom  # the image itself is on the page
    _shot(comparison_url, tmp_path / "mlflow_ui_sweep_comparison.png")
