"""Shared fixtures: offline, a per-session cache, helpers to compose configs and to run run.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

from firstsight.config.specs import model_spec

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach a hub, in this process or its children
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TIERS = ("unit", "integration", "e2e", "gpu")


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Each test gets its directory's tier as a marker, so `-m unit` (or integration, e2e) selects it;
    an end-to-end test is also `slow`, so the quick loop (`-m "not slow"`) leaves the processes out."""
    for item in items:
        tier = Path(item.fspath).parent.name
        if tier in TIERS:
            item.add_marker(tier)
        if tier == "e2e":
            item.add_marker("slow")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("firstsight-cache")
    os.environ["FIRSTSIGHT_CACHE_DIR"] = str(path)
    return path


def quick(args: Sequence[str]) -> List[str]:
    """`args` on the quick preset (experiment=debug: 40 steps, 128 questions) unless they choose an
    experiment themselves; only the tests of the default job itself run it at full length."""
    args = list(args)
    if any(a.lstrip("+~").startswith("experiment=") for a in args):
        return args
    # beside the other overrides: run.py's parser takes them as one run of positional arguments
    first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [*args[:first], "experiment=debug", *args[first:]]


def compose(overrides: List[str] = (), return_hydra_config: bool = False):
    """The composed config as `python run.py <overrides>` would see it (no Hydra job context);
    with `return_hydra_config` the `hydra` node too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from firstsight.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=quick(overrides), return_hydra_config=return_hydra_config)


def run_py(
    args: Sequence[str],
    cwd: Path,
    cache_dir: Path,
    timeout: int = 600,
    env: Optional[Dict[str, str]] = None,
    full: bool = False,
) -> subprocess.CompletedProcess:
    """`python run.py <args>` in `cwd` (MLflow's default store and Hydra's outputs land there), on
    the quick preset unless `full`, its output captured."""
    env = dict(os.environ, FIRSTSIGHT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *(args if full else quick(args))],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_cli(cache_dir: Path, tmp_path: Path):
    """Run `python run.py <args>` with `tmp_path` as the working directory (so MLflow's default
    store, sqlite:///mlflow.db, and Hydra's outputs/ and multirun/ land there)."""

    def run(
        *args: str, timeout: int = 600, env: Optional[Dict[str, str]] = None, full: bool = False
    ) -> subprocess.CompletedProcess:
        return run_py(args, tmp_path, cache_dir, timeout=timeout, env=env, full=full)

    return run


def default_store_runs(workdir: Path):
    """All runs of the 'firstsight' experiment in MLflow's default store under `workdir`."""
    import mlflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=["firstsight"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m firstsight.tracking.server` on a free port with its own store; yields the URI it printed.
    Shared by the tests that log through a server (each uses its own experiment)."""
    import signal
    import time

    store = tmp_path_factory.mktemp("mlflow-server")
    log_path = store / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "firstsight.tracking.server",
                "--port",
                str(free_port()),
                "--store",
                f"sqlite:///{store / 'mlflow.db'}",
                "--artifacts-destination",
                str(store / "mlartifacts"),
            ],
            cwd=store,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        uri, deadline = None, time.time() + 120
        while uri is None:
            line = server.stdout.readline()
            if line.startswith("export MLFLOW_TRACKING_URI="):
                uri = line.split("=", 1)[1].strip()
            elif not line:  # its stdout closed: it is exiting
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"firstsight.tracking.server did not start: {log_path.read_text()[-3000:]}")
                time.sleep(0.1)
        yield uri
    finally:
        server.send_signal(signal.SIGTERM)  # it stops the mlflow server it started
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: with tiny tensors on a busy 2-core machine, each op can
    wait ~10 ms for a descheduled OpenMP worker, which made gradcheck take seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyParts:
    """The default config's tiny pair, built offline: its config, processor, splits and models."""

    def __init__(self):
        from firstsight.models.loading import load_processor

        self.cfg = compose()
        self.processor = load_processor(self.cfg.model, self.cfg.cache_dir)

    def split(self, name: str):
        from firstsight.data import load_split

        return load_split(self.cfg.data, name, self.cfg.seed)

    def model(self, role: str, frozen: bool = True):
        from firstsight.models.loading import load_model

        return load_model(model_spec(self.cfg), role, self.processor, "cpu", frozen=frozen).model


@pytest.fixture(scope="session")
def tiny_parts(cache_dir: Path) -> TinyParts:
    return TinyParts()
