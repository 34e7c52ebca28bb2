"""Data-parallel distillation: N GPUs against one, at the same global batch.

Runs the distill task twice on one machine, in one call so the figures compare:
  1 GPU:  hardware.batch_size=B, hardware.grad_accum_steps=N   (global batch N*B, one GPU)
  N GPUs: torchrun --nproc_per_node N ..., hardware.batch_size=B, hardware.num_gpus=N
Both see the same samples in the same order (firstsight.data.batching), so their loss curves must
agree within the precision's noise; the scaling efficiency is the N-GPU job's tokens/s over N
times the 1-GPU job's (each GPU does the same work per micro-batch: B samples).

    python benchmarks/data_parallel.py --gpus 2 --steps 30      # real-size pair, random weights

Writes benchmarks/results/data_parallel_<device>.json and .md (device, versions, date, command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from _common import RESULTS, cuda_device, distill_overrides, results_path, run_job, run_meta, train_history, write_pair  # noqa: E402


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


def render(results: Dict[str, Any]) -> str:
    c, meta = results["comparison"], results["meta"]
    fmt = lambda v, f="{:.4g}": "n/a" if v is None else f.format(v)  # noqa: E731
    gpus = meta["gpus"]
    rows = [
        (
            "global batch (samples/step)",
            f"{meta['batch_size'] * gpus} ({meta['batch_size']} x {gpus} accumulation)",
            f"{meta['batch_size'] * gpus} ({meta['batch_size']} x {gpus} GPUs)",
        ),
        (
            "throughput (tokens/s)",
            fmt(c["throughput_tokens_per_s_1gpu"], "{:.0f}"),
            fmt(c["throughput_tokens_per_s_ngpu"], "{:.0f}"),
        ),
        (
            "peak VRAM per GPU (GB)",
            fmt(c["peak_vram_gb_1gpu"], "{:.2f}"),
            fmt(c["peak_vram_gb_per_gpu_ngpu"], "{:.2f}"),
        ),
        ("final loss", fmt(c["final_loss_1gpu"], "{:.6f}"), fmt(c["final_loss_ngpu"], "{:.6f}")),
    ]
    lines = [
        f"# Data-parallel distillation — {meta['device']}",
        "",
        f"{meta['date']}; {meta['command']}; model={meta['model']} weights={meta['weights']} precision={meta['precision']}, "
        f"{meta['steps']} steps ({meta['warmup_steps']} warm-up steps excluded from throughput), {meta['image_size']}px frames; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        f"| | 1 GPU | {gpus} GPUs ({meta.get('data_parallel', 'ddp').upper()}) |",
        "| --- | --- | --- |",
        *[f"| {name} | {one} | {many} |" for name, one, many in rows],
        "",
        f"Speed-up {fmt(c['speedup'], '{:.2f}')}x, scaling efficiency {fmt(c['scaling_efficiency'], '{:.1%}')} "
        f"(N-GPU tokens/s over {gpus} x 1-GPU tokens/s). Loss curves over {c['steps_compared']} steps: largest relative "
        f"difference {fmt(c['max_relative_loss_difference'], '{:.2e}')}.",
    ]
    for name in ("single", "parallel"):
        if "error" in results[name]:
            lines += ["", f"{name} failed: `{results[name]['error'].strip().splitlines()[-1]}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="qwen2vl_7b_2b")
    parser.add_argument("--weights", default="random", help="random (full size, no download) or '' for the model's own")
    parser.add_argument("--hardware", default="gpu")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument(
        "--data-parallel", default="ddp", choices=["ddp", "fsdp"], help="hardware.data_parallel of the N-GPU job"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="samples per GPU per micro-batch")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--workdir", default="/tmp/firstsight-data-parallel")
    parser.add_argument("overrides", nargs="*", help="more run.py overrides for both jobs")
    args = parser.parse_args()

    device = cuda_device()
    workdir = Path(args.workdir)
    base = distill_overrides(args, args.batch_size, "train.progress_bar=false")
    single = run_job([*base, f"hardware.grad_accum_steps={args.gpus}"], workdir / "single", args.timeout)
    single["history"] = train_history(workdir / "single")
    gpus = (
        [] if args.hardware == "cpu" else [f"hardware.num_gpus={args.gpus}"]
    )  # CPU: processes, no GPUs (a smoke test)
    parallel = run_job(
        [*base, *gpus, f"hardware.data_parallel={args.data_parallel}"],
        workdir / "parallel",
        args.timeout,
        launcher=["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"],
    )
    parallel["history"] = train_history(workdir / "parallel")
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
        "single": single,
        "parallel": parallel,
        "comparison": compare(single, parallel, args.gpus),
    }
    table = render(results)
    name = "data_parallel" if args.data_parallel == "ddp" else f"data_parallel_{args.data_parallel}"
    write_pair(results_path(args.results_dir, name, device), results, table)
    print(table)
    sys.exit(0 if "error" not in single and "error" not in parallel else 1)


if __name__ == "__main__":
    main()
