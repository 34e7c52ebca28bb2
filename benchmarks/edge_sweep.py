"""Edge deployment at real size: which precision of the student fits a 4, 8 or 16 GB device.

Runs `python run.py task=profile task.target=student` for the student (Qwen2-VL-2B, random weights
at full size, no download) for each precision x memory budget (`hardware=edge_4gb|edge_8gb|edge_16gb`:
one CUDA GPU capped at the budget with torch.cuda.set_per_process_memory_fraction, batch 1), one
process per point so that each point's cap and peak are its own. Collects whether it fits
(edge/fits), the peak, the headroom, the weights in all and per part, latency p50/p90, throughput,
load time and, when it does not fit, why (out of memory while loading or profiling, read from the
job's log: metrics.json holds numbers only); marks the Pareto front of accuracy vs peak memory vs
latency p50 among the precisions that fit each budget (firstsight.tasks.report.pareto_front). Writes JSON
+ Markdown under benchmarks/results/ after every point, with the device name, versions, date and
command.

Accuracy: random weights carry none, so it is measured apart, on the CPU, on the tiny pair
(`--accuracy-only`: `task=evaluate model=tiny` per precision; the pretrained tiny teacher's
accuracy under each precision is the figure, the tiny student being untrained) and folded into the
sweep's table from results/edge_sweep_accuracy_cpu.json.

    python benchmarks/edge_sweep.py                           # GPU: 4 precisions x 3 budgets
    python benchmarks/edge_sweep.py --append --deadline 500   # continue a partial sweep
    python benchmarks/edge_sweep.py --accuracy-only           # CPU: accuracy per precision, tiny pair
    python benchmarks/edge_sweep.py --smoke --results-dir /tmp/edge-smoke   # CPU: the plumbing, tiny model
    python benchmarks/edge_sweep.py --render benchmarks/results/edge_sweep_<device>.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from _common import (
    RESULTS,
    ROOT,
    cuda_device,
    earlier_points,
    last_line,
    merged,
    profile_overrides,
    profile_settings,
    read_results,
    results_path,
    run_job,
    run_meta,
    write_pair,
)

from firstsight.core.memory import CPU_BASIS, CUDA_BASIS, DOES_NOT_FIT, FITS  # the repository is on sys.path (_common)

DEFAULTS = dict(
    model="qwen2vl_7b_2b",
    hardware=["edge_4gb", "edge_8gb", "edge_16gb"],
    budgets=None,
    image_size=448,
    name="edge_sweep",
)
# --smoke: the same plumbing on this CPU in a minute or two (tiny student; the budget against the
# peak RSS, ~0.9 GB: 0.5 GB does not fit, 4 GB does)
SMOKE = dict(model="tiny", hardware=["cpu"], budgets=[0.5, 4.0], image_size=112, name="edge_sweep_smoke")
ACCURACY_PRECISIONS = ["fp32", "bf16", "int8_lm", "nf4_lm", "nf4"]
PARTS = ("vision", "merger", "language")
EDGE_LINE = re.compile(r"\bedge: (fits|does not fit) \((.*)\)\s*$")  # firstsight.core.memory.describe, in the job's log
OOM_REASON = re.compile(r"out of memory while (\w+)")


# ----------------------------------------------------------------------------- the sweep (GPU)


def preset_budget(hardware: str) -> Optional[float]:
    """memory_budget_gb of a conf/hardware preset (None: no budget)."""
    from omegaconf import OmegaConf

    value = OmegaConf.load(ROOT / "conf" / "hardware" / f"{hardware}.yaml").get("memory_budget_gb")
    return None if value is None else float(value)


def sweep_points(args: argparse.Namespace) -> List[Tuple[str, str, Optional[float], Optional[float]]]:
    """(precision, hardware preset, budget override or None, the budget it runs under) per point."""
    return [
        (precision, hardware, budget, budget if budget is not None else preset_budget(hardware))
        for precision in args.precisions
        for hardware in args.hardware
        for budget in (args.budgets or [None])
    ]


def point_key(p: Dict[str, Any]) -> Tuple[str, str, Optional[float]]:
    return p["precision"], p["hardware"], p["budget_gb"]


def edge_outcome(out_dir: Path, metrics: Dict[str, float]) -> Dict[str, Any]:
    """The verdict, its reason, the out-of-memory stage and the basis of a profile job: the tags
    firstsight.edge.* are not in metrics.json, so they are read back from the line
    `edge: <verdict> (<reason>)` the job logs; without it, from the metrics (reason unknown; an
    out-of-memory has no headroom, and one while loading has no weights)."""
    found = [
        m
        for log in sorted(out_dir.glob("*.log"))
        for m in map(EDGE_LINE.search, log.read_text(errors="replace").splitlines())
        if m
    ]
    if found:
        verdict, reason = found[-1].groups()
    elif "edge/fits" in metrics:
        verdict, reason = FITS if metrics["edge/fits"] >= 0.5 else DOES_NOT_FIT, None
    else:
        return {}
    oom = OOM_REASON.match(reason or "")
    stage = oom.group(1) if oom else None
    if reason is None and verdict == DOES_NOT_FIT and "edge/headroom_gb" not in metrics:
        stage = "profiling" if "model/weights_gb" in metrics else "loading"
    basis = CPU_BASIS if "perf/peak_rss_gb" in metrics or "peak RSS" in (reason or "") else CUDA_BASIS
    return {"verdict": verdict, "reason": reason, "oom_stage": stage, "basis": basis}


def run_point(
    precision: str,
    hardware: str,
    budget: Optional[float],
    budget_gb: Optional[float],
    args: argparse.Namespace,
    workdir: Path,
) -> Dict[str, Any]:
    overrides = [
        "task=profile",
        f"model={args.model}",
        f"task.target={args.target}",
        *([f"model.{args.target}.weights={args.weights}"] if args.weights else []),
        f"hardware={hardware}",
        *([f"hardware.memory_budget_gb={budget}"] if budget is not None else []),
        *cpu_threads(args, hardware),
        f"precision={precision}",
        *profile_overrides(args),
        *args.overrides,
    ]
    out_dir = workdir / f"{precision}-{hardware}-{budget_gb}"
    job = run_job(overrides, out_dir, args.timeout)
    point: Dict[str, Any] = {
        "precision": precision,
        "hardware": hardware,
        "budget_gb": budget_gb,
        "wall_s": job.pop("wall_s"),
        "command": job.pop("command"),
        "settings": profile_settings(args),
        **job,
    }
    if "metrics" in point:
        point.update(edge_outcome(out_dir, point["metrics"]))
    status = point.get("verdict", "no verdict") if "metrics" in point else "FAILED"
    if point.get("oom_stage"):
        status += f" (out of memory while {point['oom_stage']})"
    print(
        f"{precision:8s} {hardware:10s} {budget_label(budget_gb):>9s}  {status} in {point['wall_s']:.0f} s", flush=True
    )
    return point


def budget_label(budget_gb: Optional[float]) -> str:
    return "no budget" if budget_gb is None else f"{budget_gb:g} GB"


def cpu_threads(args: argparse.Namespace, hardware: str) -> List[str]:
    return [f"hardware.num_threads={args.threads}"] if hardware == "cpu" and args.threads else []


def budgets_summary(points: List[Dict[str, Any]], accuracy: Dict[str, float]) -> List[Dict[str, Any]]:
    """Per budget: the precisions that fit, and the Pareto front among them on the objectives every
    fitting precision has (accuracy: the tiny pair's, by precision; peak memory; latency p50)."""
    from firstsight.tasks.report import EDGE_OBJECTIVES, pareto_front

    measures = {
        "accuracy": lambda p: accuracy.get(p["precision"]),
        "peak memory": lambda p: p["metrics"].get("edge/peak_gb"),
        "latency p50": lambda p: p["metrics"].get("infer/latency_p50_s"),
    }
    summary = []
    for budget in sorted({p["budget_gb"] for p in points}, key=lambda b: (b is None, b or 0.0)):
        group = [p for p in points if p["budget_gb"] == budget]
        fitting = [p for p in group if p.get("verdict") == FITS]
        objectives = [
            (name, up)
            for name, up in EDGE_OBJECTIVES
            if fitting and all(measures[name](p) is not None for p in fitting)
        ]
        on_front = (
            pareto_front([[measures[name](p) for name, _ in objectives] for p in fitting], [up for _, up in objectives])
            if objectives
            else [False] * len(fitting)
        )
        summary.append(
            {
                "budget_gb": budget,
                "points": len(group),
                "fit": [p["precision"] for p in fitting],
                "objectives": [name for name, _ in objectives],
                "pareto_front": [p["precision"] for p, on in zip(fitting, on_front) if on],
            }
        )
    return summary


def sweep_markdown(points: List[Dict[str, Any]], summary: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    from firstsight.tasks.report import fmt

    acc = meta.get("accuracy") or {}
    teacher = accuracy_by_precision(acc)
    versions = meta["versions"]
    bases = sorted({p["basis"] for p in points if p.get("basis")})
    lines = [
        f"# Edge sweep: which precision of the student fits the budget — {meta['device']}",
        "",
        f"{meta['date']}; torch {versions.get('torch')}, transformers {versions.get('transformers')}, bitsandbytes "
        f"{versions.get('bitsandbytes')}; `model={meta['model']}`, the {meta['target']} with {meta['weights'] or 'its own'} "
        f"weights (`task=profile task.target={meta['target']}`), one `python run.py` process per point. The budget "
        "(`hardware=edge_*`, `hardware.memory_budget_gb`; GB = 10^9 bytes) caps a CUDA process before loading "
        "(`torch.cuda.set_per_process_memory_fraction`) and the peak is `torch.cuda.max_memory_allocated` "
        "(the CUDA context, ~0.5 GB, is not counted): an out-of-memory is the result *does not fit*. On a CPU "
        "nothing is capped and the budget is compared with the peak RSS, interpreter included "
        f"(basis here: {', '.join(bases) or '?'}). Profile: {meta['warmup_queries']} untimed then "
        f"{meta['latency_queries']} timed single queries, throughput at batch {meta['batch_size']} over "
        f"{meta['batches']} timed batch(es) after an untimed one (batch 1: an edge device answers one query at "
        f"a time, so the throughput is about 1 / latency and the budget is judged at that batch), "
        f"{meta['new_tokens']} new tokens, {meta['image_size']}x{meta['image_size']} synthetic frames. Command: "
        f"`{meta['command']}`.",
        "",
        (
            "*Accuracy (tiny pair, CPU)*: the pretrained tiny teacher's accuracy under the precision, measured apart on "
            "a CPU (random weights carry none): see the last section."
            if acc
            else accuracy_caption(acc)
        ),
        "",
    ]
    for s in summary:
        line = f"- **{budget_label(s['budget_gb'])}**: {len(s['fit'])} of {s['points']} fit"
        if s["fit"]:
            line += f" ({', '.join(s['fit'])})"
            line += (
                f"; Pareto front on {', '.join(s['objectives'])}: {', '.join(s['pareto_front'])}"
                if s["objectives"]
                else "; no Pareto front (no objective measured for every one that fits)"
            )
        lines.append(line)
    headers = [
        "budget (GB)",
        "precision",
        "fits",
        "peak (GB)",
        "headroom (GB)",
        "weights (GB)",
        "vision / merger / language (GB)",
        "load (s)",
        "latency p50 (s)",
        "latency p90 (s)",
        "throughput (queries/s)",
        "accuracy (tiny pair, CPU)",
        "Pareto front",
        "why not",
    ]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    front = {(s["budget_gb"], precision) for s in summary for precision in s["pareto_front"]}
    for s in summary:
        for p in (p for p in points if p["budget_gb"] == s["budget_gb"]):
            m = p.get("metrics") or {}
            parts = [m.get(f"model/weights_gb/{part}") for part in PARTS]
            if "error" in p:
                fits, why = "failed", f"failed: `{last_line(p['error'])}`"
            else:
                fits = {FITS: "yes", DOES_NOT_FIT: "no"}.get(p.get("verdict"), "?")
                why = (
                    ""
                    if fits != "no"
                    else (f"out of memory while {p['oom_stage']}" if p.get("oom_stage") else "peak over the budget")
                )
            cells = [
                fmt(p["budget_gb"]),
                p["precision"],
                fits,
                fmt(m.get("edge/peak_gb")),
                fmt(m.get("edge/headroom_gb")),
                fmt(m.get("model/weights_gb")),
                " / ".join(fmt(x) for x in parts) if any(parts) else "",
                fmt(m.get("infer/load_time_s")),
                fmt(m.get("infer/latency_p50_s")),
                fmt(m.get("infer/latency_p90_s")),
                fmt(m.get("infer/throughput_qps")),
                fmt(teacher.get(p["precision"])),
                "front" if (s["budget_gb"], p["precision"]) in front else "",
                why,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if acc:
        lines += ["", *accuracy_lines(acc)]  # its own table, under the sweep's
    return "\n".join(lines) + "\n"


def write_sweep(points: List[Dict[str, Any]], meta: Dict[str, Any], json_path: Path) -> str:
    summary = budgets_summary(points, accuracy_by_precision(meta.get("accuracy") or {}))
    table = sweep_markdown(points, summary, meta)
    write_pair(json_path, {**meta, "points": points, "budgets": summary}, table)
    return table


# ----------------------------------------------------------------------------- accuracy (CPU, tiny pair)


def accuracy_by_precision(acc: Dict[str, Any]) -> Dict[str, float]:
    """The tiny teacher's accuracy per precision: what the sweep's accuracy column shows."""
    return {p["precision"]: p["metrics"]["eval/teacher_accuracy"] for p in acc.get("points", []) if "metrics" in p}


def accuracy_caption(acc: Dict[str, Any]) -> str:
    if not acc:
        return (
            "*Accuracy*: none folded in (run `python benchmarks/edge_sweep.py --accuracy-only` on a CPU, then "
            "`--render` this file): the Pareto front is on peak memory and latency only."
        )
    versions = acc["versions"]
    questions = next(
        (p["settings"]["questions"] for p in acc["points"] if p.get("settings", {}).get("questions")), None
    )
    one = f"{1 / questions:.3f}" if questions else "?"
    return (
        f"*Accuracy (tiny pair, CPU)*: random weights carry no accuracy, so each precision's accuracy is measured "
        f"apart, on {acc['device']} ({acc['date']}; torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}, bitsandbytes {versions.get('bitsandbytes')}): `task=evaluate "
        f"model={acc['model']}` under that precision, greedy answers to the {questions or '?'} synthetic validation "
        f"questions, exact match (multiple choice: the letter, strictly; one question is {one}, so a difference of a "
        "question or two is noise). The figure is the **teacher's** accuracy: "
        "evaluate runs both models of the pair under the precision, and the tiny teacher is the shipped pretrained "
        "one, while the tiny student is untrained (random; ~0 whatever the precision), so the teacher shows what "
        "the precision costs a trained Qwen2-VL (same per-part modules, at tiny size). It stands in for the "
        f"student's in the Pareto front. Command: `{acc['command']}`."
    )


def run_accuracy_point(precision: str, args: argparse.Namespace, workdir: Path) -> Dict[str, Any]:
    overrides = [
        "task=evaluate",
        f"model={args.accuracy_model}",
        "hardware=cpu",
        *cpu_threads(args, "cpu"),
        f"precision={precision}",
        "tracking.enabled=false",
        "train.progress_bar=false",
        *args.overrides,
    ]
    out_dir = workdir / f"accuracy-{precision}"
    job = run_job(overrides, out_dir, args.timeout)
    point: Dict[str, Any] = {"precision": precision, "wall_s": job.pop("wall_s"), "command": job.pop("command"), **job}
    config = out_dir / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        point["settings"] = {"questions": OmegaConf.load(config).data.validation_size}
    m = point.get("metrics") or {}
    status = f"teacher {m['eval/teacher_accuracy']:.3f}, student {m['eval/student_accuracy']:.3f}" if m else "FAILED"
    print(f"accuracy {precision:8s} {status} in {point['wall_s']:.0f} s", flush=True)
    return point


def accuracy_markdown(acc: Dict[str, Any]) -> str:
    return (
        "\n".join(
            [f"# Edge sweep: accuracy per precision (tiny pair, CPU) — {acc['device']}", "", *accuracy_lines(acc)]
        )
        + "\n"
    )


def accuracy_lines(acc: Dict[str, Any]) -> List[str]:
    from firstsight.tasks.report import fmt

    reference = next(
        (
            p["metrics"]["eval/teacher_accuracy"]
            for p in acc["points"]
            if p["precision"] == acc["reference"] and "metrics" in p
        ),
        None,
    )
    lines = [
        "## Accuracy (tiny pair, CPU)",
        "",
        accuracy_caption(acc),
        "",
        f"| precision | teacher accuracy | teacher vs {acc['reference']} | student accuracy (untrained) | chance "
        "| teacher weights (GB) | teacher vision / merger / language (GB) | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in acc["points"]:
        m = p.get("metrics")
        if not m:
            lines.append(f"| {p['precision']} | failed: `{last_line(p.get('error', ''))}` |  |  |  |  |  |  |")
            continue
        teacher = m["eval/teacher_accuracy"]
        delta = "" if reference is None else f"{teacher - reference:+.3f}"
        parts = " / ".join(fmt(m.get(f"model/teacher_weights_gb/{part}")) for part in PARTS)
        lines.append(
            f"| {p['precision']} | {teacher:.3f} | {delta} | {m['eval/student_accuracy']:.3f} | "
            f"{m['eval/chance_accuracy']:.3f} | {fmt(m.get('model/teacher_weights_gb'))} | {parts} | "
            f"{p['wall_s']:.0f} |"
        )
    return lines


def write_accuracy(points: List[Dict[str, Any]], meta: Dict[str, Any], json_path: Path) -> str:
    table = accuracy_markdown({**meta, "points": points})
    write_pair(json_path, {**meta, "points": points}, table)
    return table


def load_accuracy(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The accuracy results to fold into the sweep: --accuracy-json, else the newest
    <name>_accuracy_*.json in the results dir (None when there is none)."""
    if args.accuracy_json:
        return json.loads(Path(args.accuracy_json).read_text())
    found = [json.loads(f.read_text()) for f in Path(args.results_dir).glob(f"{DEFAULTS['name']}_accuracy_*.json")]
    return max(found, key=lambda a: a["date"]) if found else None


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8_lm", "nf4_lm", "nf4"])
    parser.add_argument("--hardware", nargs="+", help=f"hardware presets (default: {' '.join(DEFAULTS['hardware'])})")
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        help="hardware.memory_budget_gb values applied over each --hardware preset (default: the preset's)",
    )
    parser.add_argument("--model", help=f"default: {DEFAULTS['model']}")
    parser.add_argument("--target", default="student", choices=["student", "teacher"])
    parser.add_argument("--weights", default="random", help="weights of the profiled side; '' keeps the model's own")
    parser.add_argument("--image-size", type=int, help=f"default: {DEFAULTS['image_size']}")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup-queries", type=int, default=1)
    parser.add_argument("--latency-queries", type=int, default=5)
    parser.add_argument(
        "--batch-size", type=int, default=1, help="throughput batch (1: an edge device, one query at a time)"
    )
    parser.add_argument("--batches", type=int, default=1, help="timed throughput batches (after an untimed one)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per point")
    parser.add_argument(
        "--deadline", type=float, help="start no point after this many seconds (the rest: run again with --append)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="hardware.num_threads of the CPU jobs (0: torch's default)"
    )
    parser.add_argument("--name", help=f"results file stem (default: {DEFAULTS['name']}; --smoke: {SMOKE['name']})")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument(
        "--append",
        action="store_true",
        help="continue this device's existing results: points already measured there are not run again",
    )
    parser.add_argument("--redo", action="store_true", help="with --append: run the given points again all the same")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the plumbing on a CPU, in a minute or two: model=tiny, hardware=cpu, budgets 0.5 and 4 GB "
        "(against the peak RSS, ~0.9 GB), 112x112 frames, results file edge_sweep_smoke_cpu.json",
    )
    parser.add_argument(
        "--accuracy-only",
        action="store_true",
        help="the accuracy side on the CPU: task=evaluate on the tiny pair per --accuracy-precisions",
    )
    parser.add_argument("--accuracy-precisions", nargs="+", default=ACCURACY_PRECISIONS)
    parser.add_argument("--accuracy-reference", default="fp32")
    parser.add_argument("--accuracy-model", default="tiny")
    parser.add_argument(
        "--accuracy-json",
        help="accuracy results to fold in (default: the newest "
        f"{DEFAULTS['name']}_accuracy_*.json in --results-dir; with --render: the file's own)",
    )
    parser.add_argument("overrides", nargs="*", help="more run.py overrides for every point")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the Markdown table of an existing results file")
    args = parser.parse_args()
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, SMOKE[key] if args.smoke else default)
    return args


def main() -> int:
    args = parse_args()
    if args.render:
        data, points = read_results(args.render)
        if data.get("kind") == "accuracy":
            print(write_accuracy(points, data, Path(args.render)))
            return 0
        data.pop("budgets", None)
        if args.accuracy_json:
            data["accuracy"] = load_accuracy(args)
        print(write_sweep(points, data, Path(args.render)))
        return 0
    if args.accuracy_only:
        return accuracy_main(args)

    device = cuda_device()
    json_path = results_path(args.results_dir, args.name, device)
    meta = run_meta(
        device_label(device),
        kind="sweep",
        model=args.model,
        target=args.target,
        weights=args.weights,
        image_size=args.image_size,
        new_tokens=args.new_tokens,
        warmup_queries=args.warmup_queries,
        latency_queries=args.latency_queries,
        batch_size=args.batch_size,
        batches=args.batches,
    )
    previous_accuracy = (
        json.loads(json_path.read_text()).get("accuracy") if args.append and json_path.is_file() else None
    )
    meta["accuracy"] = load_accuracy(args) or previous_accuracy
    earlier = earlier_points(json_path, meta, args.append)  # points measured by an earlier call on the same device kind
    done = {point_key(p) for p in earlier if "metrics" in p and not args.redo}
    todo = [spec for spec in sweep_points(args) if (spec[0], spec[1], spec[3]) not in done]
    if len(todo) < len(sweep_points(args)):
        print(
            f"{len(sweep_points(args)) - len(todo)} point(s) already in {json_path}: not run again (--redo runs them)"
        )
    points: List[Dict[str, Any]] = []
    not_run: List[str] = []
    start = time.monotonic()
    table = write_sweep(earlier, meta, json_path) if earlier else ""
    with tempfile.TemporaryDirectory(prefix="fs-edge-") as tmp:
        for precision, hardware, budget, budget_gb in todo:
            if args.deadline is not None and time.monotonic() - start > args.deadline:
                not_run.append(f"{precision} {hardware} {budget_label(budget_gb)}")
                continue
            points.append(run_point(precision, hardware, budget, budget_gb, args, Path(tmp)))
            table = write_sweep(
                merged(earlier, points, point_key), meta, json_path
            )  # after every point: a kill keeps the rest
    print(table)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    if not_run:
        print(
            f"not run (past --deadline {args.deadline:g} s): {', '.join(not_run)}; continue with the same command "
            "and --append"
        )
    return 0 if all("metrics" in p for p in points) and not not_run else 1


def accuracy_main(args: argparse.Namespace) -> int:
    json_path = results_path(args.results_dir, f"{args.name}_accuracy", "cpu")
    meta = run_meta(device_label("cpu"), kind="accuracy", model=args.accuracy_model, reference=args.accuracy_reference)
    earlier = earlier_points(json_path, meta, args.append)
    done = {p["precision"] for p in earlier if "metrics" in p and not args.redo}
    points: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fs-edge-") as tmp:
        for precision in args.accuracy_precisions:
            if precision in done:
                continue
            points.append(run_accuracy_point(precision, args, Path(tmp)))
            write_accuracy(merged(earlier, points, lambda p: p["precision"]), meta, json_path)  # after every point
    table = write_accuracy(merged(earlier, points, lambda p: p["precision"]), meta, json_path)
    print(table)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0 if all("metrics" in p for p in points) else 1


def device_label(device: str) -> str:
    """The GPU's name, or the CPU's model and cores where there is no GPU."""
    from firstsight.core.runtime import device_name

    return device if device != "cpu" else device_name("cpu")


if __name__ == "__main__":
    sys.exit(main())
