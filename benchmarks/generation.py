"""Greedy generation at real size: transformers' `model.generate` (dynamic cache, the naive way)
against the suite's static path (firstsight/inference/generation.py: static KV cache, the decode step
replayed as a CUDA graph), side by side in one process on one GPU, on the same inputs.

The student (Qwen2-VL-2B, random weights at full size, no download, bf16, SDPA) answers one
synthetic question with one 448x448 frame (256 visual tokens) generating exactly 32 new tokens
(end token suppressed, as the profile task does):

- batch-1 latency: p50 (and p90) over `--latency-queries` timed queries after `--warmup` untimed ones;
- batch-32 throughput: queries/s over `--batches` timed batches (32 single-frame questions, left-
  padded) after two untimed batches (the static paths capture a prefill graph at a shape's second
  prefill, as they do for the single query during its warm-up);
- the static path's one-off cost: capturing the decode step (per batch size; outside the timings);
- peak GPU memory of each batch-32 run;
- equivalence: with random weights the logits are nearly flat, so two numerically equivalent paths
  may pick different greedy tokens; the check is on the logits: the prefill's (step 0) and the first
  decode step's logits of both paths (raw, float32) must agree within bf16 tolerance (|diff| <=
  RTOL * max |logit| + ATOL), where the tokens fed so far are the same; identical tokens are
  reported as a fraction;
- accuracy: bf16's own rounding error on these inputs, measured: each path's prefill logits against
  the same prefill in float32 (the model cast to float32 after the timings, uncompiled), as a ratio
  to the naive path's error. A path whose error is about the naive path's computes the prefill as
  accurately as generate does: what separates the two is rounding, not a fault. (`--no-fp32-reference`
  skips it.)

    python benchmarks/generation.py                  # CUDA: ~1 minute of GPU time
    python benchmarks/generation.py --compile        # also hardware.generation=static_compile (+ its compiles)
    python benchmarks/generation.py --smoke          # CPU: the plumbing on the tiny student (tmp results)
    python benchmarks/generation.py --render benchmarks/results/generation_<device>.json

Prints a table and writes JSON + Markdown (device, versions, date, command, every figure, the
ratios) to benchmarks/results/generation_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from _common import RESULTS, ROOT, cuda_device, ratio, read_results, results_path, run_meta, write_pair

from firstsight.config.specs import model_spec

RTOL, ATOL = 2**-6, 1e-2  # bf16 keeps 8 significant bits; 28 layers of rounding in different orders
DEFAULTS = dict(
    model="qwen2vl_7b_2b",
    hardware="gpu",
    precision="bf16",
    image_size=448,
    latency_queries=10,
    warmup=3,
    batch_size=32,
    batches=2,
    new_tokens=32,
    name="generation",
)
SMOKE = dict(
    model="tiny",
    hardware="cpu",
    precision="bf16",
    image_size=112,
    latency_queries=3,
    warmup=1,
    batch_size=8,
    batches=1,
    new_tokens=8,
    name="generation_smoke",
)
TARGETS = {"latency_p50_s": 0.1, "throughput_qps": 130.0}  # the study's targets, student at batch 1 / batch 32


def compose(overrides: List[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from firstsight.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def single_frame_questions(cfg: Any) -> List[Any]:
    """The synthetic validation questions with one frame each, in order: the benchmarks' inputs."""
    from firstsight.data import load_split

    return [s for s in load_split(cfg.data, "validation", cfg.seed) if len(s.images) == 1]


def prompt_batch(processor: Any, questions: List[Any], device: str) -> Dict[str, Any]:
    """`questions` collated as the decoder gets them (left-padded prompts), on `device`."""
    from firstsight.data.batching import PromptCollator
    from firstsight.training.loop import to_device

    return to_device(PromptCollator(processor)(questions), device)


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def percentile(values: List[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def measure(
    name: str,
    run: Callable[[Dict[str, Any]], Any],
    single: Dict[str, Any],
    batch: Dict[str, Any],
    args: argparse.Namespace,
    timer: Timer,
    device: str,
) -> Dict[str, Any]:
    """Latency at batch 1 and throughput at batch `args.batch_size` of one way of generating."""
    import torch

    figures: Dict[str, Any] = {"first_call_s": timer(lambda: run(single))}  # capture / allocation included
    for _ in range(args.warmup - 1):
        run(single)
    latencies = [timer(lambda: run(single)) for _ in range(args.latency_queries)]
    figures.update(
        latency_p50_s=percentile(latencies, 50), latency_p90_s=percentile(latencies, 90), latencies_s=latencies
    )
    figures["first_batch_s"] = timer(lambda: run(batch))  # untimed for throughput
    run(batch)  # untimed too: the static paths capture the prefill's graph at a shape's second prefill
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = [timer(lambda: run(batch)) for _ in range(args.batches)]
    figures["throughput_qps"] = args.batch_size * args.batches / sum(seconds)
    figures["batch_s"] = seconds
    if device == "cuda":
        figures["batch_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(
        f"{name:22s} batch 1 p50 {figures['latency_p50_s']:.4f} s   batch {args.batch_size} "
        f"{figures['throughput_qps']:.1f} queries/s",
        flush=True,
    )
    return figures


def logits_agreement(hf: Any, static: Any) -> Dict[str, Any]:
    """Per batch: the largest |difference| of the raw logits at step 0 (prefill) and at step 1 (the
    first decode step, over the rows whose step-0 token is the same in both), against the bf16
    tolerance; the fraction of identical tokens; the first step where any row differs."""
    import torch

    a, b = hf.logits, static.logits
    same0 = hf.tokens[:, 0] == static.tokens[:, 0]
    result: Dict[str, Any] = {}
    for step, rows in ((0, torch.ones_like(same0)), (1, same0)):
        if step >= a.shape[0] or not bool(rows.any()):
            continue
        x, y = a[step][rows], b[step][rows]
        diff = float((x - y).abs().max())
        scale = float(x.abs().max())
        result[f"step{step}_max_abs_diff"] = diff
        result[f"step{step}_max_abs_logit"] = scale
        result[f"step{step}_rows"] = int(rows.sum())
        result[f"step{step}_within_tolerance"] = diff <= RTOL * scale + ATOL
        result[f"step{step}_argmax_same"] = float((x.argmax(-1) == y.argmax(-1)).float().mean())
    n = min(hf.tokens.shape[1], static.tokens.shape[1])
    same = hf.tokens[:, :n] == static.tokens[:, :n]
    result["identical_tokens"] = float(same.float().mean())
    differs = (~same).any(0).nonzero()
    result["first_differing_step"] = int(differs[0]) if len(differs) else None
    result["equivalent"] = all(v for k, v in result.items() if k.endswith("within_tolerance"))
    return result


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from firstsight.inference.generation import GreedyDecoder
    from firstsight.models.decode_attention import group_decode, ungroup_decode
    from firstsight.models.loading import load_model, load_processor
    from firstsight.models.vision_attention import batch_frames, unbatch_frames
    from firstsight.suite.validate import validate

    overrides = [
        "task=profile",
        f"model={args.model}",
        f"hardware={args.hardware}",
        f"precision={args.precision}",
        f"data.image_size={args.image_size}",
        "tracking.enabled=false",
        *args.overrides,
    ]
    if args.model != "tiny":
        overrides.append("model.student.weights=random")
    cfg = compose(overrides)
    validate(cfg)
    device = "cuda" if args.hardware != "cpu" else "cpu"
    torch.manual_seed(cfg.seed)
    processor = load_processor(cfg.model, cfg.cache_dir)
    loaded = load_model(model_spec(cfg), "student", processor, device, frozen=True)
    model = loaded.model
    print(
        f"student: {loaded.origin}, {loaded.params_b:.4g} B parameters, {loaded.weights_gb:.4g} GB, "
        f"{model.dtype}, {model.config._attn_implementation}, loaded in {loaded.load_time_s:.1f} s",
        flush=True,
    )

    questions = single_frame_questions(cfg)
    single = prompt_batch(processor, questions[:1], device)
    batch = prompt_batch(processor, questions[: args.batch_size], device)
    tokenizer = processor.tokenizer
    question_tokens = len(tokenizer(questions[0].question, add_special_tokens=False)["input_ids"])
    visual_tokens = int((single["mm_token_type_ids"] == 1).sum()) if "mm_token_type_ids" in single else None
    pad, n = tokenizer.pad_token_id, args.new_tokens
    timer = Timer(device)

    batched_vision = cfg.hardware.batched_vision_attention
    grouped_decode = cfg.hardware.grouped_decode_attention

    def way(decoder: Any) -> Callable[..., Any]:
        def generate(inputs: Dict[str, Any], record: bool = False) -> Any:
            steps = args.record_tokens if record else n
            # naive: the attention as transformers does it (one SDPA call per frame in the vision
            # encoder, the KV cache repeated per query head in decode steps)
            (batch_frames if decoder.method != "hf" and batched_vision else unbatch_frames)(model)
            (group_decode if decoder.method != "hf" and grouped_decode else ungroup_decode)(model)
            return decoder.generate(inputs, steps, steps, pad_token_id=pad, record_logits=record)

        return generate

    methods = ["hf", "static"] + (["static_compile"] if args.compile else [])
    decoders = {m: GreedyDecoder(model, m) for m in methods}
    results: Dict[str, Any] = {"paths": {}, "agreement": {}}
    reference: Dict[str, Any] = {}
    prefill_logits: Dict[str, Dict[str, Any]] = {}  # path -> batch -> its step-0 logits, for the fp32 comparison
    for method, decoder in decoders.items():
        label = "naive (HF generate)" if method == "hf" else method
        generate = way(decoder)
        figures = measure(label, generate, single, batch, args, timer, device)
        figures.update(
            method=decoder.tag,
            capture_s=list(decoder.capture_seconds),
            graph_fallback=decoder.graphs_off,
            compile_fallback=decoder.compile_off,
            prefill_compile_fallback=decoder.prefill_compile_off,
        )
        results["paths"][method] = figures
        # equivalence with the naive path: the logits of the first steps; the tokens of a whole batch
        # run. Each path is checked right after it ran, before a later one changes the shared model
        # (static_compile compiles the vision blocks in place, which the naive path would then run too).
        if method == "hf":
            reference.update(
                {
                    "batch1": generate(single, True),
                    f"batch{args.batch_size}": generate(batch, True),
                    "full": generate(batch),
                }
            )
            prefill_logits[method] = {name: reference[name].logits[0] for name in ("batch1", f"batch{args.batch_size}")}
            continue
        # recorded at the second call: the first one of a shape runs its prefill eagerly, later ones
        # replay the graph the timed calls replay
        recorded = {
            name: (generate(inputs, True), generate(inputs, True))[1]
            for name, inputs in (("batch1", single), (f"batch{args.batch_size}", batch))
        }
        agreement = {name: logits_agreement(reference[name], logits) for name, logits in recorded.items()}
        prefill_logits[method] = {name: logits.logits[0] for name, logits in recorded.items()}
        full = generate(batch)
        agreement[f"batch{args.batch_size}_{n}_tokens_identical"] = float(
            (reference["full"].tokens == full.tokens).float().mean()
        )
        results["agreement"][method] = agreement
    results["inputs"] = {
        "prompt_tokens_batch1": int(single["input_ids"].shape[1]),
        "visual_tokens": visual_tokens,
        "question_tokens": question_tokens,
        "prompt_tokens_batch": int(batch["input_ids"].shape[1]),
        "question": questions[0].question,
    }
    results["model"] = {
        "origin": loaded.origin,
        "params_b": loaded.params_b,
        "weights_gb": loaded.weights_gb,
        "dtype": str(model.dtype),
        "attn_implementation": model.config._attn_implementation,
        "batched_vision_attention": batched_vision,
        "grouped_decode_attention": grouped_decode,
    }
    naive_figures = results["paths"]["hf"]
    results["ratios"] = {
        method: {
            "latency_speedup": ratio(naive_figures["latency_p50_s"], results["paths"][method]["latency_p50_s"]),
            "throughput_gain": ratio(results["paths"][method]["throughput_qps"], naive_figures["throughput_qps"]),
        }
        for method in methods[1:]
    }
    if args.fp32_reference:  # last: it casts the model to float32 in place
        results["accuracy"] = accuracy_against_fp32(
            model, {"batch1": single, f"batch{args.batch_size}": batch}, prefill_logits
        )
    return results


def accuracy_against_fp32(
    model: Any, inputs: Dict[str, Any], prefill_logits: Dict[str, Dict[str, Any]]
) -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """Per path and batch: its prefill's logits (the last prompt position) against the same forward
    in float32: the largest |error|, the relative error ||logits - fp32|| / ||fp32||, and that
    relative error over the naive path's. The model is put back to transformers' own computation
    (prefill blocks uncompiled, per-frame vision attention, repeated-KV decode attention) and cast
    to float32 in place: call this last."""
    import torch

    from firstsight.inference.compiled_prefill import uncompile_prefill_blocks
    from firstsight.models.decode_attention import ungroup_decode
    from firstsight.models.vision_attention import unbatch_frames

    uncompile_prefill_blocks(model)
    unbatch_frames(model)
    ungroup_decode(model)
    model.float()
    with torch.no_grad():
        truth = {name: model(**batch).logits[:, -1].float() for name, batch in inputs.items()}
    errors: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for method, per_batch in prefill_logits.items():
        for name, logits in per_batch.items():
            error = logits - truth[name]  # both float32
            errors.setdefault(method, {})[name] = {
                "max_abs_error": float(error.abs().max()),
                "relative_error": float(error.norm() / truth[name].norm()),
            }
    naive = errors.get("hf", {})
    for per_batch in errors.values():
        for name, e in per_batch.items():
            base = naive.get(name, {}).get("relative_error")
            e["relative_error_vs_naive"] = e["relative_error"] / base if base else None
    return errors


def fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(data: Dict[str, Any]) -> str:
    paths, inputs, model = data["paths"], data["inputs"], data["results_model"]
    bs, n = data["batch_size"], data["new_tokens"]
    versions = data["versions"]
    lines = [
        f"# Greedy generation, naive vs static — {data['device']}",
        "",
        f"{data['date']}; torch {versions.get('torch')}, transformers {versions.get('transformers')}; "
        f"{data['model_name']} student ({model['origin']}, {model['params_b']:.4g} B parameters, {model['dtype']}, "
        f"{model['attn_implementation']}); one process, same inputs: one {data['image_size']}x{data['image_size']} "
        f"frame ({inputs['visual_tokens']} visual tokens) + a {inputs['question_tokens']}-token question = "
        f"{inputs['prompt_tokens_batch1']} prompt tokens, {n} new tokens (end token suppressed); batch-1 latency "
        f"p50/p90 over {data['latency_queries']} timed queries after {data['warmup']} untimed; throughput over "
        f"{data['batches']} timed batches of {bs} single-frame questions (left-padded to "
        f"{inputs['prompt_tokens_batch']} tokens) after two untimed batches. Vision encoder attention: one SDPA "
        "call per frame on the naive path"
        + (
            "; all frames in one call on the static paths (hardware.batched_vision_attention)."
            if model.get("batched_vision_attention")
            else ", and on the static paths too (hardware.batched_vision_attention=false)."
        )
        + (
            " Decode steps' attention: the KV cache repeated per query head on the naive path (transformers); "
            "grouped query heads on the static paths (hardware.grouped_decode_attention)."
            if model.get("grouped_decode_attention")
            else ""
        )
        + (
            " static_compile also compiles the prefill's vision blocks and language-model norms and MLPs (firstsight/inference/compiled_prefill.py)."
            if "static_compile" in paths
            else ""
        ),
        "",
        f"| path | method | batch-1 latency p50 (s) | p90 (s) | batch-{bs} queries/s | latency speed-up | "
        f"throughput gain | batch-{bs} peak GPU memory (GB) | first call (s) | captures (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, f in paths.items():
        r = data["ratios"].get(method, {})
        label = "naive: HF `generate`, dynamic cache" if method == "hf" else f"`hardware.generation={method}`"
        captures = ", ".join(f"{c:.2f}" for c in f.get("capture_s") or [])
        lines.append(
            f"| {label} | {f['method']} | {f['latency_p50_s']:.4f} | {f['latency_p90_s']:.4f} | "
            f"{f['throughput_qps']:.1f} | {fmt(r.get('latency_speedup'), '.1f')}{'x' if r else ''} | "
            f"{fmt(r.get('throughput_gain'), '.1f')}{'x' if r else ''} | {fmt(f.get('batch_peak_gb'), '.2f')} | "
            f"{f['first_call_s']:.2f} | {captures} |"
        )
    lines += [
        "",
        f"Targets (student): batch-1 latency <= {TARGETS['latency_p50_s']} s, >= "
        f"{TARGETS['throughput_qps']:.0f} queries/s at batch 32.",
    ]
    for method, f in paths.items():
        if method == "hf":
            continue
        met = [
            f"latency {'met' if f['latency_p50_s'] <= TARGETS['latency_p50_s'] else 'not met'}",
            (
                f"throughput {'met' if f['throughput_qps'] >= TARGETS['throughput_qps'] else 'not met'}"
                if bs == 32
                else "throughput not measured at batch 32"
            ),
        ]
        fallbacks = [
            f"{what}: {why}"
            for what, why in (
                ("torch.compile", f.get("compile_fallback")),
                ("CUDA graphs", f.get("graph_fallback")),
                ("compiled prefill blocks", f.get("prefill_compile_fallback")),
            )
            if why
        ]
        lines.append(
            f"`{method}`: {', '.join(met)}" + (f"; fell back ({'; '.join(fallbacks)})" if fallbacks else "") + "."
        )
    lines += [
        "",
        "Captures (one per batch size, and per logits-recording run) happen in the first use of each shape, "
        "outside the timed queries.",
        "",
        f"Equivalence with the naive path (raw float32 logits; tolerance |diff| <= {RTOL:g} x max|logit| + {ATOL:g}; "
        "step 1 compared over the rows whose step-0 token is the same):",
        "",
        "| path | batch | step 0 (prefill) max abs diff | step 1 max abs diff | max abs logit | argmax same (step 0) "
        f"| within tolerance | identical tokens (first {data.get('record_tokens')}) | first differing step | "
        f"identical tokens over a batch-{bs} run of {n} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, agreement in data["agreement"].items():
        for key in ("batch1", f"batch{bs}"):
            a = agreement[key]
            whole = agreement[f"batch{bs}_{n}_tokens_identical"] if key != "batch1" else None
            lines.append(
                f"| {method} | {key[5:]} | {fmt(a.get('step0_max_abs_diff'), '.3g')} | "
                f"{fmt(a.get('step1_max_abs_diff'), '.3g')} | {fmt(a.get('step0_max_abs_logit'), '.3g')} | "
                f"{fmt(a.get('step0_argmax_same'), '.2f')} | {'yes' if a['equivalent'] else 'NO'} | "
                f"{a['identical_tokens']:.2f} | {'none' if a['first_differing_step'] is None else a['first_differing_step']} | "
                f"{fmt(whole, '.2f')} |"
            )
    lines += [
        "",
        "With random weights the logits are nearly flat: a near-tie can flip one greedy token and the "
        "sequences diverge from there, so equivalence is judged on the logits, not on whole token sequences.",
    ]
    if data.get("accuracy"):
        lines += [
            "",
            "Accuracy: each path's prefill logits (last prompt position) against the same prefill in float32 "
            "(transformers' own computation, uncompiled): bf16's rounding error on these inputs, measured. "
            "A path whose error is about the naive path's (ratio near 1, or below) differs from it by rounding "
            "of bf16's own size, not by a fault.",
            "",
            "| path | batch | max abs error | relative error | relative error / naive's |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method, per_batch in data["accuracy"].items():
            for key, e in per_batch.items():
                lines.append(
                    f"| {method} | {key[5:]} | {e['max_abs_error']:.3g} | {e['relative_error']:.3g} | "
                    f"{fmt(e.get('relative_error_vs_naive'), '.3f')} |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny student on this CPU (results to a temp dir)")
    for key, value in DEFAULTS.items():
        if key != "name":
            parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument(
        "--record-tokens",
        type=int,
        default=None,
        help="steps whose logits are recorded for the comparison (default: --new-tokens, so the "
        "recording runs have the timed runs' shapes; >= 2)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also hardware.generation=static_compile (torch.compile'd step; compiles per batch size)",
    )
    parser.add_argument(
        "--no-fp32-reference",
        dest="fp32_reference",
        action="store_false",
        help="skip the accuracy check against a float32 prefill (it casts the model after the timings)",
    )
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--render", metavar="JSON", help="only rewrite the Markdown table of an existing results file")
    parser.add_argument("overrides", nargs="*", help="more run.py overrides (e.g. hardware.attn_implementation=eager)")
    args = parser.parse_args()
    if args.render:
        data, points = read_results(args.render)
        data = {**data, **points[0]}
        print(markdown(data))
        return 0
    preset = SMOKE if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.record_tokens = max(2, args.record_tokens or args.new_tokens)
    if args.results_dir is None:
        args.results_dir = str(Path(tempfile.gettempdir()) / "firstsight-bench-smoke") if args.smoke else str(RESULTS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    device = cuda_device() if args.hardware != "cpu" else "cpu"
    if args.hardware != "cpu" and device == "cpu":
        print("no CUDA GPU visible: run with --smoke on a CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run(args)
    meta = run_meta(
        device,
        model_name=args.model,
        precision=args.precision,
        image_size=args.image_size,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        batches=args.batches,
        latency_queries=args.latency_queries,
        warmup=args.warmup,
        record_tokens=args.record_tokens,
    )
    results["results_model"] = results.pop("model")
    results["wall_s"] = time.perf_counter() - start
    data = {**meta, "points": [results]}
    table = markdown({**meta, **results})
    json_path = results_path(args.results_dir, args.name, device)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_pair(json_path, data, table)
    print(table)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')} ({results['wall_s']:.0f} s)")
    ok = all(a[k]["equivalent"] for a in results["agreement"].values() for k in ("batch1", f"batch{args.batch_size}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
