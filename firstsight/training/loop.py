"""The optimisation loop shared by distillation and tiny-teacher pre-training.

One optimizer step = `grad_accum_steps` micro-batches; each micro-batch's loss is normalised by
the answer-token count of the whole accumulated batch, so their sum is the average over all
answer tokens of the step. Mixed precision: autocast to the run's dtype (GradScaler for fp16).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from firstsight.core.perf import StepTimer
from firstsight.core.signals import STOP
from firstsight.core.world import SINGLE
from firstsight.losses.kd import IGNORE_INDEX, answer_logit_slice, count_answer_tokens


@dataclass
class LoopSettings:
    max_steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    progress_bar: bool = True
    fused_optimizer: bool = False  # CUDA: torch's fused AdamW kernel (not for FSDP's sharded DTensor parameters)
    optimizer: str = "adamw"  # adamw (torch) | adamw_8bit (bitsandbytes, 8-bit moments)
    description: str = "training"


def to_device(batch: Dict[str, Any], device: str) -> Dict[str, Any]:
    """The batch's tensors on `device`; a nested batch (a teacher's own inputs) too."""
    return {
        k: v.to(device, non_blocking=True) if hasattr(v, "to") else to_device(v, device) if isinstance(v, dict) else v
        for k, v in batch.items()
    }


def autocast(device_type: str, dtype: Any) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def model_inputs(batch: Dict[str, Any]) -> Dict[str, Any]:
    # labels: for the loss; sample_index: the dataset index of each row (teacher-logit cache lookups);
    # teacher: a teacher of another architecture's own inputs (firstsight/kd/paired.py)
    return {k: v for k, v in batch.items() if k not in ("labels", "sample_index", "teacher")}


def _lr_lambda(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10 % of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(params: List[Any], settings: LoopSettings, device: str) -> Any:
    """AdamW over `params`: torch's (fused on CUDA where asked and possible) or bitsandbytes'
    AdamW8bit, whose two moments are stored in 8 bits per weight (tensors of at least 4096
    elements; smaller ones keep 32-bit moments) with the same hyper-parameters."""
    if settings.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # deferred: optional (adamw_8bit only; validation probes it)

        return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    fused = settings.fused_optimizer and device == "cuda" and not any(type(p).__name__ == "DTensor" for p in params)
    return torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, **({"fused": True} if fused else {})
    )


def optimize(
    model: Any,
    batches: Iterator[Dict[str, Any]],
    micro_step: Callable[[Dict[str, Any], int], Dict[str, Any]],
    settings: LoopSettings,
    device: str,
    dtype: Any,
    on_step: Callable[[int, Dict[str, float], float, int, int], None],
    extra_parameters: Iterable[Any] = (),
    checkpointer: Optional[Any] = None,
    world: Optional[Any] = None,
) -> Dict[str, float]:
    """Run `settings.max_steps` optimizer steps.

    `micro_step(batch, answer_tokens_in_step)` returns {"loss": differentiable tensor, other: tensors};
    `on_step(step, metrics, seconds, samples, tokens)` receives the step's summed metrics.
    `extra_parameters`: trained alongside `model`'s (same optimizer, schedule and clipping) but not
    part of it, e.g. the hidden-state distillation projections.
    `checkpointer` (firstsight.training.resume.Checkpointer): restores a resume point before the first step,
    writes resumable checkpoints after steps (with `batches.position()`); a stop signal during the
    loop (firstsight.training.resume.STOP) is acted on after the step's checkpoint.
    `world` (firstsight.models.distributed.Distributed): data-parallel over its processes; `model` is then
    the DDP-wrapped one. Each process normalises by the global batch's answer tokens and scales its
    loss by world_size before backward, so DDP's gradient average is the global batch's gradient;
    on_step gets metrics, samples and tokens summed over the processes (one all-reduce per step).

    Returns {"step_seconds": the steps' summed time, "harness_seconds": the time spent after the
    steps in on_step (metric logging, MLflow flushes) and the progress bar}: the harness overhead.
    """
    world = world or SINGLE
    opt = _Optimization.of(model, extra_parameters, settings, device, dtype)
    timer = StepTimer(device)
    first = checkpointer.restore(opt.optimizer, opt.scheduler, opt.scaler) + 1 if checkpointer is not None else 1
    bar = tqdm(
        total=settings.max_steps,
        initial=first - 1,
        desc=settings.description,
        disable=not settings.progress_bar or not world.is_main,
        dynamic_ncols=True,
        leave=True,
    )

    step_seconds = harness_seconds = 0.0
    try:
        with STOP.deferred():
            for step in range(first, settings.max_steps + 1):
                with timer:
                    micro: List[Dict[str, Any]] = [
                        to_device(next(batches), device) for _ in range(settings.grad_accum_steps)
                    ]
                    metrics, grad_norm, lr = opt.step(micro, micro_step, settings, world, device, dtype)
                metrics["grad_norm"] = float(grad_norm)
                metrics["lr"] = lr
                samples = sum(int(b["labels"].shape[0]) for b in micro)
                tokens = sum(int(b["attention_mask"].sum()) for b in micro)
                if world.active:
                    samples, tokens = _global_figures(world, metrics, samples, tokens)
                harness_start = time.perf_counter()
                on_step(step, metrics, timer.seconds, samples, tokens)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                bar.update(1)
                harness_seconds += time.perf_counter() - harness_start
                step_seconds += timer.seconds
                if checkpointer is not None and checkpointer.due(step, settings.max_steps):
                    saved = checkpointer.save(
                        step, opt.optimizer, opt.scheduler, opt.scaler, batches.position(), metrics
                    )
                    STOP.pass_on(step, saved, end_job=world.active)  # a stop signal: requeue or end the job
    finally:
        bar.close()
    return {"step_seconds": step_seconds, "harness_seconds": harness_seconds}


@dataclass
class _Optimization:
    """What one optimizer step works with: the trained parameters, the optimizer, its schedule and
    the fp16 gradient scaler."""

    params: List[Any]
    extra: List[Any]  # trained alongside the model, not part of it: averaged over the processes by hand
    optimizer: Any
    scheduler: Any
    scaler: Any
    no_sync: Callable[[], Any]  # DDP: all-reduce on the last micro-batch only

    @classmethod
    def of(cls, model: Any, extra_parameters: Iterable[Any], settings: LoopSettings, device: str, dtype: Any):
        extra = [p for p in extra_parameters if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad] + extra
        optimizer = _optimizer(params, settings, device)
        return cls(
            params=params,
            extra=extra,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(
                optimizer, _lr_lambda(settings.warmup_steps, settings.max_steps)
            ),
            scaler=torch.amp.GradScaler(device, enabled=dtype == torch.float16),  # fp16 gradients underflow unscaled
            no_sync=getattr(model, "no_sync", contextlib.nullcontext),
        )

    def step(
        self,
        micro: List[Dict[str, Any]],
        micro_step: Callable[[Dict[str, Any], int], Dict[str, Any]],
        settings: LoopSettings,
        world: Any,
        device: str,
        dtype: Any,
    ) -> Tuple[Dict[str, float], Any, float]:
        """One step over the micro-batches: backward (accumulated), clip, step, schedule. Returns the
        step's summed metrics, the gradient norm (a tensor: read after the timed step) and its lr."""
        answer_tokens = int(world.all_reduce([sum(count_answer_tokens(b["labels"]) for b in micro)])[0])
        sums = _backward(micro, micro_step, answer_tokens, self.no_sync, self.scaler, world, device, dtype)
        world.average_gradients(self.extra)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        metrics = {key: float(value) for key, value in sums.items()}  # one host sync per step
        return metrics, grad_norm, lr


def _backward(
    micro: List[Dict[str, Any]],
    micro_step: Callable[[Dict[str, Any], int], Dict[str, Any]],
    answer_tokens: int,
    no_sync: Callable[[], Any],
    scaler: Any,
    world: Any,
    device: str,
    dtype: Any,
) -> Dict[str, Any]:
    """Forward and backward of one step's micro-batches (gradients accumulate); their metrics summed."""
    sums: Dict[str, Any] = {}
    for index, batch in enumerate(micro):
        # DDP: all-reduce on the last micro-batch only
        with no_sync() if index < len(micro) - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                out = micro_step(batch, answer_tokens)
            scaler.scale(out["loss"] * world.world_size).backward()
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach()
    return sums


def _global_figures(world: Any, metrics: Dict[str, float], samples: int, tokens: int) -> Tuple[int, int]:
    """The global batch's metrics (summed over the processes, in place), samples and tokens, and one
    stop decision for all processes (one all-reduce)."""
    keys = sorted(k for k in metrics if k not in ("grad_norm", "lr"))
    *values, samples_sum, tokens_sum, stops = world.all_reduce(
        [metrics[k] for k in keys] + [samples, tokens, float(STOP.requested is not None)]
    )
    metrics.update(zip(keys, values))
    if stops and STOP.requested is None:
        STOP.requested = signal.SIGTERM  # another process was told to stop
    return int(samples_sum), int(tokens_sum)


def answer_accuracy(model: Any, batches: Iterator[Dict[str, Any]], device: str, dtype: Any) -> float:
    """Exact-match accuracy under teacher forcing (the share of `answer_outcomes` that are right)."""
    outcomes = answer_outcomes(model, batches, device, dtype)
    return sum(outcomes) / max(len(outcomes), 1)


def answer_outcomes(model: Any, batches: Iterator[Dict[str, Any]], device: str, dtype: Any) -> List[bool]:
    """Per question, in order: is it answered exactly under teacher forcing? A sample counts only
    if the argmax at every answer position (answer tokens and the closing <|im_end|>) is the
    reference token, which is exactly when greedy decoding would produce the reference answer and stop."""
    outcomes: List[bool] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            keep, labels = answer_logit_slice(batch["labels"])  # logits only where an answer token is predicted
            with autocast(device, dtype):
                logits = model(**model_inputs(batch), logits_to_keep=keep).logits
            predicted = logits[:, :-1].argmax(-1)
            labels = labels[:, 1:]
            mask = labels != IGNORE_INDEX
            outcomes.extend(bool(x) for x in ((predicted == labels) | ~mask).all(dim=1).tolist())
    model.train(was_training)
    return outcomes
