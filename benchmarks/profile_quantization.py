"""The study's quantization comparison at real size, on one GPU.

Runs `python run.py task=profile` for teacher (Qwen2-VL-7B) and student (Qwen2-VL-2B), both with
random weights at full size (no download), for each precision, one process per point so each
point's peak memory is its own; prints a table and writes JSON + Markdown under
benchmarks/results/ with the device name, versions and date.

    python benchmarks/profile_quantization.py                       # every target x precision
    python benchmarks/profile_quantization.py --precisions bf16 int8 --targets student

Inputs (fixed so points compare): the synthetic validation questions with 448x448 frames (256
visual tokens each; one frame, two for `moved` questions), exactly `--new-tokens` generated tokens, HF `generate` as the suite runs it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from _common import (
    RESULTS,
    cuda_device,
    earlier_points,
    last_line,
    merged,
    profile_overrides,
    profile_settings,
    ratio,
    read_results,
    results_path,
    run_job,
    run_meta,
    write_pair,
)

COLUMNS = [  # (metric, header, format)
    ("model/params_b", "params (B)", "{:.3f}"),
    ("model/weights_gb", "weights (GB)", "{:.2f}"),
    ("perf/peak_vram_gb", "peak VRAM (GB)", "{:.2f}"),
    ("infer/load_time_s", "load (s)", "{:.2f}"),
    ("infer/latency_p50_s", "latency p50 (s)", "{:.3f}"),
    ("infer/latency_p90_s", "latency p90 (s)", "{:.3f}"),
    ("infer/throughput_qps", "throughput (queries/s)", "{:.2f}"),
]


def run_point(target: str, precision: str, args: argparse.Namespace, workdir: Path) -> Dict[str, Any]:
    overrides = [
        "task=profile",
        f"model={args.model}",
        *([f"model.{side}.weights={args.weights}" for side in ("teacher", "student")] if args.weights else []),
        f"hardware={args.hardware}",
        f"precision={precision}",
        f"task.target={target}",
        *profile_overrides(args),
        *args.overrides,
    ]
    job = run_job(overrides, workdir / f"{target}-{precision}", args.timeout)
    point: Dict[str, Any] = {
        "target": target,
        "precision": precision,
        "wall_s": job.pop("wall_s"),
        "command": job.pop("command"),
        "settings": profile_settings(args),
        **job,
    }
    print(
        f"{target:8s} {precision:5s} {'ok' if 'metrics' in point else 'FAILED'} in {point['wall_s']:.0f} s", flush=True
    )
    return point


def comparisons(points: List[Dict[str, Any]], reference: str) -> List[Dict[str, Any]]:
    """Per point: its latency, throughput and weights against the same target at `reference`
    precision, and the student against the teacher at the same precision."""
    by_key = {(p["target"], p["precision"]): p.get("metrics") for p in points}
    rows = []
    for p in points:
        m = p.get("metrics")
        if not m:
            continue
        ref = by_key.get((p["target"], reference)) or {}
        teacher = by_key.get(("teacher", p["precision"])) or {}
        rows.append(
            {
                "target": p["target"],
                "precision": p["precision"],
                f"latency_vs_{reference}": ratio(m.get("infer/latency_p50_s"), ref.get("infer/latency_p50_s")),
                f"weights_vs_{reference}": ratio(m.get("model/weights_gb"), ref.get("model/weights_gb")),
                "student_speedup_over_teacher": (
                    ratio(teacher.get("infer/latency_p50_s"), m.get("infer/latency_p50_s"))
                    if p["target"] == "student"
                    else None
                ),
                "student_throughput_gain_over_teacher": (
                    ratio(m.get("infer/throughput_qps"), teacher.get("infer/throughput_qps"))
                    if p["target"] == "student"
                    else None
                ),
            }
        )
    return rows


def markdown(points: List[Dict[str, Any]], ratios: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [
        f"# Quantization comparison at real size — {meta['device']}",
        "",
        f"{meta['date']}; torch {meta['versions'].get('torch')}, transformers {meta['versions'].get('transformers')}, "
        f"bitsandbytes {meta['versions'].get('bitsandbytes')}; random weights; synthetic validation questions "
        f"({meta['image_size']}x{meta['image_size']} frames = 256 visual tokens each; one frame, two for `moved`), "
        f"{meta['new_tokens']} new tokens, throughput at batch {meta['batch_size']}. Latency/throughput of the "
        "student rows and the teacher rows come from two consecutive calls on the same machine.",
        "",
        "| model | precision | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for p in points:
        m = p.get("metrics")
        cells = [fmt.format(m[k]) if m and k in m else ("failed" if not m else "") for k, _, fmt in COLUMNS]
        lines.append(f"| {p['target']} | {p['precision']} | " + " | ".join(cells) + " |")
    ref = meta["reference"]
    lines += [
        "",
        f"| model | precision | latency vs {ref} | weights vs {ref} | student speed-up over teacher (p50) "
        "| student throughput gain over teacher |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in ratios:
        cells = [
            r[f"latency_vs_{ref}"],
            r[f"weights_vs_{ref}"],
            r["student_speedup_over_teacher"],
            r["student_throughput_gain_over_teacher"],
        ]
        lines.append(
            f"| {r['target']} | {r['precision']} | "
            + " | ".join("" if c is None else f"{c:.2f}x" for c in cells)
            + " |"
        )
    failed = [p for p in points if "error" in p]
    for p in failed:
        lines += ["", f"{p['target']} {p['precision']} failed: `{last_line(p['error'])}`"]
    logged = [p for p in points if p.get("log")]
    if logged:
        lines += ["", "What each job logged of its decoding, and its warnings (run.log):"]
        for p in logged:
            lines += ["", f"{p['target']} {p['precision']}:", "", "```", *p["log"], "```"]
    return "\n".join(lines) + "\n"


def write_results(points: List[Dict[str, Any]], meta: Dict[str, Any], reference: str, json_path: Path) -> str:
    ratios = comparisons(points, reference)
    table = markdown(points, ratios, meta)
    write_pair(json_path, {**meta, "points": points, "ratios": ratios}, table)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["student", "teacher"])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16", "int8", "nf4"])
    parser.add_argument("--reference", default="bf16", help="precision the ratios are taken against")
    parser.add_argument("--model", default="qwen2vl_7b_2b")
    parser.add_argument("--weights", default="random", help="weights of both sides; '' keeps the model's own")
    parser.add_argument("--hardware", default="gpu")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup-queries", type=int, default=2)
    parser.add_argument("--latency-queries", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--name", default="profile_quantization", help="results file stem")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument(
        "--append",
        action="store_true",
        help="merge into this device's existing results (points measured in another call)",
    )
    parser.add_argument("overrides", nargs="*", help="more run.py overrides for every point")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the Markdown table of an existing results file")
    args = parser.parse_args()
    if args.render:
        data, points = read_results(args.render)
        data.pop("ratios", None)
        print(write_results(points, data, data["reference"], Path(args.render)))
        return 0

    device = cuda_device()
    json_path = results_path(args.results_dir, args.name, device)
    meta = run_meta(
        device,
        reference=args.reference,
        image_size=args.image_size,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
    )
    earlier = earlier_points(json_path, meta, args.append)  # points measured by an earlier call on the same device kind
    points: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fs-bench-") as tmp:
        for target in args.targets:
            for precision in args.precisions:
                points.append(run_point(target, precision, args, Path(tmp)))
                all_points = merged(earlier, points, lambda p: (p["target"], p["precision"]))
                table = write_results(
                    all_points, meta, args.reference, json_path
                )  # after every point: a kill keeps the rest
    print(table)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0 if all("metrics" in p for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
