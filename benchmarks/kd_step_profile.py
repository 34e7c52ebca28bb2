"""Where a distillation step's time goes: torch.profiler over a few steps of one `task=distill`
job, run in this process after its compiles and warm-up steps.

The job is one point of benchmarks/kd_step.py (by name; default the lean step, experiment=lean_kd's
settings) on the real-size teacher/student pair with random weights. The first `--skip-steps`
steps stay out of the profile (compiles, new batch lengths, the allocator settling; the last of them
is the profiler's warm-up, traced and discarded), the next `--profile-steps` are profiled (CPU and
CUDA activity), then two more run unprofiled. Reported:

- each step's wall time (the suite's StepTimer: synchronised), the profiled ones and the two after;
- the GPU's kernel time per profiled step and its share of the step's wall time: how long the GPU
  works against how long the step takes (the rest it waits for the host);
- the operators and kernels with the most GPU time, and the operators with the most host time.

The profiler adds host time of its own, so the profiled steps' wall time is reported beside the
unprofiled ones'.

    python benchmarks/kd_step_profile.py                          # GPU: the lean step at batch 4 (~2 min)
    python benchmarks/kd_step_profile.py --point naive            # the baseline's step
    python benchmarks/kd_step_profile.py --trace                  # also a Chrome trace (tens of MB)
    python benchmarks/kd_step_profile.py --smoke                  # CPU, the tiny pair: the plumbing

Prints a table and writes JSON + Markdown (device, versions, date, command, every figure) to
benchmarks/results/kd_step_profile_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from _common import RESULTS, add_distill_flags, cuda_device, distill_overrides, results_path, run_meta, write_pair
from generation import compose  # benchmarks/generation.py
from kd_step import POINTS  # benchmarks/kd_step.py

LEAN = "optimized + teacher cache + compile, memory budget 0.2"


def kernel_seconds(events: Any) -> float:
    """The GPU kernels' time in `events` (key_averages), in seconds: the rows of CUDA device type only,
    and no user annotation, as torch's own table totals them (an operator's row repeats the time of
    the kernels it launched)."""
    from torch.autograd import DeviceType

    return (
        sum(
            float(getattr(e, "self_device_time_total", 0.0) or 0.0)
            for e in events
            if getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
        / 1e6
    )


def profile_job(overrides: List[str], args: argparse.Namespace, on_gpu: bool) -> Dict[str, Any]:
    """Run the job in this process with the suite's step timer driving torch.profiler; its figures."""
    from torch.profiler import ProfilerActivity, profile, schedule

    import firstsight.training.loop as train
    from firstsight.suite.dispatch import run_task

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    profiler = profile(
        activities=activities,
        schedule=schedule(wait=args.skip_steps - 1, warmup=1, active=args.profile_steps, repeat=1),
    )
    seconds: List[float] = []

    class ProfiledStepTimer(train.StepTimer):
        """The suite's step timer; each step's end is also the profiler's step."""

        def __exit__(self, *exc: Any) -> None:
            super().__exit__(*exc)
            seconds.append(self.seconds)
            profiler.step()

    original = train.StepTimer
    train.StepTimer = ProfiledStepTimer
    try:
        with profiler:
            run_task(compose(overrides))
    finally:
        train.StepTimer = original
    events = profiler.key_averages()
    first, last = args.skip_steps, args.skip_steps + args.profile_steps
    # the steps after the window: unprofiled and past the warm-up (the step before the window is the
    # profiler's own warm-up, recorded and discarded, so not a fair comparison)
    profiled, rest = seconds[first:last], seconds[last:]
    kernel_s = kernel_seconds(events) / max(1, len(profiled))
    step_s = statistics.median(profiled) if profiled else float("nan")
    trace = None
    if args.trace:
        trace = str(Path(args.results_dir) / "kd_step_profile_trace.json")
        profiler.export_chrome_trace(trace)
    sort_gpu = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    return {
        "step_seconds": seconds,
        "profiled_steps": list(range(first + 1, last + 1)),
        "profiled_step_median_s": step_s,
        "unprofiled_step_median_s": statistics.median(rest) if rest else None,
        "gpu_kernel_s_per_step": kernel_s if on_gpu else None,
        "gpu_busy_fraction": kernel_s / step_s if on_gpu and step_s > 0 else None,
        "top_gpu": events.table(sort_by=sort_gpu, row_limit=args.rows, max_name_column_width=70),
        "top_host": events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70),
        "trace": trace,
    }


def markdown(data: Dict[str, Any]) -> str:
    r = data["result"]

    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"# Where a distillation step's time goes — {data['device']}",
        "",
        f"{data['date']}; {data['command']}; point **{data['point']}**, batch {data['batch_size']}, "
        f"{data['image_size']}px frames; steps {r['profiled_steps'][0]}-{r['profiled_steps'][-1]} profiled "
        f"after {data['skip_steps']} unprofiled. Versions: "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        "| step wall, profiled (median) | step wall, unprofiled (median) | GPU kernel time per step (s) | GPU busy |",
        "| --- | --- | --- | --- |",
        f"| {fmt(r['profiled_step_median_s'], '.4f')} s | {fmt(r['unprofiled_step_median_s'], '.4f')} s | "
        f"{fmt(r['gpu_kernel_s_per_step'], '.4f')} | {fmt(r['gpu_busy_fraction'], '.0%')} |",
        "",
        "Every step's wall time (s): " + ", ".join(f"{s:.3f}" for s in r["step_seconds"]),
        "",
    ]
    if r["gpu_kernel_s_per_step"] is not None:
        lines += ["Most GPU time:", "", "```", r["top_gpu"].strip(), "```", ""]
    lines += ["Most host time:", "", "```", r["top_host"].strip(), "```"]
    if r.get("trace"):
        lines += ["", f"Chrome trace: {r['trace']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", default=LEAN, choices=list(POINTS), help="a point of benchmarks/kd_step.py")
    add_distill_flags(parser)
    parser.add_argument("--skip-steps", type=int, default=10, help="unprofiled steps first (at least 2)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="rows of each operator table")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace beside the results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny pair, 112px, 4+2 steps (temp results)")
    parser.add_argument("overrides", nargs="*", help="more run.py overrides")
    args = parser.parse_args()
    if args.skip_steps < 2 or args.profile_steps < 1:
        parser.error(
            f"--skip-steps must be at least 2 and --profile-steps at least 1 "
            f"(got {args.skip_steps} and {args.profile_steps})"
        )
    if args.smoke:
        device = "cpu"
        args.model, args.weights, args.hardware, args.precision = "tiny", "", "cpu", "fp32"
        args.image_size, args.skip_steps, args.profile_steps, args.rows = 112, 4, 2, 10
        args.results_dir = tempfile.mkdtemp(prefix="kd-step-profile-smoke-")
    else:
        device = cuda_device()
        if device == "cpu":
            print(
                "no CUDA GPU visible: these are GPU measurements (--smoke: the plumbing on this CPU)", file=sys.stderr
            )
            return 2
    args.results_dir = os.path.abspath(args.results_dir)  # the job runs in a working directory of its own
    os.makedirs(
        args.results_dir, exist_ok=True
    )  # before the job: the trace is written there (torch says nothing when it can't)
    overrides_of_point, multiplier, note = POINTS[args.point]
    batch = args.batch_size * multiplier
    args.steps = args.skip_steps + args.profile_steps + 2  # two unprofiled steps after the window too
    args.warmup_steps = args.skip_steps
    size = [f"data.train_size={args.steps * batch}"] if args.weights == "random" else []  # as kd_step.py
    overrides = [
        *distill_overrides(args, batch, f"seed={args.seed}", "train.progress_bar=false", *size),
        *overrides_of_point,
    ]
    data = run_meta(
        device,
        point=args.point,
        point_note=note,
        overrides=overrides,
        batch_size=batch,
        image_size=args.image_size,
        skip_steps=args.skip_steps,
    )
    workdir = Path(tempfile.mkdtemp(prefix="kd-step-profile-"))
    here = os.getcwd()
    os.chdir(workdir)  # the job writes its outputs into the working directory (composed outside Hydra's run)
    try:
        data["result"] = profile_job(overrides, args, device != "cpu")
    finally:
        os.chdir(here)
    table = markdown(data)
    path = results_path(args.results_dir, "kd_step_profile", device)
    write_pair(path, data, table)
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
