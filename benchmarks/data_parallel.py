"""Data-parallel distillation: N GPUs against one, at the same global batch, and the levers of
DDP / FSDP2 (hardware.ddp_* / fsdp_*) against plain DDP / FSDP2 in the same call.

Runs the distill task on one machine, in one call so the figures compare:
  1 GPU:     hardware.batch_size=B, hardware.grad_accum_steps=N   (global batch N*B, one GPU)
  N GPUs:    torchrun --nproc_per_node N ..., hardware.batch_size=B, hardware.num_gpus=N
  variants:  the N-GPU job again with each --variant's overrides (--sweep: the preset ones)
All see the same samples in the same order (firstsight.data.batching), so their loss curves must
agree within the precision's noise; the scaling efficiency is an N-GPU job's tokens/s over N
times the 1-GPU job's (each GPU does the same work per micro-batch: B samples). One table row
per setting.

--profile: after each N-GPU row's timed job, a short torchrun job of the same setting under
torch.profiler on every rank (--skip-steps unprofiled steps, then --profile-steps profiled), so the
profiler's own cost stays out of the table's throughput: per step, the time in
communication (NCCL kernels on a GPU; gloo / c10d operators on the CPU) against the step, and on a
GPU the compute kernels' time, how much communication they hide and how much is left exposed.

    python benchmarks/data_parallel.py --gpus 2 --steps 30                       # DDP vs 1 GPU
    python benchmarks/data_parallel.py --gpus 2 --steps 30 --sweep --profile      # + DDP's levers, profiled
    python benchmarks/data_parallel.py --gpus 2 --data-parallel fsdp --sweep      # FSDP2's levers
    python benchmarks/data_parallel.py --gpus 2 --variant "bf16 comm: hardware.ddp_comm_dtype=bfloat16"

Writes benchmarks/results/data_parallel[_fsdp]_<device>.json and .md (device, versions, date, command).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from _common import RESULTS, cuda_device, distill_overrides, results_path, run_job, run_meta, train_history, write_pair  # noqa: E402

# --sweep: each lever alone, then all together, against the plain strategy (label, overrides)
SWEEPS: Dict[str, List[Tuple[str, List[str]]]] = {
    "ddp": [
        ("bf16 gradient all-reduce", ["hardware.ddp_comm_dtype=bfloat16"]),
        ("100 MB buckets", ["hardware.ddp_bucket_cap_mb=100"]),
        (
            "bucket views + static graph",
            ["hardware.ddp_gradient_as_bucket_view=true", "hardware.ddp_static_graph=true"],
        ),
        (
            "all of the above",
            [
                "hardware.ddp_comm_dtype=bfloat16",
                "hardware.ddp_bucket_cap_mb=100",
                "hardware.ddp_gradient_as_bucket_view=true",
                "hardware.ddp_static_graph=true",
            ],
        ),
    ],
    "fsdp": [
        ("bf16 params, fp32 reduce", ["hardware.fsdp_param_dtype=bfloat16"]),
        (
            "+ kept gathered after forward",
            ["hardware.fsdp_param_dtype=bfloat16", "hardware.fsdp_reshard_after_forward=false"],
        ),
        ("+ prefetch of the next block", ["hardware.fsdp_param_dtype=bfloat16", "hardware.fsdp_prefetch=1"]),
        (
            "all of the above",
            [
                "hardware.fsdp_param_dtype=bfloat16",
                "hardware.fsdp_reshard_after_forward=false",
                "hardware.fsdp_prefetch=1",
            ],
        ),
    ],
}
# communication in a profile: NCCL's kernels, gloo's and c10d's operators, torch's comms annotation
COMMUNICATION = re.compile(r"nccl|gloo|c10d::|record_param_comms|all_reduce|allreduce|all_gather|reduce_scatter", re.I)


def compare(single: Dict[str, Any], parallel: Dict[str, Any], gpus: int) -> Dict[str, Any]:
    """Loss agreement step by step, and the scaling efficiency."""
    a = {h["step"]: h["train/loss"] for h in single.get("history", [])}
    b = {h["step"]: h["train/loss"] for h in parallel.get("history", [])}
    steps = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps]
    m1, mn = single.get("metrics", {}), parallel.get("metrics", {})
    t1, tn = m1.get("perf/throughput_tokens_per_s"), mn.get("perf/throughput_tokens_per_s")
    return {
        "steps_compared": len(steps),
        "max_relative_loss_difference": max(diffs) if diffs else None,
        "final_loss_1gpu": a.get(steps[-1]) if steps else None,
        "final_loss_ngpu": b.get(steps[-1]) if steps else None,
        "throughput_tokens_per_s_1gpu": t1,
        "throughput_tokens_per_s_ngpu": tn,
        "speedup": tn / t1 if t1 and tn else None,
        "scaling_efficiency": tn / (gpus * t1) if t1 and tn else None,
        "peak_vram_gb_1gpu": m1.get("perf/peak_vram_gb"),
        "peak_vram_gb_per_gpu_ngpu": mn.get("perf/peak_vram_gb"),
    }


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """`LABEL: OVERRIDE OVERRIDE ...` -> (label, overrides)."""
    label, sep, overrides = text.partition(":")
    if not sep or not overrides.split():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write it as 'LABEL: OVERRIDE [OVERRIDE ...]'")
    return label.strip(), overrides.split()


# ------------------------------------------------------------------ profiling (one torchrun job per row)


def union_seconds(intervals: Sequence[Tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals in µs, in seconds."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


def overlap_seconds(a: Sequence[Tuple[float, float]], b: Sequence[Tuple[float, float]]) -> float:
    """How long both sets of intervals cover at once: |A| + |B| - |A ∪ B|."""
    return union_seconds(a) + union_seconds(b) - union_seconds(list(a) + list(b))


def time_split(events: Any, steps: int, on_gpu: bool) -> Dict[str, Any]:
    """Per profiled step: the step, the communication and (GPU) the compute kernels, from the
    profile's timeline (intervals, so work that runs at once is counted once)."""
    from torch.autograd import DeviceType

    def spans(keep: Any) -> List[Tuple[float, float]]:
        return [(e.time_range.start, e.time_range.end) for e in events if keep(e)]

    step = spans(lambda e: e.name.startswith("ProfilerStep"))  # "ProfilerStep*" or "ProfilerStep#N" by version
    if on_gpu:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        comm = [(e.time_range.start, e.time_range.end) for e in kernels if COMMUNICATION.search(e.name)]
        compute = [(e.time_range.start, e.time_range.end) for e in kernels if not COMMUNICATION.search(e.name)]
    else:  # gloo: the collectives run on the host (its own threads), compute is the rest of the step
        comm = spans(lambda e: e.device_type == DeviceType.CPU and bool(COMMUNICATION.search(e.name)))
        compute = []
    per = max(1, steps)
    split = {
        "step_s": union_seconds(step) / per,
        "communication_s": union_seconds(comm) / per,
        "compute_kernels_s": union_seconds(compute) / per if on_gpu else None,
        "communication_hidden_s": overlap_seconds(comm, compute) / per if on_gpu else None,
    }
    split["communication_exposed_s"] = (
        split["communication_s"] - split["communication_hidden_s"] if on_gpu else split["communication_s"]
    )
    split["communication_share"] = split["communication_exposed_s"] / split["step_s"] if split["step_s"] else None
    return split


def profile_rank(args: argparse.Namespace) -> int:
    """Inside torchrun: this rank runs the job in-process under torch.profiler (the suite's step
    timer steps it) and writes its time split, an operator table and (--trace) a Chrome trace."""
    from generation import compose  # benchmarks/generation.py
    from torch.profiler import ProfilerActivity, profile, schedule

    import firstsight.training.loop as train
    from firstsight.suite.dispatch import run_task

    rank, out = int(os.environ.get("RANK", "0")), Path(args.profile_rank)
    (out / "job").mkdir(parents=True, exist_ok=True)
    os.chdir(out / "job")  # composed outside Hydra's run: the job writes into the working directory
    on_gpu = args.hardware != "cpu"
    profiler = profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []),
        schedule=schedule(wait=args.skip_steps - 1, warmup=1, active=args.profile_steps, repeat=1),
    )

    class ProfiledStepTimer(train.StepTimer):
        def __exit__(self, *exc: Any) -> None:
            super().__exit__(*exc)
            profiler.step()

    original, train.StepTimer = train.StepTimer, ProfiledStepTimer
    try:
        with profiler:
            run_task(compose(args.overrides))
    finally:
        train.StepTimer = original
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    summary = {
        "rank": rank,
        **time_split(profiler.events(), args.profile_steps, on_gpu),
        "top": profiler.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60),
    }
    if args.trace:
        profiler.export_chrome_trace(str(out / f"trace_rank{rank}.json"))
    (out / f"rank{rank}.json").write_text(json.dumps(summary, indent=1))
    return 0


def profiled(overrides: List[str], args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """One short N-GPU job under the profiler (every rank): rank 0's time split, or the error."""
    steps = args.skip_steps + args.profile_steps + 1
    flags = [
        "--profile-rank",
        str(out),
        "--skip-steps",
        str(args.skip_steps),
        "--profile-steps",
        str(args.profile_steps),
    ]
    flags += ["--hardware", args.hardware, *(["--trace"] if args.trace else [])]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.gpus}",
        str(Path(__file__).resolve()),
        *flags,
        "--",
        *overrides,
        f"train.max_steps={steps}",
        f"train.throughput_warmup_steps={args.skip_steps}",
    ]
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    ranks = sorted(out.glob("rank*.json"))
    if done.returncode != 0 or not ranks:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    result = json.loads((out / "rank0.json").read_text())
    result["ranks"] = [json.loads(p.read_text()) for p in ranks]
    result["trace"] = str(out / "trace_rank0.json") if args.trace else None
    return result


# ------------------------------------------------------------------ the table


def fmt(value: Optional[float], spec: str = "{:.4g}") -> str:
    return "n/a" if value is None else spec.format(value)


def row(name: str, run: Dict[str, Any], c: Dict[str, Any], one: bool, baseline: Optional[float]) -> str:
    """One setting: throughput, speed-ups, VRAM, loss agreement, and its profile's split if any."""
    tput = c["throughput_tokens_per_s_1gpu" if one else "throughput_tokens_per_s_ngpu"]
    p = run.get("profile") or {}
    cells = [
        name,
        fmt(tput, "{:.0f}"),
        "1" if one else fmt(c["speedup"], "{:.2f}x"),
        "" if one else fmt(c["scaling_efficiency"], "{:.1%}"),
        "" if one or baseline is None or tput is None else f"{tput / baseline:.2f}x",
        fmt(c["peak_vram_gb_1gpu" if one else "peak_vram_gb_per_gpu_ngpu"], "{:.2f}"),
        fmt(c["final_loss_1gpu" if one else "final_loss_ngpu"], "{:.6f}"),
        "" if one else fmt(c["max_relative_loss_difference"], "{:.2e}"),
        fmt(p.get("step_s"), "{:.3f}"),
        fmt(p.get("communication_s"), "{:.3f}"),
        fmt(p.get("communication_exposed_s"), "{:.3f}"),
        fmt(p.get("communication_share"), "{:.0%}"),
    ]
    return "| " + " | ".join(cells) + " |"


def render(results: Dict[str, Any]) -> str:
    meta, gpus = results["meta"], results["meta"]["gpus"]
    strategy = meta.get("data_parallel", "ddp").upper()
    rows = results["rows"]
    baseline = rows[1]["comparison"]["throughput_tokens_per_s_ngpu"] if len(rows) > 1 else None
    lines = [
        f"# Data-parallel distillation — {meta['device']}",
        "",
        f"{meta['date']}; {meta['command']}; model={meta['model']} weights={meta['weights']} precision={meta['precision']}, "
        f"{meta['steps']} steps ({meta['warmup_steps']} warm-up steps excluded from throughput), {meta['image_size']}px frames, "
        f"global batch {meta['batch_size'] * gpus} ({meta['batch_size']} per GPU x {gpus}; 1 GPU: {gpus} accumulation steps); "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        f"| setting | tokens/s | speed-up vs 1 GPU | scaling efficiency | vs plain {strategy} | peak VRAM per GPU (GB) "
        "| final loss | loss vs 1 GPU, largest rel. difference | profiled step (s) | communication (s/step) "
        "| exposed communication (s/step) | exposed share of the step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rows):
        lines.append(row(r["name"], r["run"], r["comparison"], i == 0, baseline))
    lines += [
        "",
        f"Rows after the first: {gpus} processes (`torchrun --nproc_per_node {gpus}`), each row's overrides on top "
        f"of the plain {strategy} row: "
        + "; ".join(f"{r['name']}: `{' '.join(r['overrides']) or '-'}`" for r in rows[1:]),
    ]
    if any(r["run"].get("profile") for r in rows):
        lines += [
            "",
            "Profile columns: rank 0 of a separate short job per row, the mean over its profiled steps; "
            "communication = NCCL kernels (GPU) or gloo/c10d operators (CPU); exposed = not under a compute kernel "
            "(on the CPU all of it counts).",
        ]
    for r in rows:
        for key in ("error",):
            if key in r["run"]:
                lines += ["", f"{r['name']} failed: `{r['run'][key].strip().splitlines()[-1]}`"]
        p = r["run"].get("profile") or {}
        if "error" in p:
            lines += ["", f"{r['name']} profile failed: `{p['error'].strip().splitlines()[-1]}`"]
        elif p.get("top"):
            lines += ["", f"{r['name']}, rank 0, the operators with the most time:", "", "```", p["top"].strip(), "```"]
    return "\n".join(lines) + "\n"


def parser_of() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the N-GPU jobs (GPUs, or CPU processes)")
    parser.add_argument("--model", default="qwen2vl_7b_2b")
    parser.add_argument("--weights", default="random", help="random (full size, no download) or '' for the model's own")
    parser.add_argument("--hardware", default="gpu")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument(
        "--data-parallel", default="ddp", choices=["ddp", "fsdp"], help="hardware.data_parallel of the N-GPU jobs"
    )
    parser.add_argument("--sweep", action="store_true", help="add the preset variants of --data-parallel's levers")
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="'LABEL: OVERRIDE ...'",
        help="one more N-GPU row with these overrides (repeatable), e.g. 'bf16 comm: hardware.ddp_comm_dtype=bfloat16'",
    )
    parser.add_argument("--profile", action="store_true", help="profile each N-GPU row (a short job of its own)")
    parser.add_argument("--skip-steps", type=int, default=5, help="--profile: unprofiled steps first (at least 2)")
    parser.add_argument("--profile-steps", type=int, default=3, help="--profile: profiled steps")
    parser.add_argument("--trace", action="store_true", help="--profile: also a Chrome trace per rank")
    parser.add_argument("--profile-rank", help=argparse.SUPPRESS)  # set by --profile for the torchrun workers
    parser.add_argument("--batch-size", type=int, default=2, help="samples per GPU per micro-batch")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--workdir", default="/tmp/firstsight-data-parallel")
    parser.add_argument("overrides", nargs="*", help="more run.py overrides for every job")
    return parser


def main() -> None:
    parser = parser_of()
    args = parser.parse_args()
    if args.profile_rank:
        sys.exit(profile_rank(args))
    if args.profile and (args.skip_steps < 2 or args.profile_steps < 1):
        parser.error(
            f"--skip-steps must be >= 2 and --profile-steps >= 1 (got {args.skip_steps}, {args.profile_steps})"
        )
    device = cuda_device()
    workdir = Path(args.workdir)
    base = distill_overrides(args, args.batch_size, "train.progress_bar=false")
    single = run_job([*base, f"hardware.grad_accum_steps={args.gpus}"], workdir / "single", args.timeout)
    single["history"] = train_history(workdir / "single")
    gpus = (
        [] if args.hardware == "cpu" else [f"hardware.num_gpus={args.gpus}"]
    )  # CPU: processes, no GPUs (a smoke test)
    settings = [
        ("plain " + args.data_parallel.upper(), []),
        *(SWEEPS[args.data_parallel] if args.sweep else []),
        *args.variant,
    ]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    rows = [{"name": "1 GPU", "overrides": [], "run": single, "comparison": compare(single, single, 1)}]
    for i, (name, extra) in enumerate(settings):
        overrides = [*base, *gpus, f"hardware.data_parallel={args.data_parallel}", *extra]
        run = run_job(overrides, workdir / f"parallel{i}", args.timeout, launcher=launcher)
        run["history"] = train_history(workdir / f"parallel{i}")
        if args.profile:
            run["profile"] = profiled(overrides, args, workdir / f"profile{i}")
        rows.append({"name": name, "overrides": extra, "run": run, "comparison": compare(single, run, args.gpus)})
    results = {
        "meta": run_meta(
            device,
            gpus=args.gpus,
            model=args.model,
            weights=args.weights,
            precision=args.precision,
            batch_size=args.batch_size,
            image_size=args.image_size,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            data_parallel=args.data_parallel,
        ),
        "rows": rows,
    }
    table = render(results)
    name = "data_parallel" if args.data_parallel == "ddp" else f"data_parallel_{args.data_parallel}"
    write_pair(results_path(args.results_dir, name, device), results, table)
    print(table)
    sys.exit(0 if all("error" not in r["run"] and "error" not in (r["run"].get("profile") or {}) for r in rows) else 1)


if __name__ == "__main__":
    main()
