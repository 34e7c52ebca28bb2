"""Where a batch-1 answer spends its time, per precision: the prefill and the decode steps timed
apart, in one process on one GPU, on the same question.

For each precision in turn the 2B student (random weights at full size, no download) is built as
the profile task builds it (torchao quantizes after loading), decoded by `--method` (default
static_compile) twice untimed (compiles and captures), then, each a median over `--rounds`:

- answer: a whole `GreedyDecoder.generate` of `--new-tokens` tokens;
- prefill: the prompt's forward alone (firstsight/inference/prefill.py, graphs replayed as an answer does);
- decode steps: the `--new-tokens - 1` steps after a prefill (each block of steps after its own,
  untimed, prefill; the steps replay the captured step).

`--profile-prefill` adds a torch.profiler table of three eager prefills (graphs off, the same
kernels) per precision: what the prefill's kernels are.

    python benchmarks/answer_breakdown.py                              # GPU: bf16, int8_weight_only (~4 min)
    python benchmarks/answer_breakdown.py --precisions bf16 fp8 --profile-prefill
    python benchmarks/answer_breakdown.py --smoke                      # CPU: the plumbing on the tiny student

Prints a table and writes JSON + Markdown (device, versions, date, command, every figure) to
benchmarks/results/answer_breakdown_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from typing import Any, Callable, Dict, List

from _common import RESULTS, ROOT, cuda_device, ratio, results_path, run_meta, write_pair
from generation import Timer, compose, prompt_batch, single_frame_questions  # benchmarks/generation.py

from firstsight.config.specs import model_spec


def _median_seconds(
    timer: Timer, run: Callable[[], Any], rounds: int, before: Callable[[], Any] = lambda: None
) -> float:
    """The median of `timer(run)` over `rounds`; `before()` runs untimed ahead of each."""
    times = []
    for _ in range(rounds):
        before()
        times.append(timer(run))
    return statistics.median(times)


def breakdown(model: Any, batch: Dict[str, Any], pad: int, args: argparse.Namespace, timer: Timer) -> Dict[str, Any]:
    """One model's answer, prefill and decode steps (the decoder's own parts, as generate runs them)."""
    import torch

    from firstsight.inference.generation import GreedyDecoder

    n = args.new_tokens
    decoder = GreedyDecoder(model, args.method)
    # two answers first: compiles, captures (the prefill graph at a shape's second prefill)
    prepare = timer(lambda: [decoder.generate(batch, n, n, pad_token_id=pad) for _ in range(2)])
    answer = _median_seconds(timer, lambda: decoder.generate(batch, n, n, pad_token_id=pad), args.rounds)
    (entry,) = decoder._entries.values()  # one batch size: one static cache
    with torch.no_grad():
        prefill = _median_seconds(timer, lambda: decoder._prefill(model, batch, entry), args.rounds)

        def fresh_prefill() -> None:  # the state an answer's steps start from, as generate makes it
            logits = decoder._prefill(model, batch, entry)
            entry.start(batch, n, pad)
            entry.select(logits)

        steps = _median_seconds(
            timer,
            lambda: [entry.decode(model, decoder._cache_kw) for _ in range(n - 1)],
            args.rounds,
            before=fresh_prefill,
        )
        table = None
        if args.profile_prefill:
            from torch.profiler import ProfilerActivity, profile

            decoder.vision_graphs.off = decoder.language_graphs.off = "profiled eagerly (the same kernels)"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            timer(lambda: [decoder._prefill(model, batch, entry) for _ in range(2)])  # eager warm-up
            with profile(activities=activities) as prof:
                timer(lambda: [decoder._prefill(model, batch, entry) for _ in range(3)])
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
    return {
        "method": decoder.tag,
        "prepare_s": prepare,
        "answer_s": answer,
        "prefill_s": prefill,
        "decode_steps_s": steps,
        "decode_step_ms": 1000 * steps / max(1, n - 1),
        "prefill_profile": table,
    }


def markdown(data: Dict[str, Any]) -> str:
    reference = data["points"][0] if data["points"] else {}
    lines = [
        f"# Where a batch-1 answer spends its time — {data['device']}",
        "",
        f"{data['date']}; {data['command']}; {data['setup']}; one question ({data['prompt_tokens']} prompt "
        f"tokens), {data['new_tokens']} new tokens, medians of {data['rounds']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        f"| precision | method | answer (s) | vs {reference.get('precision', '-')} | prefill (ms) | "
        f"{data['new_tokens'] - 1} decode steps (s) | per step (ms) | first two answers (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in data["points"]:
        lines.append(
            f"| {p['precision']} | {p['method']} | {p['answer_s']:.4f} | "
            f"{ratio(p['answer_s'], reference.get('answer_s')):.2f}x | {1000 * p['prefill_s']:.1f} | "
            f"{p['decode_steps_s']:.4f} | {p['decode_step_ms']:.2f} | {p['prepare_s']:.0f} |"
        )
    for p in data["points"]:
        if p.get("prefill_profile"):
            lines += [
                "",
                f"{p['precision']}: torch.profiler, three eager prefills:",
                "",
                "```",
                p["prefill_profile"].strip(),
                "```",
            ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["bf16", "int8_weight_only"],
        choices=sorted(p.stem for p in (ROOT / "conf" / "precision").glob("*.yaml")),
        help="the first is the reference of the ratio column",
    )
    parser.add_argument("--method", default="static_compile", choices=["static", "static_compile"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--profile-prefill", action="store_true", help="a torch.profiler table of the eager prefill")
    parser.add_argument("--name", default="answer_breakdown")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny student, 2 rounds (temp results)")
    args = parser.parse_args()
    import torch

    if args.smoke:
        device, args.rounds, args.new_tokens, args.image_size = "cpu", 2, 4, 112
        args.results_dir = tempfile.mkdtemp(prefix="answer-breakdown-smoke-")
        base = ["task=profile", "model=tiny", "hardware=cpu", "tracking.enabled=false"]
    else:
        device = cuda_device()
        if device == "cpu":
            print(
                "no CUDA GPU visible: these are GPU measurements (--smoke: the plumbing on this CPU)", file=sys.stderr
            )
            return 2
        base = [
            "task=profile",
            "model=qwen2vl_7b_2b",
            "hardware=gpu",
            "tracking.enabled=false",
            "model.student.weights=random",
            "model.teacher.weights=random",
        ]
    on = "cpu" if device == "cpu" else "cuda"
    from firstsight.models.loading import load_model, load_processor

    setup = (
        "the tiny student on the CPU (the plumbing only)"
        if args.smoke
        else "Qwen2-VL-2B student at full size with random weights, SDPA"
    )
    points: List[Dict[str, Any]] = []
    data = run_meta(
        device,
        setup=setup,
        method=args.method,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        image_size=args.image_size,
        points=points,
    )
    path = results_path(args.results_dir, args.name, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    for precision in args.precisions:
        cfg = compose([*base, f"precision={precision}", f"data.image_size={args.image_size}"])
        torch.manual_seed(cfg.seed)
        processor = load_processor(cfg.model, cfg.cache_dir)
        model = load_model(model_spec(cfg), "student", processor, on, frozen=True).model
        batch = prompt_batch(processor, single_frame_questions(cfg)[:1], on)
        data["prompt_tokens"] = int(batch["input_ids"].shape[1])
        print(f"--- {precision}", flush=True)
        point = {"precision": precision, **breakdown(model, batch, processor.tokenizer.pad_token_id, args, Timer(on))}
        points.append(point)
        print({k: v for k, v in point.items() if k != "prefill_profile"}, flush=True)
        write_pair(path, data, markdown(data))  # after every point: a time limit keeps those done
        del model
        if on == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    print(markdown(data))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
