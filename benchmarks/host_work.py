"""Host-side costs removed, each measured on and off in one process, interleaved (A, B, A, B, ...)
so that both sides see the same machine state:

- vision graph: batch-1 generation by the static paths with the prefill's vision encoder replayed
  from a CUDA graph (firstsight/inference/vision_graph.py) and run eagerly. Same tokens and logits required.
- host positions: the distillation step's forward and backward (teacher 7B without gradients,
  student 2B, KD loss on the answer positions, no optimizer step) with the M-RoPE positions
  computed once on the host and given to both models (firstsight/models/positions.py,
  train.host_positions) and computed by each model on the GPU. Same loss required.
- vision attention: the student's vision encoder with all frames of one size in one SDPA call
  (firstsight/models/vision_attention.py, hardware.batched_vision_attention) and with one call per frame
  (transformers), on a training batch (forward + backward) and on a batch of frames to answer
  (forward only, as a batched prefill). Same output (and gradient) required, to bf16 rounding.
- decode tuning: batch-1 generation by static_compile with its step compiled under inductor's
  defaults and under generation.COMPILE_OPTIONS (coordinate descent tuning). Logits within bf16
  tolerance required.
- decode attention: generation by the static path (captured decode steps, not compiled) at batch 1
  and at batch --decode-batch, the decode steps' attention with the query heads grouped per KV
  head (firstsight/models/decode_attention.py, hardware.grouped_decode_attention) and with the KV cache
  repeated per query head (transformers). Logits within bf16 tolerance required.
- prefill graph: generation by the static paths at batch 1 and at batch --decode-batch, the
  prefill's language model replayed from a CUDA graph (firstsight/inference/prefill.py) and run eagerly
  (at the larger batch the graph is allowed past prefill.MAX_TOKENS, to see what it would buy
  there). Same tokens required.
- prefill compile: generation by static_compile at batch 1 and at batch --decode-batch, the
  prefill's language-model norms and MLPs compiled (firstsight/inference/compiled_prefill.py) and run as
  transformers' code. Logits within bf16 tolerance required.

    python benchmarks/host_work.py                     # GPU, real size with random weights (~70 s on an H200, model builds included)
    python benchmarks/host_work.py --parts generation  # only the first part
    python benchmarks/host_work.py --parts vision_attention   # only the vision attention pair
    python benchmarks/host_work.py --parts decode_tuning      # static_compile with and without its inductor options (~3 min)
    python benchmarks/host_work.py --parts decode_attention   # grouped against repeated KV heads in decode steps (~40 s)
    python benchmarks/host_work.py --parts prefill_graph      # the prefill's language model as a graph or eager
    python benchmarks/host_work.py --parts prefill_compile    # static_compile's prefill norms and MLPs compiled or not (~4 min)

Prints a table and writes benchmarks/results/host_work_<device>.{json,md} (device, versions, date).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

from _common import RESULTS, cuda_device, ratio, results_path, run_meta, write_pair
from generation import ATOL, RTOL, Timer, compose, prompt_batch, single_frame_questions  # benchmarks/generation.py

from firstsight.config.specs import model_spec

DEVICE = {"name": "cuda"}  # --smoke: cpu


def interleaved(ways: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[float]]:
    timed = Timer(DEVICE["name"])  # synchronises around each call on CUDA
    times: Dict[str, List[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, run in ways.items():
            times[name].append(timed(run))
    return times


def _questions(cfg: Any, processor: Any, size: int) -> Dict[str, Any]:
    """A batch of `size` single-frame validation questions (left-padded), on the device."""
    return prompt_batch(processor, single_frame_questions(cfg)[:size], DEVICE["name"])


def _one_question(cfg: Any, processor: Any) -> Tuple[Any, Dict[str, Any]]:
    """The student, frozen, and a batch of one single-frame validation question."""
    from firstsight.models.loading import load_model

    model = load_model(model_spec(cfg), "student", processor, DEVICE["name"], frozen=True).model
    return model, _questions(cfg, processor, 1)


def _decode_interleaved(
    decoders: Dict[str, Any], batch: Dict[str, Any], pad: int, args: argparse.Namespace
) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """Each decoder's batch-1 answers, timed interleaved, after two untimed calls (captures and
    static_compile's compilation happen there: the first call's seconds are returned too)."""
    n = args.new_tokens
    ways, first = {}, {}
    for name, decoder in decoders.items():
        first[name] = Timer(DEVICE["name"])(lambda d=decoder: d.generate(batch, n, n, pad_token_id=pad))
        decoder.generate(batch, n, n, pad_token_id=pad)
        ways[name] = lambda d=decoder: d.generate(batch, n, n, pad_token_id=pad)
    return interleaved(ways, args.rounds), first


def _agreement(reference: Any, candidate: Any, batch: Dict[str, Any], pad: int, n: int) -> Dict[str, Any]:
    """Whether two decoders give the same tokens, and how far apart their raw logits are."""
    import torch

    with torch.no_grad():
        a = reference.generate(batch, n, n, pad_token_id=pad, record_logits=True)
        b = candidate.generate(batch, n, n, pad_token_id=pad, record_logits=True)
    return {"identical_tokens": bool((a.tokens == b.tokens).all()), **logits_apart(a, b)}


def logits_apart(a: Any, b: Any) -> Dict[str, Any]:
    """How far apart two runs' raw logits ([steps, rows, vocab]) are, where they are comparable:
    at each row's steps whose inputs were the same, i.e. up to and including the first step where
    the rows' chosen tokens differ (after it, the two runs continue different answers); and the
    fraction of identical tokens."""
    import torch

    steps = min(a.logits.shape[0], b.logits.shape[0], a.tokens.shape[1], b.tokens.shape[1])
    same = (a.tokens[:, :steps] == b.tokens[:, :steps]).T  # [steps, rows]
    fed_same = torch.ones_like(same)
    fed_same[1:] = same[:-1].int().cumprod(0).bool()  # every token before this step was the same
    x, y = a.logits[:steps][fed_same], b.logits[:steps][fed_same]
    return {
        "max_abs_logit_diff": float((x - y).abs().max()),
        "max_abs_logit": float(x.abs().max()),
        "compared_steps": int(fed_same.sum()),
        "identical_token_fraction": float(same.float().mean()),
    }


def _free() -> None:
    if DEVICE["name"] == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def generation_part(cfg: Any, processor: Any, args: argparse.Namespace) -> Dict[str, Any]:
    from firstsight.inference.generation import GreedyDecoder

    model, batch = _one_question(cfg, processor)
    pad = processor.tokenizer.pad_token_id
    decoders = {}
    for method in args.methods:
        for graph in (True, False):
            decoder = GreedyDecoder(model, method)
            if not graph:
                decoder.vision_graphs.off = "measured without it"
            decoders[f"{method}, vision {'graph' if graph else 'eager'}"] = decoder
    times, _ = _decode_interleaved(decoders, batch, pad, args)
    rows = []
    for method in args.methods:
        graph, eager = f"{method}, vision graph", f"{method}, vision eager"
        rows.append(
            {
                "method": method,
                "eager_p50_s": statistics.median(times[eager]),
                "graph_p50_s": statistics.median(times[graph]),
                "eager_min_s": min(times[eager]),
                "graph_min_s": min(times[graph]),
                "speedup": ratio(statistics.median(times[eager]), statistics.median(times[graph])),
                "vision_graphs_captured": len(decoders[graph].vision_graphs.capture_seconds),
                "vision_graph_off": decoders[graph].vision_graphs.off,
                **_agreement(decoders[eager], decoders[graph], batch, pad, args.new_tokens),
            }
        )
    del model, decoders
    _free()
    return {"prompt_tokens": int(batch["input_ids"].shape[1]), "rows": rows, "times_s": times}


def decode_tuning_part(cfg: Any, processor: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """static_compile's step compiled with inductor's defaults and with generation.COMPILE_OPTIONS
    (coordinate descent tuning), batch 1; their logits must agree within bf16 tolerance."""
    from firstsight.inference.generation import COMPILE_OPTIONS, GreedyDecoder

    model, batch = _one_question(cfg, processor)
    pad = processor.tokenizer.pad_token_id
    decoders = {
        "inductor's defaults": GreedyDecoder(model, "static_compile", compile_options={}),
        "COMPILE_OPTIONS": GreedyDecoder(model, "static_compile"),
    }
    times, first = _decode_interleaved(decoders, batch, pad, args)
    plain, tuned = decoders
    agreement = _agreement(decoders[plain], decoders[tuned], batch, pad, args.new_tokens)
    tolerance = RTOL * agreement["max_abs_logit"] + ATOL  # generation.py's bf16 tolerance
    result = {
        "options": COMPILE_OPTIONS,
        "methods": {name: d.tag for name, d in decoders.items()},
        "p50_s": {name: statistics.median(t) for name, t in times.items()},
        "first_call_s": first,
        "speedup": ratio(statistics.median(times[plain]), statistics.median(times[tuned])),
        **agreement,
        "within_tolerance": agreement["max_abs_logit_diff"] <= tolerance,
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "times_s": times,
    }
    del model, decoders
    _free()
    return result


def decode_attention_part(cfg: Any, processor: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """The static path with grouped and with repeated KV heads in its decode steps, at batch 1 and
    --decode-batch. Each decoder captures its step (the attention it was captured with is the one
    its replays run) under its own setting; prefills are the same either way (several positions)."""
    from firstsight.inference.generation import GreedyDecoder
    from firstsight.models.decode_attention import group_decode, ungroup_decode

    model, single = _one_question(cfg, processor)
    batch = _questions(cfg, processor, args.decode_batch)
    pad, n = processor.tokenizer.pad_token_id, args.new_tokens
    switch = {"repeated": ungroup_decode, "grouped": group_decode}
    rows = []
    for size, inputs in ((1, single), (args.decode_batch, batch)):
        decoders = {name: GreedyDecoder(model, "static") for name in switch}
        logits = {}
        for name, decoder in decoders.items():  # captures (two: plain and logits-recording) under each setting
            switch[name](model)
            logits[name] = decoder.generate(inputs, n, n, pad_token_id=pad, record_logits=True)
            decoder.generate(inputs, n, n, pad_token_id=pad)
        times = interleaved(
            {name: (lambda d=d: d.generate(inputs, n, n, pad_token_id=pad)) for name, d in decoders.items()},
            args.rounds,
        )
        apart = logits_apart(logits["repeated"], logits["grouped"])
        p50 = {name: statistics.median(t) for name, t in times.items()}
        rows.append(
            {
                "batch_size": size,
                "p50_s": p50,
                "speedup": ratio(p50["repeated"], p50["grouped"]),
                "methods": {name: d.tag for name, d in decoders.items()},
                **apart,
                "within_tolerance": apart["max_abs_logit_diff"] <= RTOL * apart["max_abs_logit"] + ATOL,
                "times_s": times,
            }
        )
    del model
    _free()
    return {
        "prompt_tokens": {1: int(single["input_ids"].shape[1]), args.decode_batch: int(batch["input_ids"].shape[1])},
        "rows": rows,
    }


def _compare_on(decoders: Dict[str, Any], inputs: Dict[str, Any], pad: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Two decoders of one model on the same inputs: two untimed calls each (a shape's prefill graph
    is captured at its second prefill), then a logits-recording pair (another cache: its own
    captures), then their answers timed interleaved; p50 per decoder, the second's speed-up over the
    first, and how far apart their tokens and logits are."""
    n = args.new_tokens
    logits = {}
    for name, decoder in decoders.items():
        for record in (False, False, True, True):
            out = decoder.generate(inputs, n, n, pad_token_id=pad, record_logits=record)
        logits[name] = out
    times = interleaved(
        {name: (lambda d=d: d.generate(inputs, n, n, pad_token_id=pad)) for name, d in decoders.items()}, args.rounds
    )
    p50 = {name: statistics.median(t) for name, t in times.items()}
    first, second = decoders
    apart = logits_apart(logits[first], logits[second])
    return {
        "batch_size": int(inputs["input_ids"].shape[0]),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "p50_s": p50,
        "speedup": ratio(p50[first], p50[second]),
        "methods": {name: d.tag for name, d in decoders.items()},
        "identical_tokens": bool((logits[first].tokens == logits[second].tokens).all()),
        **apart,
        "within_tolerance": apart["max_abs_logit_diff"] <= RTOL * apart["max_abs_logit"] + ATOL,
        "times_s": times,
    }


def prefill_graph_part(cfg: Any, processor: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """Each of --methods at batch 1 and --decode-batch, with the prefill's language model replayed
    from a graph and run eagerly."""
    from firstsight.inference.generation import GreedyDecoder
    from firstsight.inference.prefill import MAX_TOKENS

    model, single = _one_question(cfg, processor)
    batch = _questions(cfg, processor, args.decode_batch)
    pad = processor.tokenizer.pad_token_id
    rows = []
    for method in args.methods:
        for inputs in (single, batch):
            size, length = inputs["input_ids"].shape
            decoders = {"eager": GreedyDecoder(model, method), "graph": GreedyDecoder(model, method)}
            decoders["eager"].language_graphs.off = "measured without it"
            decoders["graph"].language_graphs.max_tokens = max(MAX_TOKENS, size * length)
            row = _compare_on(decoders, inputs, pad, args)
            graphs = decoders["graph"].language_graphs
            rows.append(
                {
                    "method": method,
                    **row,
                    "graphs_captured": len(graphs.capture_seconds),
                    "capture_s": sum(graphs.capture_seconds),
                    "graph_off": graphs.off,
                    "over_default_limit": size * length > MAX_TOKENS,
                }
            )
            del decoders
            _free()
    del model
    _free()
    return {"rows": rows, "max_tokens": MAX_TOKENS}


def prefill_compile_part(cfg: Any, processor: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """static_compile at batch 1 and --decode-batch, the prefill's language model with its norms and
    MLPs run as transformers' code and compiled (firstsight/inference/compiled_prefill.py); both decoders
    share the model's compiled vision blocks and decode step."""
    from firstsight.inference.generation import GreedyDecoder, generation_tags

    model, single = _one_question(cfg, processor)
    batch = _questions(cfg, processor, args.decode_batch)
    pad = processor.tokenizer.pad_token_id
    rows = []
    for inputs in (single, batch):
        decoders = {
            "transformers' code": GreedyDecoder(model, "static_compile"),
            "compiled": GreedyDecoder(model, "static_compile"),
        }
        decoders["transformers' code"].compile_language_prefill = False
        start = time.perf_counter()
        row = _compare_on(decoders, inputs, pad, args)
        rows.append(
            {
                **row,
                "prepare_and_time_s": time.perf_counter() - start,
                "fallback": {
                    name: generation_tags(d).get("firstsight.generation.fallback") for name, d in decoders.items()
                },
            }
        )
        del decoders
        _free()
    del model
    _free()
    return {"rows": rows}


def positions_part(cfg: Any, processor: Any, args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from firstsight.data import load_split
    from firstsight.data.batching import QACollator
    from firstsight.losses.kd import ForwardKL, count_answer_tokens
    from firstsight.models.loading import load_model
    from firstsight.tasks.distill import step_inputs
    from firstsight.training.loop import to_device

    teacher = load_model(model_spec(cfg), "teacher", processor, DEVICE["name"], frozen=True).model
    student = load_model(model_spec(cfg), "student", processor, DEVICE["name"], frozen=False).model.to(teacher.dtype)
    samples = load_split(cfg.data, "train", cfg.seed)
    size = args.batch_size
    collate = QACollator(processor)
    batches = [
        to_device(collate([samples[i] for i in range(j * size, (j + 1) * size)]), DEVICE["name"])
        for j in range(args.batches)
    ]
    loss_fn = ForwardKL()

    def step(batch: Dict[str, Any], host: bool) -> float:  # the inputs exactly as distill's step makes them
        inputs, labels = step_inputs(batch, student, host_positions=host, answer_positions_only=True)
        student_logits = student(**inputs).logits
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        out = loss_fn(student_logits, teacher_logits, labels, num_answer_tokens=count_answer_tokens(batch["labels"]))
        out.loss.backward()
        student.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    same = all(step(b, True) == step(b, False) for b in batches)  # also the untimed warm-up
    ways = {
        "positions on the host": lambda: [step(b, True) for b in batches],
        "positions on the GPU (each model)": lambda: [step(b, False) for b in batches],
    }
    times = interleaved(ways, args.rounds)
    per_step = {name: [t / len(batches) for t in values] for name, values in times.items()}
    host, gpu = (statistics.median(per_step[name]) for name in ways)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    return {
        "batch_size": size,
        "tokens_per_step": tokens,
        "identical_loss": same,
        "host_step_s": host,
        "gpu_step_s": gpu,
        "speedup": ratio(gpu, host),
        "times_s": per_step,
    }


def vision_attention_part(cfg: Any, processor: Any, args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from firstsight.core.runtime import torch_dtype
    from firstsight.data import load_split
    from firstsight.data.batching import QACollator
    from firstsight.models.loading import load_model
    from firstsight.models.vision_attention import batch_frames, unbatch_frames
    from firstsight.training.loop import to_device

    student = load_model(model_spec(cfg), "student", processor, DEVICE["name"], frozen=False).model
    student.to(torch_dtype(cfg.precision.dtype))
    visual = student.model.visual
    samples = load_split(cfg.data, "train", cfg.seed)
    train = to_device(QACollator(processor)([samples[i] for i in range(args.batch_size)]), DEVICE["name"])
    prefill = _questions(cfg, processor, args.prefill_frames)

    def encode(batch: Dict[str, Any], backward: bool, batched: bool) -> Any:
        (batch_frames if batched else unbatch_frames)(student)
        with torch.set_grad_enabled(backward):
            out = visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"]).pooler_output
            if backward:
                out.float().square().mean().backward()
        grad = visual.blocks[0].attn.qkv.weight.grad
        result = (out.detach().float(), None if grad is None else grad.float().clone())
        student.zero_grad(set_to_none=True)
        return result

    rows = []
    for case, batch, backward in (
        (f"training batch of {args.batch_size}, forward + backward", train, True),
        (f"{prefill['input_ids'].shape[0]} frames to answer, forward only", prefill, False),
    ):
        (per_frame, per_frame_grad), (batched, batched_grad) = (encode(batch, backward, b) for b in (False, True))
        error = float((batched - per_frame).norm() / per_frame.norm())
        grad_error = float((batched_grad - per_frame_grad).norm() / per_frame_grad.norm()) if backward else None
        ways = {
            "per frame": lambda b=batch, g=backward: encode(b, g, False),
            "batched": lambda b=batch, g=backward: encode(b, g, True),
        }
        times = interleaved(ways, args.rounds)
        per, bat = (statistics.median(times[name]) for name in ways)
        grid = batch["image_grid_thw"]
        rows.append(
            {
                "case": case,
                "frames": int(grid[:, 0].sum()),
                "patches": int(grid.prod(-1).sum()),
                "per_frame_p50_s": per,
                "batched_p50_s": bat,
                "speedup": ratio(per, bat),
                "relative_error": error,
                "grad_relative_error": grad_error,
                "same": error < 1e-2 and (grad_error is None or grad_error < 1e-2),
                "times_s": times,
            }
        )
    return {"dtype": getattr(cfg.precision.dtype, "value", str(cfg.precision.dtype)), "rows": rows}


def markdown(data: Dict[str, Any]) -> str:
    v = data["versions"]
    lines = [
        f"# Host-side work removed — {data['device']}",
        "",
        f"{data['date']}; torch {v.get('torch')}, transformers {v.get('transformers')}; {data['command']}; "
        f"{data['setup']}, {data['image_size']}x{data['image_size']} frames; "
        f"each pair measured interleaved in one process, {data['rounds']} rounds.",
        "",
    ]
    gen = data.get("generation")
    if gen:
        lines += [
            f"Batch-1 generation (the student, {gen['prompt_tokens']}-token prompt, {data['new_tokens']} new tokens), "
            "p50 over the rounds:",
            "",
            "| path | vision encoder eager (s) | vision graph (s) | speed-up | graphs captured | identical tokens | max abs logit diff |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in gen["rows"]:
            lines.append(
                f"| `{r['method']}` | {r['eager_p50_s']:.4f} | {r['graph_p50_s']:.4f} | {r['speedup']:.2f}x | "
                f"{r['vision_graphs_captured']}{' (off: ' + r['vision_graph_off'] + ')' if r['vision_graph_off'] else ''} | "
                f"{'yes' if r['identical_tokens'] else 'NO'} | {r['max_abs_logit_diff']:.3g} |"
            )
        lines.append("")
    pos = data.get("positions")
    if pos:
        lines += [
            f"Distillation forward + backward (teacher without gradients, student, batch {pos['batch_size']}, "
            f"{pos['tokens_per_step']:.0f} tokens per step, no optimizer step), median per step:",
            "",
            "| M-RoPE positions | step (s) | tokens/s |",
            "| --- | --- | --- |",
            f"| each model on the GPU (train.host_positions=false) | {pos['gpu_step_s']:.4f} | {pos['tokens_per_step'] / pos['gpu_step_s']:.0f} |",
            f"| once on the host, shared (default) | {pos['host_step_s']:.4f} | {pos['tokens_per_step'] / pos['host_step_s']:.0f} |",
            "",
            f"Speed-up {pos['speedup']:.2f}x; identical loss: {'yes' if pos['identical_loss'] else 'NO'}.",
            "",
        ]
    tuning = data.get("decode_tuning")
    if tuning:
        plain, tuned = tuning["p50_s"]
        lines += [
            f"Batch-1 generation by `static_compile` (the student, {tuning['prompt_tokens']}-token prompt, "
            f"{data['new_tokens']} new tokens), the step compiled with inductor's defaults and with "
            f"`generation.COMPILE_OPTIONS` = `{tuning['options']}`, p50 over the rounds:",
            "",
            "| compiled with | p50 (s) | first call, compiling included (s) | method |",
            "| --- | --- | --- | --- |",
        ]
        for name in (plain, tuned):
            lines.append(
                f"| {name} | {tuning['p50_s'][name]:.4f} | {tuning['first_call_s'][name]:.1f} | "
                f"{tuning['methods'][name]} |"
            )
        lines += [
            "",
            f"Speed-up {tuning['speedup']:.2f}x; identical tokens: {'yes' if tuning['identical_tokens'] else 'no'}; "
            f"max abs logit difference {tuning['max_abs_logit_diff']:.3g} on magnitudes up to "
            f"{tuning['max_abs_logit']:.3g}: {'within' if tuning['within_tolerance'] else 'OUTSIDE'} "
            "bf16 tolerance (2^-6 x max + 0.01).",
            "",
        ]
    att = data.get("decode_attention")
    if att:
        lines += [
            "Generation by `static` (decode steps captured, not compiled; the student, "
            f"{data['new_tokens']} new tokens), the decode steps' attention with the KV cache repeated per "
            "query head (transformers) and with the query heads grouped per KV head "
            "(hardware.grouped_decode_attention), p50 over the rounds:",
            "",
            "| batch | prompt tokens | repeated (s) | grouped (s) | speed-up | identical tokens | "
            "max abs logit diff (steps compared) | within bf16 tolerance |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in att["rows"]:
            lines.append(
                f"| {r['batch_size']} | {att['prompt_tokens'][r['batch_size']]} | {r['p50_s']['repeated']:.4f} | "
                f"{r['p50_s']['grouped']:.4f} | {r['speedup']:.2f}x | {r['identical_token_fraction']:.2f} | "
                f"{r['max_abs_logit_diff']:.3g} of {r['max_abs_logit']:.3g} ({r['compared_steps']}) | "
                f"{'yes' if r['within_tolerance'] else 'NO'} |"
            )
        lines += [
            "",
            "Logits are compared at each row's steps up to and including the first where the two ways "
            "chose different tokens (after it they continue different answers); the tolerance is "
            "2^-6 x max + 0.01.",
            "",
        ]
    pre = data.get("prefill_graph")
    if pre:
        lines += [
            f"Generation ({data['new_tokens']} new tokens), the prefill's language model run eagerly and "
            f"replayed from a CUDA graph (firstsight/inference/prefill.py; by default only up to {pre['max_tokens']} "
            "prompt tokens per batch), p50 over the rounds:",
            "",
            "| path | batch | prompt tokens | eager (s) | graph (s) | speed-up | graphs captured (s) | "
            "identical tokens | max abs logit diff |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in pre["rows"]:
            off = f" (off: {r['graph_off']})" if r["graph_off"] else ""
            lines.append(
                f"| `{r['method']}` | {r['batch_size']}{' (past the limit)' if r['over_default_limit'] else ''} | "
                f"{r['prompt_tokens']} | {r['p50_s']['eager']:.4f} | {r['p50_s']['graph']:.4f} | "
                f"{r['speedup']:.2f}x | {r['graphs_captured']} ({r['capture_s']:.2f}){off} | "
                f"{'yes' if r['identical_tokens'] else 'NO'} | {r['max_abs_logit_diff']:.3g} |"
            )
        lines.append("")
    comp = data.get("prefill_compile")
    if comp:
        lines += [
            f"Generation by `static_compile` ({data['new_tokens']} new tokens), the prefill's language-model "
            "norms and MLPs run as transformers' code and compiled (firstsight/inference/compiled_prefill.py), p50 over "
            "the rounds:",
            "",
            "| batch | prompt tokens | transformers' code (s) | compiled (s) | speed-up | queries/s (compiled) | "
            "identical tokens | max abs logit diff (steps compared) | within bf16 tolerance | methods | "
            "prepared and timed in (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in comp["rows"]:
            plain, compiled = r["p50_s"]
            fallback = "; ".join(f"{k}: {v}" for k, v in r["fallback"].items() if v)
            lines.append(
                f"| {r['batch_size']} | {r['prompt_tokens']} | {r['p50_s'][plain]:.4f} | "
                f"{r['p50_s'][compiled]:.4f} | {r['speedup']:.3f}x | {r['batch_size'] / r['p50_s'][compiled]:.1f} | "
                f"{r['identical_token_fraction']:.2f} | {r['max_abs_logit_diff']:.3g} of {r['max_abs_logit']:.3g} "
                f"({r['compared_steps']}) | {'yes' if r['within_tolerance'] else 'NO'} | "
                f"{', '.join(sorted(set(r['methods'].values())))}{' (fallback: ' + fallback + ')' if fallback else ''} | "
                f"{r['prepare_and_time_s']:.0f} |"
            )
        lines.append("")
    vis = data.get("vision_attention")
    if vis:
        lines += [
            f"The student's vision encoder ({vis['dtype']}), median over the rounds; same output: relative "
            "error of the merged output (and of the first block's qkv weight gradient) under 1e-2:",
            "",
            "| case | frames | patches | one call per frame (s) | one call for all frames (s) | speed-up | "
            "output rel. error | gradient rel. error | same |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in vis["rows"]:
            grad = "" if r["grad_relative_error"] is None else f"{r['grad_relative_error']:.2g}"
            lines.append(
                f"| {r['case']} | {r['frames']} | {r['patches']} | {r['per_frame_p50_s']:.4f} | "
                f"{r['batched_p50_s']:.4f} | {r['speedup']:.2f}x | {r['relative_error']:.2g} | {grad} | "
                f"{'yes' if r['same'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = [
        "generation",
        "positions",
        "vision_attention",
        "decode_tuning",
        "decode_attention",
        "prefill_graph",
        "prefill_compile",
    ]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument(
        "--methods", nargs="+", default=["static", "static_compile"], choices=["static", "static_compile"]
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=4, help="distillation batch")
    parser.add_argument("--batches", type=int, default=4, help="distillation batches per round")
    parser.add_argument("--prefill-frames", type=int, default=32, help="vision attention: frames encoded for answering")
    parser.add_argument("--decode-batch", type=int, default=32, help="decode attention: the larger batch")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, the tiny pair, 2 rounds: the plumbing (temp results)"
    )
    args = parser.parse_args()
    import torch

    if args.smoke:
        import tempfile

        DEVICE["name"], device = "cpu", "cpu"
        args.rounds, args.batches, args.image_size, args.new_tokens, args.methods = 2, 1, 112, 4, ["static"]
        args.prefill_frames = args.decode_batch = 4
        args.results_dir = tempfile.mkdtemp(prefix="host-work-smoke-")
        cfg = compose(
            [
                "task=distill",
                "model=tiny",
                "hardware=cpu",
                "precision=fp32",
                f"data.image_size={args.image_size}",
                "tracking.enabled=false",
            ]
        )
    else:
        device = cuda_device()
        if device == "cpu":
            print(
                "no CUDA GPU visible: these are GPU measurements (--smoke: the plumbing on this CPU)", file=sys.stderr
            )
            return 2
        cfg = compose(
            [
                "task=distill",
                "model=qwen2vl_7b_2b",
                "hardware=gpu",
                "precision=bf16",
                f"data.image_size={args.image_size}",
                "tracking.enabled=false",
                "model.student.weights=random",
                "model.teacher.weights=random",
            ]
        )
    from firstsight.models.loading import load_processor

    torch.manual_seed(cfg.seed)
    processor = load_processor(cfg.model, cfg.cache_dir)
    setup = (
        "the tiny pair on the CPU, fp32 (the plumbing only)"
        if args.smoke
        else "Qwen2-VL-7B teacher and 2B student at full size with random weights, bf16, SDPA"
    )
    data = run_meta(device, image_size=args.image_size, new_tokens=args.new_tokens, rounds=args.rounds, setup=setup)
    if "generation" in args.parts:
        data["generation"] = generation_part(cfg, processor, args)
    if "positions" in args.parts:
        data["positions"] = positions_part(cfg, processor, args)
    if "vision_attention" in args.parts:
        data["vision_attention"] = vision_attention_part(cfg, processor, args)
    if "decode_tuning" in args.parts:
        data["decode_tuning"] = decode_tuning_part(cfg, processor, args)
    if "decode_attention" in args.parts:
        data["decode_attention"] = decode_attention_part(cfg, processor, args)
    if "prefill_graph" in args.parts:
        data["prefill_graph"] = prefill_graph_part(cfg, processor, args)
    if "prefill_compile" in args.parts:
        data["prefill_compile"] = prefill_compile_part(cfg, processor, args)
    table = markdown(data)
    path = results_path(args.results_dir, "host_work", device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pair(path, {**data, "points": []}, table)
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    same = all(r["identical_tokens"] for r in data.get("generation", {}).get("rows", []))
    same = same and all(r["same"] for r in data.get("vision_attention", {}).get("rows", []))
    same = same and data.get("decode_tuning", {}).get("within_tolerance", True)
    same = same and all(r["identical_tokens"] for r in data.get("prefill_graph", {}).get("rows", []))
    same = same and all(r["within_tolerance"] for r in data.get("decode_attention", {}).get("rows", []))
    same = same and all(r["within_tolerance"] for r in data.get("prefill_compile", {}).get("rows", []))
    return 0 if same and data.get("positions", {}).get("identical_loss", True) else 1


if __name__ == "__main__":
    sys.exit(main())
