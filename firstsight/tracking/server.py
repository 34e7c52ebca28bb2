"""`python -m firstsight.tracking.server`: an MLflow tracking server on the suite's store.

Many jobs writing one SQLite file at once collide ("database is locked"); a sweep whose jobs run
at the same time (SLURM, submitit_local) logs through one server instead, which alone writes the
store. By default it serves the store `python run.py` writes without a server (sqlite:///mlflow.db
in the working directory, artifacts under ./mlruns), so runs logged either way land together and
`mlflow ui` shows them all. It starts `mlflow server`, waits until it answers /health, prints the
line to export, and runs until Ctrl-C (or SIGTERM), which stops the server.

    python -m firstsight.tracking.server                       # http://127.0.0.1:5000
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000  # as printed; then, in that shell:
    python run.py -m hardware=slurm_local precision=fp32,bf16

Jobs on other machines (a real cluster's nodes) must reach it: `--host 0.0.0.0` binds every
interface and prints this machine's name in the URI (no authentication: only on a trusted network).
Arguments after `--` go to `mlflow server` unchanged.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_store() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    parser = argparse.ArgumentParser(
        prog="python -m firstsight.tracking.server",
        description="Start an MLflow tracking server on the suite's store and print the MLFLOW_TRACKING_URI "
        "to export, so that many jobs log at once without SQLite lock errors. "
        "Arguments after `--` are passed to `mlflow server`.",
    )
    parser.add_argument(
        "--store",
        default=default_store(),
        help="backend store URI (default: sqlite:///<cwd>/mlflow.db, MLflow's default store)",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=str(Path.cwd() / "mlruns"),
        help="where uploaded artifacts go (default: <cwd>/mlruns, where runs without a server put them)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes (default: 1 for a SQLite store, which then has a single writer; 4 otherwise)",
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the server to answer")
    args = parser.parse_args(argv)
    args.extra = extra
    return args


def tracking_uri(host: str, port: int) -> str:
    """The URI clients use: this machine's name when bound to every interface."""
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def server_command(args: argparse.Namespace) -> List[str]:
    workers = args.workers or (1 if args.store.startswith("sqlite:") else 4)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        args.store,
        "--artifacts-destination",
        args.artifacts_destination,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(workers),
    ]
    if args.host not in LOOPBACK and "--allowed-hosts" not in args.extra:
        # MLflow rejects Host headers other than localhost and private IPs: allow this machine's names
        names = {socket.gethostname(), socket.getfqdn(), args.host, "localhost", "127.0.0.1"} - {"0.0.0.0", "::"}
        allowed = sorted(names) + [f"{n}:*" for n in sorted(names)] + ["10.*", "192.168.*", "172.*"]
        cmd += ["--allowed-hosts", ",".join(allowed)]
    return cmd + args.extra


def wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {process.returncode} before answering")
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not answer {url}/health within {timeout:.0f} s")
        time.sleep(0.25)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not port_free(args.host, args.port):
        print(
            f"error: port {args.port} on {args.host} is in use (another server?); choose one with --port",
            file=sys.stderr,
        )
        return 2
    if args.store.startswith("sqlite:///"):
        Path(args.store[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    local_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', 'localhost') else args.host}:{args.port}"
    if ":" in args.host and args.host != "::":
        local_url = f"http://[{args.host}]:{args.port}"
    # its own process group: `mlflow server` runs uvicorn (and helpers) as children, stopped together
    # MLflow's background job runner (GenAI scorers, trace archival) is unused here: 7 more processes
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # its output goes to stderr: stdout carries only the lines below (for scripts reading the URI)
    process = subprocess.Popen(server_command(args), env=env, stdout=sys.stderr, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        wait_healthy(process, local_url, args.timeout)
        uri = tracking_uri(args.host, args.port)
        print(
            f"MLflow tracking server up: store {args.store}, artifacts {args.artifacts_destination}\n"
            f"export MLFLOW_TRACKING_URI={uri}\n"
            f"(UI: {uri}; Ctrl-C stops the server)",
            flush=True,
        )
        return process.wait()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group (the server and its workers), SIGKILL what outlives it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + timeout  # the workers may outlive the parent briefly
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
