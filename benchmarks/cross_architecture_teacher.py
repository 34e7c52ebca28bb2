"""The KD step with a teacher of another architecture, against the same-architecture teacher.

One `python run.py task=distill` process per teacher, the same student (Qwen2-VL-2B-Instruct), batch,
frames, precision and steps, full size with random weights (no download): `model=qwen2vl_7b_2b`
(Qwen2-VL-7B teaches through the student's processor) and `model=llava_ov_7b_2b` (LLaVA-OneVision-7B,
EgoGPT's base, teaches through its own processor: 384-pixel SigLIP tiles at any resolution, so
many more visual tokens per frame; aligned with the student on the answer tokens). Per teacher:
the step time, the student's tokens/s and samples/s past the warm-up steps, and the peak GPU memory.

    python benchmarks/cross_architecture_teacher.py                     # both teachers, on the GPU
    python benchmarks/cross_architecture_teacher.py --steps 12 --batch-size 8 --image-size 448

Prints the table and writes benchmarks/results/cross_architecture_teacher_<device>.{json,md}
(device, versions, date, command).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from _common import (
    RESULTS,
    add_distill_flags,
    cuda_device,
    distill_overrides,
    last_line,
    ratio,
    results_path,
    run_job,
    run_meta,
    write_pair,
)

TEACHERS = {"qwen2vl_7b_2b": "Qwen2-VL-7B-Instruct (same architecture)", "llava_ov_7b_2b": "LLaVA-OneVision-7B"}
FIGURES = ("perf/step_time_s", "perf/throughput_tokens_per_s", "perf/throughput_samples_per_s")


def table(meta: Dict[str, Any], points: List[Dict[str, Any]]) -> str:
    lines = [
        f"# KD step, teacher of another architecture — {meta['device']}",
        "",
        f"{meta['date']}; student Qwen2-VL-2B-Instruct, random weights, batch {meta['batch_size']}, "
        f"{meta['image_size']} px frames, {meta['precision']}, {meta['steps']} steps ({meta['warmup_steps']} warm-up); "
        f"`{meta['command']}`",
        "",
        "| teacher | step (s) | student tokens/s | samples/s | peak GPU (GB) | step vs Qwen2-VL-7B |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    base = next((p for p in points if p["model"] == "qwen2vl_7b_2b" and "metrics" in p), None)
    for p in points:
        if "metrics" not in p:
            lines.append(f"| {TEACHERS[p['model']]} | failed: {last_line(p.get('error', ''))} | | | | |")
            continue
        m = p["metrics"]
        step, tokens, samples = (m.get(k) for k in FIGURES)
        vs = ratio(step, base["metrics"].get("perf/step_time_s")) if base else None
        lines.append(
            f"| {TEACHERS[p['model']]} | {step:.3f} | {tokens:.0f} | {samples:.2f} | "
            f"{m.get('perf/peak_vram_gb', float('nan')):.1f} | {'' if vs is None else f'{vs:.2f}x'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_distill_flags(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*", help="further run.py overrides for both jobs")
    args = parser.parse_args()
    device = cuda_device()
    meta = run_meta(
        device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=args.precision,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
    )
    points = []
    with tempfile.TemporaryDirectory(prefix="firstsight-xarch-") as tmp:
        for model in TEACHERS:
            args.model = model
            point = run_job(distill_overrides(args, args.batch_size), Path(tmp) / model, args.timeout)
            points.append({"model": model, **point})
    text = table(meta, points)
    print(text)
    write_pair(results_path(args.results_dir, "cross_architecture_teacher", device), {**meta, "points": points}, text)


if __name__ == "__main__":
    main()
