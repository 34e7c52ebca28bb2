"""The profile task: what one model costs at inference.

Load time, weights memory and parameters as loaded; single-query latency (p50/p90 over
`task.latency_queries` timed queries after `task.warmup_queries` untimed ones); batched throughput
(queries and generated tokens per second over `task.throughput_batches` timed batches after one
untimed batch); peak memory. Every query generates exactly `task.new_tokens` tokens greedily (the
end token is suppressed until then), so runs of different precisions compare. Decoding is
`hardware.generation` (firstsight/inference/generation.py): `static` (default; a static KV cache, the decode
step replayed as a CUDA graph on CUDA, captured before the timed queries for the longest prompt
they hold) or `hf` (transformers' `model.generate`, the naive baseline); the method used is the
tag `firstsight.generation` (static_cuda_graph | static_eager | hf_generate).

Per part (firstsight/models/parts.py): the resolved precision as tags `firstsight.precision.<part>.dtype`
/ `.quantization`, and the weights as loaded as `model/weights_gb/<part>` (vision, merger, language).
Under `hardware.memory_budget_gb` the whole profile (loading included) runs within the budget and
the run records whether it fits (firstsight/core/memory.py): edge/fits, edge/peak_gb, edge/headroom_gb.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from firstsight.config.specs import model_spec
from firstsight.core import memory  # memory.apply_memory_budget: a module attribute, tests patch it
from firstsight.core.job import prepare_job
from firstsight.core.memory import budget_of, describe, run_within_budget
from firstsight.core.perf import PeakMemory, StepTimer
from firstsight.data import load_split
from firstsight.data.batching import PromptCollator
from firstsight.inference.generation import HF_GENERATE, decoder_for, generation_tags
from firstsight.models import loading  # loading.load_model: a module attribute, tests patch it
from firstsight.models.loading import load_processor, load_teacher_processor
from firstsight.models.parts import precision_tags
from firstsight.training.loop import to_device

log = logging.getLogger(__name__)


def profile(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    task = cfg.task
    target = task.target.value if hasattr(task.target, "value") else str(task.target)
    device = prepare_job(cfg.hardware, cfg.seed, tracker)
    tracker.set_tags({"firstsight.profile_target": target})
    budget = budget_of(cfg.hardware)
    if budget is not None:  # capped before anything is loaded
        basis, cap_tags = memory.apply_memory_budget(budget, device)
        tracker.set_tags(cap_tags)
    peak = PeakMemory(device)
    peak.reset()

    processor = load_processor(cfg.model, cfg.cache_dir)
    if target == "teacher":  # a teacher of another architecture reads the questions through its own processor
        processor = load_teacher_processor(cfg.model, cfg.cache_dir) or processor
    metrics: Dict[str, float] = {}
    stage = ["loading"]
    if budget is None:
        _measure(cfg, tracker, processor, device, target, metrics, stage)
    else:
        done, edge = run_within_budget(
            lambda: _measure(cfg, tracker, processor, device, target, metrics, stage),
            budget,
            basis,
            peak.peak_gb,
            lambda: stage[0],
        )
        tracker.set_tags(edge.tags)
        metrics.update(edge.metrics)
        log.info(describe(edge))
        if done is None:  # out of memory: what was measured before it, and the verdict
            tracker.log_metrics(metrics)
            tracker.flush()
            return metrics
    # under a budget, the very figure the verdict judged (a second reading could be a little higher)
    metrics[peak.metric_name] = metrics.get("edge/peak_gb", peak.peak_gb())
    if peak.scope != "job":
        tracker.set_tags({"firstsight.peak_memory_scope": peak.scope})
    tracker.log_metrics(metrics)
    tracker.flush()
    log.info("done: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def _measure(
    cfg: DictConfig, tracker: Any, processor: Any, device: str, target: str, metrics: Dict[str, float], stage: List[str]
) -> bool:
    """Load the model under test and time it, adding to `metrics` as figures come (so that an
    out-of-memory part-way keeps what was measured); `stage[0]` says what is running."""
    task = cfg.task
    loaded = loading.load_model(model_spec(cfg), target, processor, device, frozen=True)
    stage[0] = "profiling"
    architecture = {f"firstsight.{target}_architecture": loaded.model.config.model_type}
    tracker.set_tags({f"firstsight.{target}": loaded.origin, **architecture, **precision_tags(loaded.parts)})
    metrics.update(
        {
            "infer/load_time_s": loaded.load_time_s,
            "model/params_b": loaded.params_b,
            "model/weights_gb": loaded.weights_gb,
            **{f"model/weights_gb/{part}": gb for part, gb in loaded.part_weights_gb.items()},
        }
    )
    model = loaded.model
    queries = load_split(cfg.data, "validation", cfg.seed, processor)
    collate = PromptCollator(processor)
    decoder = decoder_for(model, cfg.hardware.generation)  # firstsight/inference/generation.py: static (default) | hf
    pad = processor.tokenizer.pad_token_id
    single = task.warmup_queries + task.latency_queries
    batched = task.throughput_batches + 1
    next_index = iter(range(10**9))

    def take(n: int) -> Dict[str, Any]:
        return to_device(collate([queries[next(next_index) % len(queries)] for _ in range(n)]), device)

    _prepare_decoder(decoder, queries, collate, single, batched, task.throughput_batch_size, task.new_tokens)
    timer = StepTimer(device)

    def timed_generation(batch: Dict[str, Any]) -> float:
        with timer, torch.no_grad():
            out = decoder.generate(batch, task.new_tokens, task.new_tokens, pad_token_id=pad).tokens
        generated = out.shape[1]
        if generated != task.new_tokens:  # the comparison is void if lengths differ
            raise RuntimeError(f"generated {generated} tokens, expected {task.new_tokens}")
        return timer.seconds

    total = single + batched
    bar = tqdm(total=total, desc=f"profiling {target} ({cfg.precision.name})", disable=not cfg.train.progress_bar)
    latencies: List[float] = []
    for i in range(task.warmup_queries + task.latency_queries):
        seconds = timed_generation(take(1))
        if i >= task.warmup_queries:
            latencies.append(seconds)
        bar.update(1)
    metrics["infer/latency_p50_s"] = float(np.percentile(latencies, 50))
    metrics["infer/latency_p90_s"] = float(np.percentile(latencies, 90))
    timed_generation(take(task.throughput_batch_size))  # untimed: allocations at this batch size
    bar.update(1)
    batch_seconds = []
    for _ in range(task.throughput_batches):
        batch_seconds.append(timed_generation(take(task.throughput_batch_size)))
        bar.update(1)
    bar.close()

    queries_per_s = task.throughput_batch_size * task.throughput_batches / sum(batch_seconds)
    metrics["infer/throughput_qps"] = queries_per_s
    metrics["infer/throughput_tokens_per_s"] = queries_per_s * task.new_tokens
    tracker.set_tags(generation_tags(decoder))
    return True


def _prepare_decoder(
    decoder: Any, queries: Any, collate: Any, single: int, batched: int, batch_size: int, new_tokens: int
) -> None:
    """Before anything is timed: the static decoder's caches (and on CUDA its captured decode
    steps) for the longest prompt of the single queries and of the batches this profile will
    time, then on CUDA each of their prefills once, capturing the graphs a prefill replays (the
    vision encoder's per frame grid, the language model's per prompt shape), so that no timed
    query pays a capture. The prompts come from collating the same queries `take` will (a batch
    is collated whole only when a graph may serve it)."""
    if decoder.tag == HF_GENERATE:
        return
    lengths, patches, singles = [], [], []
    for i in range(single + batched * batch_size):
        prompt = collate([queries[i % len(queries)]])
        lengths.append(prompt["input_ids"].shape[1])
        patches.append(prompt["pixel_values"].shape[0] if prompt.get("pixel_values") is not None else 0)
        if i < single:
            singles.append(prompt)
    decoder.reserve(1, max(lengths[:single]), new_tokens)
    decoder.reserve(batch_size, max(lengths[single:]), new_tokens)  # left padding: a batch is as long as its longest
    if not decoder.prefill_graphs():
        return
    for prompt in singles:
        decoder.reserve_prefill(prompt, new_tokens)
    for start in range(single, len(lengths), batch_size):
        rows = range(start, start + batch_size)
        if (
            sum(patches[i] for i in rows) <= decoder.vision_graphs.max_patches
            or batch_size * max(lengths[i] for i in rows) <= decoder.language_graphs.max_tokens
        ):
            decoder.reserve_prefill(collate([queries[i % len(queries)] for i in rows]), new_tokens)
