"""What the benchmark scripts share: one `python run.py` process per point, the results files'
header (device, versions, date, command), merging a call's points into an earlier call's results
(`--append`), and writing the JSON + Markdown pair.

Imported by the scripts beside it (`python benchmarks/<script>.py` puts this folder on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # firstsight, when the script is run from elsewhere
    sys.path.insert(0, str(ROOT))


def run_job(overrides: Sequence[str], out_dir: Path, timeout: float, launcher: Sequence[str] = ()) -> Dict[str, Any]:
    """`python [launcher] run.py <overrides> hydra.run.dir=<out_dir>`: its wall time, its command line,
    and the job's metrics.json as `metrics` — or, when it failed or timed out, the end of its output
    as `error`. `launcher`: e.g. ["-m", "torch.distributed.run", "--nproc_per_node=2"]."""
    command = [sys.executable, *launcher, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={out_dir}"]
    start = time.perf_counter()
    point: Dict[str, Any] = {"command": " ".join(command[1:])}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        output = err.stderr or err.stdout or b""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        point["wall_s"] = time.perf_counter() - start
        point["error"] = f"{output[-1500:]}\ntimed out after {timeout:g} s"
        point.update(_notes(out_dir))
        return point
    point["wall_s"] = time.perf_counter() - start
    point.update(_notes(out_dir))
    metrics_file = out_dir / "metrics.json"
    if proc.returncode == 0 and metrics_file.is_file():
        point["metrics"] = json.loads(metrics_file.read_text())
    else:
        point["error"] = (proc.stderr or proc.stdout)[-2000:]
    return point


def _notes(out_dir: Path) -> Dict[str, Any]:
    notes = job_notes(out_dir)
    return {"log": notes} if notes else {}


NOTE_LOGGERS = (
    "[firstsight.inference.generation]",
    "[firstsight.inference.prefill]",
    "[firstsight.inference.vision_graph]",
)


def job_notes(out_dir: Path, limit: int = 30) -> List[str]:
    """What a job's log (Hydra's run.log in its output directory) says beside its figures: its
    warnings and errors, and how it decoded (the generation modules' lines: captures, compiles,
    fallbacks), up to `limit` lines of at most 400 characters; [] without a log. A figure measured
    on a fallback path (say, decoding eagerly after a failed capture) is explained there."""
    log = out_dir / "run.log"
    if not log.is_file():
        return []
    keep = [
        line.rstrip()[:400]
        for line in log.read_text(errors="replace").splitlines()
        if "][WARNING]" in line or "][ERROR]" in line or any(name in line for name in NOTE_LOGGERS)
    ]
    return keep[:limit]


def add_distill_flags(parser: Any) -> None:
    """The flags distill_overrides reads (but --steps and --warmup-steps): which pair, precision,
    hardware, batch and frame size."""
    parser.add_argument("--model", default="qwen2vl_7b_2b")
    parser.add_argument("--weights", default="random", help="random (full size, no download) or '' for the model's own")
    parser.add_argument("--hardware", default="gpu")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=448)


def distill_overrides(args: Any, batch_size: int, *extra: str) -> List[str]:
    """The distill task from the scripts' shared flags (--model, --weights, --hardware, --precision,
    --image-size, --steps, --warmup-steps, trailing overrides), no evaluation, no saving, no MLflow."""
    weights = [f"model.{side}.weights={args.weights}" for side in ("teacher", "student")] if args.weights else []
    return [
        "task=distill",
        f"model={args.model}",
        *weights,
        f"hardware={args.hardware}",
        f"precision={args.precision}",
        f"hardware.batch_size={batch_size}",
        f"data.image_size={args.image_size}",
        f"train.max_steps={args.steps}",
        f"train.throughput_warmup_steps={args.warmup_steps}",
        "train.eval_at_end=false",
        "train.save_checkpoint=false",
        "tracking.enabled=false",
        *extra,
        *args.overrides,
    ]


def train_history(out_dir: Path) -> List[Dict[str, float]]:
    """The per-step figures a distill job wrote (train_history.json), or [] when it wrote none."""
    path = out_dir / "train_history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def profile_overrides(args: Any) -> List[str]:
    """The profile task's measurement settings from the scripts' shared flags (--image-size,
    --new-tokens, --warmup-queries, --latency-queries, --batch-size, --batches), no MLflow, no bar."""
    return [
        f"data.image_size={args.image_size}",
        f"task.new_tokens={args.new_tokens}",
        f"task.warmup_queries={args.warmup_queries}",
        f"task.latency_queries={args.latency_queries}",
        f"task.throughput_batch_size={args.batch_size}",
        f"task.throughput_batches={args.batches}",
        "tracking.enabled=false",
        "train.progress_bar=false",
    ]


def profile_settings(args: Any) -> Dict[str, Any]:
    """Those settings, as each point of a results file records them."""
    return {
        "warmup_queries": args.warmup_queries,
        "latency_queries": args.latency_queries,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "new_tokens": args.new_tokens,
        "image_size": args.image_size,
    }


def last_line(error: str) -> str:
    """The line of a failed point's output that says what went wrong (its last one)."""
    return error.strip().splitlines()[-1] if error.strip() else "?"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def cuda_device() -> str:
    """The GPU's name, or "cpu" where there is none (the results file is named after it)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def results_path(results_dir: str, name: str, device: str) -> Path:
    slug = device.replace(" ", "_").replace("/", "_")
    return Path(results_dir) / f"{name}_{slug}.json"


def run_meta(device: str, **settings: Any) -> Dict[str, Any]:
    """The results file's header: device, date, package versions, Python, this call's command line,
    and the settings the points share."""
    from firstsight.tracking.tracker import package_versions

    return {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        **settings,
        "host_cpus": os.cpu_count(),
    }


def earlier_points(json_path: Path, meta: Dict[str, Any], append: bool) -> List[Dict[str, Any]]:
    """With `append`, the points an earlier call wrote to `json_path` (same device kind); its date
    (and command) are added to `meta`'s earlier_call_dates (earlier_commands)."""
    if not (append and json_path.is_file()):
        return []
    previous = json.loads(json_path.read_text())
    meta["earlier_call_dates"] = sorted(set(previous.get("earlier_call_dates", []) + [previous["date"]]))
    commands = previous.get("earlier_commands", []) + ([previous["command"]] if "command" in previous else [])
    if commands:
        meta["earlier_commands"] = commands
    return previous["points"]


def merged(
    earlier: List[Dict[str, Any]], points: List[Dict[str, Any]], key: Callable[[Dict[str, Any]], Hashable]
) -> List[Dict[str, Any]]:
    """The earlier call's points that this call did not measure again, then this call's."""
    fresh = {key(p) for p in points}
    return [p for p in earlier if key(p) not in fresh] + points


def write_pair(json_path: Path, data: Dict[str, Any], table: str) -> None:
    """The results as JSON and their table as Markdown beside it (each written atomically)."""
    from firstsight.core.files import write_atomically

    write_atomically(json_path, json.dumps(data, indent=2))
    write_atomically(json_path.with_suffix(".md"), table)


def read_results(json_path: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """An existing results file's header and its points (for --render)."""
    data = json.loads(Path(json_path).read_text())
    return data, data.pop("points")
