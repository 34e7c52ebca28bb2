"""The distillation step: the naive way against the suite's own, same GPU, same inputs, one call.

One `python run.py task=distill` process per point (so each point's peak memory is its own), all
on the same samples in the same order (same seed), the real-size teacher/student pair with random
weights by default:

  naive      the straightforward step: the output heads on every token (train.logits=all_positions,
             full-vocabulary fp32 KL on the answer rows of those [B, L, V] logits), torch's default
             (foreach) AdamW, each model computing its M-RoPE positions on the GPU
             (train.host_positions=false), the vision encoder's attention one SDPA call per frame
             as transformers does (hardware.batched_vision_attention=false), pure bf16 training
             (precision.trainable_dtype=bfloat16), as the study's baseline describes it
  optimized  the suite's defaults: output heads only where a loss is taken (train.logits=
             answer_positions), fused AdamW, M-RoPE positions computed once per batch on the host
             and shared by both models, all frames of one size in one vision attention call;
             pure bf16 as naive
  + more points that trade (gradient checkpointing: memory for time; a larger batch: the memory
             saved spent on throughput; fp32 master weights: the suite's default precision), and
             the teacher cache with every id (teacher_cache.top_k=null: the live loss exactly, the
             teacher off the GPU during the steps; its one teacher pass before the first step is
             reported, with after how many passes over the split the faster steps pay it back)

Same loss: the optimized point's per-step loss must follow the naive one (bf16 noise only; on the
CPU the two are bit-identical, tests/unit/test_kd_speed.py). The table gives tokens/s, peak VRAM and
the ratios to naive, and the harness overhead (perf/harness_time_fraction: metric logging and the
progress bar against the steps' time).

    python benchmarks/kd_step.py                    # GPU, real size, every point (~15 min: 25-120 s per point on an H200)
    python benchmarks/kd_step.py --points naive optimized 'optimized + teacher cache' \
        'optimized + teacher cache + compile'       # GPU: ~3 min
    python benchmarks/kd_step.py --smoke            # CPU, the tiny pair: the plumbing (~6 min on 2 cores)

Writes benchmarks/results/kd_step_<device>.json and .md (device, versions, date, command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import (  # noqa: E402
    RESULTS,
    add_distill_flags,
    cuda_device,
    distill_overrides,
    results_path,
    run_job,
    run_meta,
    train_history,
    write_pair,
)

NAIVE = [
    "precision.trainable_dtype=bfloat16",
    "train.logits=all_positions",
    "train.fused_optimizer=false",
    "train.host_positions=false",
    "hardware.batched_vision_attention=false",
]
OPTIMIZED = ["precision.trainable_dtype=bfloat16"]
# the teacher's whole distribution (every id: the live loss exactly) over the train split, computed
# once by one teacher pass before the first step; the steps then run the student only
TEACHER_CACHE = ["teacher_cache.enabled=true", "teacher_cache.top_k=null"]

# name -> (overrides, batch-size multiplier, what it shows)
POINTS = {
    "naive": (NAIVE, 1, "the baseline"),
    "optimized": (OPTIMIZED, 1, "the suite's defaults, pure bf16 as naive"),
    "optimized, positions on the GPU": (
        OPTIMIZED + ["train.host_positions=false"],
        1,
        "each model computes its M-RoPE positions itself (what host_positions saves)",
    ),
    "optimized + compile": (
        OPTIMIZED + ["hardware.compile=true"],
        1,
        "each decoder layer / vision block compiled (steps before throughput_warmup_steps excluded)",
    ),
    "optimized + grad checkpointing": (
        OPTIMIZED + ["hardware.gradient_checkpointing=true"],
        1,
        "activations recomputed: memory for time",
    ),
    "optimized, 2x batch": (OPTIMIZED, 2, "a larger batch in the memory saved"),
    "optimized + grad checkpointing, 4x batch": (
        OPTIMIZED + ["hardware.gradient_checkpointing=true"],
        4,
        "the memory checkpointing saves spent on a larger batch",
    ),
    "optimized, fp32 master weights": (["precision.trainable_dtype=float32"], 1, "the suite's default precision"),
    "optimized + teacher cache": (
        OPTIMIZED + TEACHER_CACHE,
        1,
        "the teacher's full distribution computed once, before the steps (exact); "
        "the teacher is off the GPU during the steps",
    ),
    "optimized + teacher cache + compile": (
        OPTIMIZED + TEACHER_CACHE + ["hardware.compile=true"],
        1,
        "as above, each decoder layer / vision block compiled (only the student runs, so no grad-mode recompiles)",
    ),
    "optimized + teacher cache + compile + 8-bit AdamW": (
        OPTIMIZED + TEACHER_CACHE + ["hardware.compile=true", "train.optimizer=adamw_8bit"],
        1,
        "as above, AdamW's moments in 8 bits (bitsandbytes): less optimizer memory, an approximate update",
    ),
    # (budget 0.5 did not finish compiling within 110 s on an H200: the partitioner's solver)
    "optimized + teacher cache + compile, memory budget 0.2": (
        OPTIMIZED + TEACHER_CACHE + ["hardware.compile=true", "hardware.compile_memory_budget=0.2"],
        1,
        "as above, the compiled blocks keep about a fifth of their activations and recompute the rest "
        "in their fused backward (experiment=lean_kd)",
    ),
    "optimized + teacher cache + compile, memory budget 0.2, Python wrapper": (
        OPTIMIZED
        + TEACHER_CACHE
        + ["hardware.compile=true", "hardware.compile_memory_budget=0.2", "hardware.compile_cpp_wrapper=false"],
        1,
        "as above, each compiled graph's kernels launched from inductor's generated Python instead of "
        "its C++ wrapper (what hardware.compile_cpp_wrapper saves)",
    ),
    "optimized + teacher cache + compile, memory budget 0.2, padded to 64": (
        OPTIMIZED
        + TEACHER_CACHE
        + ["hardware.compile=true", "hardware.compile_memory_budget=0.2", "hardware.pad_to_multiple_of=64"],
        1,
        "as above, each batch right-padded to a multiple of 64 tokens: a few shapes, so few steps pay "
        "for a shape not seen before (padding excluded from tokens/s)",
    ),
    "optimized + teacher cache + compile, memory budget 0.2, 2x batch": (
        OPTIMIZED + TEACHER_CACHE + ["hardware.compile=true", "hardware.compile_memory_budget=0.2"],
        2,
        "as above at twice the batch: the memory the budget saves spent on throughput",
    ),
    "optimized + teacher cache + compile + grad checkpointing": (
        OPTIMIZED + TEACHER_CACHE + ["hardware.compile=true", "hardware.gradient_checkpointing=true"],
        1,
        "as above, activations recomputed: memory for time",
    ),
    "optimized + teacher cache + grad checkpointing": (
        OPTIMIZED + TEACHER_CACHE + ["hardware.gradient_checkpointing=true"],
        1,
        "as above, activations recomputed: memory for time",
    ),
}


def warm_up_machine(args: argparse.Namespace) -> None:
    """One short, unrecorded naive job first: the first process on a fresh GPU machine stalls for
    seconds in some of its steps (seen on every fresh H200 machine), which would fall on the
    first point and distort its tokens/s."""
    steps = 3
    warm = argparse.Namespace(**{**vars(args), "steps": steps, "warmup_steps": 1})
    print(f"--- warming the machine up: {steps} naive steps, not recorded", flush=True)
    result = run_job(
        [*distill_overrides(warm, args.batch_size, f"seed={args.seed}"), *NAIVE],
        Path(args.workdir) / "warm-up",
        args.timeout,
    )
    if "error" in result:
        print(f"(the warm-up job failed; measuring anyway)\n{result['error'][-800:]}", flush=True)


def measure(args: argparse.Namespace, names: List[str]) -> List[Dict[str, Any]]:
    if args.warm_up_job:
        warm_up_machine(args)
    points = []
    for name in names:
        overrides, multiplier, note = POINTS[name]
        batch = args.batch_size * multiplier
        out_dir = Path(args.workdir) / name.replace(" ", "_").replace(",", "").replace("+", "plus")
        print(f"--- {name}: batch {batch}", flush=True)
        # a train split of exactly the samples the steps take: what a teacher-cache point's one
        # teacher pass covers (and the same samples in the same order for every point of a batch size).
        # Not for the tiny pair: its pretrained teacher is keyed on the data settings (a new size
        # would pre-train another one); its default split is small enough.
        size = args.steps * batch if args.weights == "random" else None
        extra = (f"seed={args.seed}", "train.progress_bar=true", *([f"data.train_size={size}"] if size else []))
        point = run_job([*distill_overrides(args, batch, *extra), *overrides], out_dir, args.timeout)
        point.update(
            name=name,
            batch_size=batch,
            train_size=job_train_size(out_dir),
            note=note,
            overrides=overrides,
            history=train_history(out_dir),
        )
        if "error" in point:
            print(point["error"][-1500:], flush=True)
        points.append(point)
    return points


def job_train_size(out_dir: Path) -> Optional[int]:
    """data.train_size as the job composed it (.hydra/config.yaml), None if it wrote no config."""
    from omegaconf import OmegaConf

    path = out_dir / ".hydra" / "config.yaml"
    return int(OmegaConf.load(path).data.train_size) if path.is_file() else None


def compare(points: List[Dict[str, Any]]) -> None:
    """Each point's ratios to naive, and its loss against naive's at the same batch, step by step."""
    naive = next((p for p in points if p["name"] == "naive" and "metrics" in p), None)
    if naive is None:
        return
    n = naive["metrics"]
    losses = {h["step"]: h["train/loss"] for h in naive["history"]}
    for p in points:
        m = p.get("metrics")
        if not m:
            continue
        p["tokens_per_s_vs_naive"] = m["perf/throughput_tokens_per_s"] / n["perf/throughput_tokens_per_s"]
        p["peak_vram_vs_naive"] = m.get("perf/peak_vram_gb", m.get("perf/peak_rss_gb")) / n.get(
            "perf/peak_vram_gb", n.get("perf/peak_rss_gb")
        )
        if p["batch_size"] == naive["batch_size"]:
            diffs = [
                abs(h["train/loss"] - losses[h["step"]]) / abs(losses[h["step"]])
                for h in p["history"]
                if h["step"] in losses
            ]
            p["max_relative_loss_difference_vs_naive"] = max(diffs) if diffs else None
            first = p["history"][0]["train/loss"] if p["history"] else None
            p["step1_loss"], p["naive_step1_loss"] = first, losses.get(1)
    teacher_pass_pays_off(points)


def teacher_pass_pays_off(points: List[Dict[str, Any]]) -> None:
    """A teacher-cache point's one-off teacher pass (teacher_cache/build_time_s less the teacher's
    load, which a live run pays too), and after how many passes over the split (epochs, or student
    runs of a sweep sharing the cache) the time its steps save against "optimized" has paid for it."""
    live = next((p for p in points if p["name"] == "optimized" and "metrics" in p), None)
    for p in points:
        m = p.get("metrics") or {}
        if "teacher_cache/build_time_s" not in m:
            continue
        p["teacher_pass_s"] = m["teacher_cache/build_time_s"] - m.get("model/teacher_load_time_s", 0.0)
        if live and live["batch_size"] == p["batch_size"] and p["train_size"]:
            saved_per_step = live["metrics"]["perf/step_time_s"] - m["perf/step_time_s"]
            steps_per_pass = p["train_size"] / p["batch_size"]
            p["passes_to_pay_off"] = (
                p["teacher_pass_s"] / (saved_per_step * steps_per_pass) if saved_per_step > 0 else None
            )


def teacher_pass(point: Dict[str, Any]) -> str:
    """The one-off teacher pass column: its seconds, or that the cache was there already."""
    if point.get("teacher_pass_s") is not None:
        return f"{point['teacher_pass_s']:.1f}"
    if point["metrics"].get("teacher_cache/hits") == 1:
        return "none: cache hit (built by an earlier process)"
    return "n/a"


def render(results: Dict[str, Any]) -> str:
    meta = results["meta"]
    fmt = lambda v, f="{:.3g}": "n/a" if v is None else f.format(v)  # noqa: E731
    memory = "peak VRAM (GB)" if meta["device"] != "cpu" else "peak RSS (GB)"
    lines = [
        f"# KD step: naive vs optimized — {meta['device']}",
        "",
        f"{meta['date']}; {meta['command']}; model={meta['model']} weights={meta['weights']} precision={meta['precision']}, "
        f"{meta['steps']} steps ({meta['warmup_steps']} warm-up steps excluded), {meta['image_size']}px frames"
        + ("; after a short unrecorded naive job that warms the machine up" if meta.get("warm_up_job") else "")
        + "; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        f"| point | batch | tokens/s | x naive | step (s) | {memory} | x naive | harness overhead | max loss diff vs naive "
        "| one-off teacher pass (s) | passes to pay it off |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in results["points"]:
        m = p.get("metrics")
        if not m:
            last = p.get("error", "?").strip().splitlines()[-1:] or ["?"]
            lines.append(f"| {p['name']} | {p['batch_size']} | failed: `{last[0][:120]}` | | | | | | | | |")
            continue
        peak = m.get("perf/peak_vram_gb", m.get("perf/peak_rss_gb"))
        lines.append(
            f"| {p['name']} | {p['batch_size']} | {m['perf/throughput_tokens_per_s']:.0f} | "
            f"{fmt(p.get('tokens_per_s_vs_naive'), '{:.2f}x')} | {fmt(m.get('perf/step_time_s'), '{:.3f}')} | "
            f"{fmt(peak, '{:.2f}')} | {fmt(p.get('peak_vram_vs_naive'), '{:.2f}x')} | "
            f"{fmt(m.get('perf/harness_time_fraction'), '{:.2%}')} | "
            f"{fmt(p.get('max_relative_loss_difference_vs_naive'), '{:.1e}')} | "
            f"{teacher_pass(p)} | {fmt(p.get('passes_to_pay_off'), '{:.2f}')} |"
        )
    tokens = next((p["metrics"] for p in results["points"] if p.get("metrics")), None)
    if tokens:
        lines += [
            "",
            f"Tokens per sample (text + visual, padding excluded): "
            f"{tokens['perf/throughput_tokens_per_s'] / tokens['perf/throughput_samples_per_s']:.0f}.",
        ]
    lines += [
        "",
        "Points: "
        + "; ".join(f"**{p['name']}**: {p['note']} (`{' '.join(p['overrides'])}`)" for p in results["points"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_distill_flags(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny pair, 6 steps: the plumbing only")
    parser.add_argument(
        "--no-warm-up-job",
        dest="warm_up_job",
        action="store_false",
        help="skip the short unrecorded naive job run before the points (on by default, not with --smoke)",
    )
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--workdir", default="/tmp/firstsight-kd-step")
    parser.add_argument("overrides", nargs="*", help="more run.py overrides for every point")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.weights, args.hardware, args.precision = "tiny", "", "cpu", "fp32"
        args.steps, args.warmup_steps, args.image_size = 6, 2, 112  # the tiny teacher's own data (no pre-training)
        args.points = [p for p in args.points if p not in ("optimized, fp32 master weights",)]
        args.warm_up_job = False

    device = cuda_device()
    results = {
        "meta": run_meta(
            device,
            model=args.model,
            weights=args.weights,
            precision=args.precision,
            batch_size=args.batch_size,
            image_size=args.image_size,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            seed=args.seed,
            warm_up_job=args.warm_up_job,
        ),
        "points": measure(args, args.points),
    }
    compare(results["points"])
    table = render(results)
    write_pair(results_path(args.results_dir, "kd_step" + ("_smoke" if args.smoke else ""), device), results, table)
    print(table)
    sys.exit(0 if all("metrics" in p for p in results["points"]) else 1)


if __name__ == "__main__":
    main()
