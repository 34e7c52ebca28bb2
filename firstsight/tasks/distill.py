"""The distill task: frozen teacher, trained student, alpha·T²·KD + (1−alpha)·CE on answer tokens."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from firstsight.core.errors import FirstSightError, OutOfMemory, RunFailed
from firstsight.core.job import job_output_dir, prepare_job
from firstsight.losses.build import build_loss

log = logging.getLogger(__name__)

# What the distill job is doing now, for the message of an out-of-memory error (out_of_memory_reported)
STAGE = {"now": "while loading the models"}


def is_out_of_memory(err: BaseException) -> bool:
    """PyTorch's out-of-memory error (CUDA), a RuntimeError saying so, the CPU allocator's failure, or Python's."""
    from firstsight.core.memory import is_out_of_memory as torch_out_of_memory

    if isinstance(err, MemoryError) or torch_out_of_memory(err):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err).lower()  # DefaultCPUAllocator


@contextlib.contextmanager
def out_of_memory_reported(cfg: DictConfig) -> Iterator[None]:
    """An out-of-memory error inside becomes OutOfMemory (a one-line `error:`, exit status 2, the
    run FAILED with it in firstsight.error): where (STAGE), the batch settings, the memory figures
    and what to change."""
    STAGE["now"] = "while loading the models"
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only out-of-memory errors are turned into OutOfMemory
        if not is_out_of_memory(err):
            raise
        raise OutOfMemory(out_of_memory_message(cfg, STAGE["now"], err)) from err


def out_of_memory_message(cfg: DictConfig, stage: str, err: BaseException) -> str:
    import os

    from firstsight.core.perf import GB, vm_hwm_bytes
    from firstsight.core.runtime import device_type

    hw = cfg.hardware
    device = device_type(cfg)
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        memory = (
            f"peak allocated {torch.cuda.max_memory_allocated() / GB:.2f} GB of the GPU's {total / GB:.2f} GB "
            f"(reserved now {torch.cuda.memory_reserved() / GB:.2f} GB)"
        )
    else:
        try:
            total_text = f" of the machine's {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.2f} GB"
        except (ValueError, OSError):
            total_text = ""
        memory = f"peak RSS {vm_hwm_bytes() / GB:.2f} GB{total_text}"
    tips = []
    if hw.batch_size > 1:
        tips.append(
            f"a smaller batch with more accumulation, the same effective batch: hardware.batch_size="
            f"{hw.batch_size // 2} hardware.grad_accum_steps={hw.grad_accum_steps * 2}"
        )
    if not hw.gradient_checkpointing:
        tips.append("hardware.gradient_checkpointing=true (the student's activations recomputed)")
    if not cfg.lora.enabled:
        tips.append("lora.enabled=true (LoRA: adapters train, not the whole student; with precision=nf4: QLoRA)")
    teacher_quantization = cfg.precision.teacher_quantization or cfg.precision.quantization
    if str(getattr(teacher_quantization, "value", teacher_quantization)) in ("none", "None"):
        tips.append("precision.teacher_quantization=nf4 or int8 (a quantized teacher)")
    if not tips:
        tips.append("a smaller model or a device with more memory")
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return (
        f"out of memory {stage} on {device} with hardware.batch_size={hw.batch_size} and "
        f"hardware.grad_accum_steps={hw.grad_accum_steps}: {memory}. Try {'; or '.join(tips)}. "
        f"({type(err).__name__}: {first})"
    )


def build_hidden_loss(cfg: DictConfig, student_model: Any, teacher_model: Any, device: str) -> Any:
    """The hidden-state term (firstsight.losses.kd.HiddenDistillation) when distill_loss.hidden_weight > 0,
    else None. Its projections train with the student (optimize(extra_parameters=...)) but are not
    part of it: they are not saved in the student checkpoint, which stays a stock Qwen2-VL."""
    loss = cfg.distill_loss
    if not loss.hidden_weight > 0:
        return None
    if teacher_model is None:  # validate refuses these combinations; this is a safety net
        raise FirstSightError(
            f"distill_loss.hidden_weight={loss.hidden_weight} needs the teacher's hidden states, but this run "
            "does not run the teacher (distill_loss=none or teacher_cache.enabled=true)"
        )
    from firstsight.losses.kd import HiddenDistillation

    student_text, teacher_text = student_model.config.get_text_config(), teacher_model.config.get_text_config()
    try:
        hidden = HiddenDistillation(
            student_width=int(student_text.hidden_size),
            teacher_width=int(teacher_text.hidden_size),
            student_layers=int(student_text.num_hidden_layers),
            teacher_layers=int(teacher_text.num_hidden_layers),
            layers=[int(i) for i in loss.hidden_layers],
            kind=str(loss.hidden_loss),
        )
    except ValueError as error:
        raise FirstSightError(f"distill_loss.hidden_layers={list(loss.hidden_layers)}: {error}") from error
    log.info(
        "hidden-state distillation: %s, weight %s, (student, teacher) layer pairs %s",
        loss.hidden_loss,
        loss.hidden_weight,
        hidden.pairs,
    )
    return hidden.to(device)  # float32 master weights, like the student's


def step_inputs(
    batch: Dict[str, Any], model: Any, host_positions: bool, answer_positions_only: bool
) -> Tuple[Dict[str, Any], Any]:
    """The inputs of a training forward on `batch` (for the student, and the teacher when it runs
    live) and the labels the loss then takes. `host_positions`: Qwen2-VL's M-RoPE positions computed
    once, on the host, from `model` (firstsight/models/positions.py); `answer_positions_only`: the output
    heads run only where a loss is taken (the labels sliced to match, losses.answer_logit_slice)."""
    from firstsight.losses.kd import answer_logit_slice
    from firstsight.models.positions import mrope_positions
    from firstsight.training.loop import model_inputs

    # use_cache=False: a training forward reads no KV cache, and building one per layer (the
    # models' config default) is wasted work that torch.compile also guards on, layer by layer
    inputs = {**model_inputs(batch), "use_cache": False}
    if host_positions:
        positions = mrope_positions(model, batch)
        if positions is not None:
            inputs["position_ids"] = positions
    labels = batch["labels"]
    if answer_positions_only:
        keep, labels = answer_logit_slice(labels)
        inputs["logits_to_keep"] = keep
    return inputs, labels


def distill(
    cfg: DictConfig, tracker: Any, resume_point: Optional[Any] = None, world: Optional[Any] = None
) -> Dict[str, float]:
    """`resume_point` (firstsight.training.resume.ResumePoint): continue that checkpoint's training.
    `world` (firstsight.models.distributed.Distributed): this process's place in a data-parallel job;
    only its rank 0 gets a real tracker, writes checkpoints and saves the student."""
    import torch

    from firstsight.core.perf import PeakMemory, ThroughputMeter
    from firstsight.core.runtime import torch_dtype
    from firstsight.data import load_split
    from firstsight.data.batching import QACollator, ShuffledBatches, in_order
    from firstsight.models.loading import load_model, load_processor
    from firstsight.training.loop import LoopSettings, optimize

    device = prepare_job(cfg, tracker)
    peak = PeakMemory(device)
    peak.reset()

    processor = load_processor(cfg)
    from firstsight.kd.teacher_cache import cache_wanted, open_cache

    use_cache = cache_wanted(cfg)  # teacher_cache.enabled: the teacher's top-k targets, computed once
    if not use_cache:
        teacher = load_model(cfg, "teacher", processor, device, frozen=True)
    student = load_model(cfg, "student", processor, device, frozen=False)
    teacher_cache = None
    if use_cache:  # a hit never loads the teacher; a miss loads it to build the cache, then frees it
        teacher_cache = open_cache(cfg, tracker, processor, student, device)
        teacher = teacher_cache.teacher  # as the manifest describes it (model=None)
        if teacher_cache.status == "built":
            peak.reset()  # perf/peak_* measure the training, not the teacher pass that built the cache
    if teacher.vocab_rows < student.vocab_rows:
        raise FirstSightError(
            f"the teacher has {teacher.vocab_rows} output rows, fewer than the student's {student.vocab_rows}: "
            "the teacher's distribution cannot cover the student's vocabulary"
        )
    from firstsight.models.lora import trainable_parameters

    model_metrics = {
        "model/params_b": student.params_b,
        "model/trainable_params_b": trainable_parameters(student.model) / 1e9,
        "model/weights_gb": student.weights_gb,
        "model/teacher_params_b": teacher.params_b,
        "model/teacher_weights_gb": teacher.weights_gb,
        "model/load_time_s": student.load_time_s,
        "model/teacher_load_time_s": teacher.load_time_s,
    }
    tags = {"firstsight.teacher": teacher.origin, "firstsight.student": student.origin}
    if cfg.model.teacher.source == "tiny" and cfg.model.teacher.weights.value == "pretrained":
        from firstsight.models.pretrain import model_info

        info = model_info(Path(teacher.origin))
        tags["firstsight.teacher_pretrain_accuracy"] = f"{info['validation_accuracy']:.4f}"
    tracker.set_tags(tags)
    tracker.log_metrics(model_metrics)

    loss_fn = build_loss(cfg.distill_loss)
    dtype = torch_dtype(cfg.precision.dtype)
    collator = QACollator(
        processor, with_index=teacher_cache is not None, pad_to_multiple_of=cfg.hardware.pad_to_multiple_of
    )
    train_set = load_split(cfg.data, "train", cfg.seed, processor)
    if getattr(train_set, "skipped", 0):  # bad records left out under data.on_bad_sample=skip
        tracker.log_metrics({"data/skipped_samples": train_set.skipped})
    teacher_model, student_model = teacher.model, student.model
    from firstsight.core.world import SINGLE

    world = world or SINGLE
    fsdp = world.active and cfg.hardware.data_parallel == "fsdp"
    # several processes: DDP (or FSDP2, sharding in place) over them; else the student itself
    from firstsight.models.distributed import wrap

    student_forward = wrap(world, student_model, device, cfg.hardware.data_parallel)
    # distill_loss.hidden_weight > 0: + hidden_weight * hidden-state term, through trained projections
    teacher_runs = teacher_cache is None and loss_fn.uses_teacher
    hidden_loss = build_hidden_loss(cfg, student_model, teacher_model if teacher_runs else None, device)
    hidden_kwargs = {"output_hidden_states": True} if hidden_loss is not None else {}
    # the student's accuracy before training, on the validation questions the end of the run answers
    # (before any block is compiled, so the compiled blocks see only training shapes)
    before = None
    if cfg.train.eval_at_end and cfg.train.eval_before and resume_point is None:
        from firstsight.training.loop import answer_outcomes

        STAGE["now"] = "evaluating the student before training"
        eval_batch = cfg.hardware.eval_batch_size or cfg.hardware.batch_size
        validation = load_split(cfg.data, "validation", cfg.seed, processor)
        before = answer_outcomes(student_model, in_order(validation, collator, eval_batch), device, dtype)
        peak.reset()  # perf/peak_* measure the training
    if cfg.hardware.compile:
        from firstsight.models.loading import compile_blocks

        settings = {
            "memory_budget": cfg.hardware.compile_memory_budget,
            "cpp_wrapper": cfg.hardware.compile_cpp_wrapper,
        }
        blocks = compile_blocks(student_model, **settings) + (
            compile_blocks(teacher_model, **settings) if teacher_runs else 0
        )
        log.info("hardware.compile: %d blocks compiled with torch.compile on first use", blocks)

    answer_positions_only = cfg.train.logits == "answer_positions"
    from firstsight.models.positions import same_rope

    # the M-RoPE positions, computed once per batch on the host (firstsight/models/positions.py) and given
    # to both models, instead of each model computing them on the device with dozens of syncs
    share_positions = cfg.train.host_positions and (not teacher_runs or same_rope(student_model, teacher_model))

    def kd_step(batch: Dict[str, Any], answer_tokens: int) -> Dict[str, Any]:
        # the cache's targets before the student's forward: their lookup reads the answer tokens
        # back to the host, which waits only for this batch's copy to the device, not for a forward
        cached_targets = teacher_cache.targets(batch) if teacher_cache is not None else None
        inputs, labels = step_inputs(batch, student_model, share_positions, answer_positions_only)
        # The frozen teacher already holds its weights in the precision's dtype (or quantized):
        # autocast is for the trainable student, and bitsandbytes' CPU kernels give NaN under it.
        student_out = student_forward(**inputs, **hidden_kwargs)
        student_logits = student_out.logits
        if cached_targets is not None:  # the cached top-k targets stand in for the teacher's logits
            teacher_logits = cached_targets
        elif loss_fn.uses_teacher:
            with torch.no_grad(), torch.autocast(device, enabled=False):
                teacher_out = teacher_model(**inputs, **hidden_kwargs)
                teacher_logits = teacher_out.logits
        else:  # the control (distill_loss=none): plain fine-tuning needs no teacher pass
            teacher_logits = student_logits.detach()
        out = loss_fn(student_logits, teacher_logits, labels, num_answer_tokens=answer_tokens)
        metrics = {"loss": out.loss, "kd_loss": out.kd_loss, "ce_loss": out.ce_loss}
        if hidden_loss is not None:
            hidden = hidden_loss(
                student_out.hidden_states, teacher_out.hidden_states, batch["labels"], num_answer_tokens=answer_tokens
            )
            metrics["loss"] = out.loss + cfg.distill_loss.hidden_weight * hidden
            metrics["hidden_loss"] = hidden.detach()
        return metrics

    throughput = ThroughputMeter(cfg.train.throughput_warmup_steps)
    last: Dict[str, float] = {}
    history: List[Dict[str, float]] = []  # train_history.json: per-step figures without MLflow

    def on_step(step: int, metrics: Dict[str, float], seconds: float, samples: int, tokens: int) -> None:
        if not math.isfinite(metrics["loss"]):
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)}, step=step)
            raise RunFailed(  # a sweep's other points still run (firstsight.suite.dispatch.exit_on_user_error)
                f"the loss is {metrics['loss']} at step {step} (kd {metrics['kd_loss']}, ce {metrics['ce_loss']}); "
                f"stopping before anything is saved. Try precision=fp32 or bf16, a lower train.lr={cfg.train.lr}, "
                f"or a smaller distill_loss.temperature={cfg.distill_loss.temperature}."
            )
        throughput.add_step(seconds, samples, tokens)
        named = {f"train/{k}": v for k, v in metrics.items()}
        named["perf/step_time_s"] = seconds
        tracker.log_metrics(named, step=step)
        last.update(named)
        history.append({"step": step, **named})
        if step % cfg.train.log_every_n_steps == 0:
            tracker.flush()
        STAGE["now"] = f"at training step {step + 1} of {cfg.train.max_steps}"

    from firstsight.training.resume import Checkpointer, named_trained_tensors

    checkpointer = Checkpointer(
        cfg,
        job_output_dir(),
        named_trained_tensors(student_model, {"hidden_projection": hidden_loss} if hidden_loss else None),
        run_id=tracker.run_id,
        resume=resume_point,
        before_save=tracker.flush,
        writer=world.is_main,
        sharded_model=student_forward if fsdp else None,
    )
    if resume_point is not None:  # the metrics of the checkpoint's step, in case no step is left to run
        last.update({f"train/{k}": v for k, v in resume_point.state["metrics"].items()})
        tracker.set_tags(
            {"firstsight.resumed_from": str(resume_point.path), "firstsight.resumed_at_step": str(resume_point.step)}
        )
    STAGE["now"] = f"at training step {(resume_point.step if resume_point else 0) + 1} of {cfg.train.max_steps}"
    loop = optimize(
        student_forward,
        ShuffledBatches(
            train_set,
            collator,
            cfg.hardware.batch_size,
            seed=cfg.seed,
            workers=cfg.hardware.dataloader_workers,
            position=resume_point.data_position if resume_point else None,
            rank=world.rank,
            world_size=world.world_size,
        ),
        kd_step,
        LoopSettings(
            max_steps=cfg.train.max_steps,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            warmup_steps=cfg.train.warmup_steps,
            max_grad_norm=cfg.train.max_grad_norm,
            grad_accum_steps=cfg.hardware.grad_accum_steps,
            progress_bar=cfg.train.progress_bar,
            fused_optimizer=cfg.train.fused_optimizer,
            optimizer=cfg.train.optimizer,
            description=f"distilling ({cfg.distill_loss.name}, {cfg.precision.name})",
        ),
        device=device,
        dtype=dtype,
        on_step=on_step,
        # the hidden-state projections train too, but are not saved with the student (see build_hidden_loss)
        extra_parameters=hidden_loss.parameters() if hidden_loss is not None else (),
        checkpointer=checkpointer,
        world=world,
    )
    if world.is_main:  # the steps this process ran (a resumed job: those after its checkpoint)
        from firstsight.core.job import write_job_file

        write_job_file("train_history.json", history)
    summary = {**throughput.summary(), peak.metric_name: peak.peak_gb()}
    if loop["step_seconds"] > 0:  # metric logging, MLflow flushes and the progress bar, against the steps
        summary["perf/harness_time_fraction"] = loop["harness_seconds"] / loop["step_seconds"]
    if world.active:  # throughput is the job's (all GPUs); memory is per process: the largest, and the sum
        summary.update(per_process_figures(world, summary, peak.metric_name))
    if peak.scope != "job":
        tracker.set_tags({"firstsight.peak_memory_scope": peak.scope})

    STAGE["now"] = "at the end of training (evaluating, saving)"
    if cfg.train.eval_at_end:
        summary.update(
            end_of_run_accuracy(
                cfg,
                tracker,
                processor,
                collator,
                device,
                dtype,
                student_model,
                teacher if teacher_cache is None else None,
                teacher_cache,
                before,
            )
        )
    tracker.log_metrics(summary, step=cfg.train.max_steps)
    tracker.flush()

    # the cache's hit/miss and build time go into metrics.json too
    cache_metrics = teacher_cache.metrics if teacher_cache is not None else {}
    result = {**model_metrics, **cache_metrics, **last, **summary}
    if cfg.train.save_checkpoint:
        from firstsight.models.distributed import gathered_copy

        whole = gathered_copy(student_model, world.is_main) if fsdp else student_model  # fsdp: all take part
        if world.is_main:
            save_student(cfg, tracker, whole, processor, result)
    checkpointer.discard()  # done: a rerun in this directory starts afresh instead of resuming
    log.info("done: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
    return result


def end_of_run_accuracy(
    cfg: DictConfig,
    tracker: Any,
    processor: Any,
    collator: Any,
    device: str,
    dtype: Any,
    student_model: Any,
    teacher: Optional[Any],
    teacher_cache: Optional[Any],
    before: Optional[List[bool]],
) -> Dict[str, float]:
    """Teacher-forced exact match of teacher and student on the validation split, per question:
    the accuracies with their intervals, the paired drops (against the run's teacher and, when
    that is quantized, against the teacher at full precision), the student's gain over `before`,
    and the same questions with grey frames ("is it looking?"). firstsight/evaluation/accuracy.py names them."""
    import torch

    from firstsight.data import Blinded, load_split
    from firstsight.data.batching import in_order
    from firstsight.evaluation.accuracy import (
        Outcomes,
        full_precision_config,
        outcome_record,
        summarize,
        teacher_is_quantized,
    )
    from firstsight.models.parts import resolve_parts
    from firstsight.training.loop import answer_outcomes

    validation = load_split(cfg.data, "validation", cfg.seed, processor)
    blind = cfg.train.eval_blind

    def outcomes(model: Any, dataset: Any, model_dtype: Any) -> List[bool]:
        return answer_outcomes(
            model,
            in_order(dataset, collator, cfg.hardware.eval_batch_size or cfg.hardware.batch_size),
            device,
            model_dtype,
        )

    # the teacher runs in its own dtype, without autocast, as in training
    if teacher_cache is not None:  # recorded when the cache was built (else the teacher is loaded now)
        teacher_outcomes, teacher_blind = teacher_cache.teacher_outcomes(validation, blind)
    else:
        teacher_outcomes = outcomes(teacher.model, validation, torch.float32)
        teacher_blind = outcomes(teacher.model, Blinded(validation), torch.float32) if blind else None
    quantized = teacher_is_quantized(resolve_parts(cfg, "teacher"))
    student = outcomes(student_model, validation, dtype)
    full_precision = None
    if quantized:  # the study's drop is against the teacher unquantized: load it for the evaluation
        from firstsight.models.loading import load_model

        STAGE["now"] = "evaluating the full-precision teacher"
        reference = load_model(full_precision_config(cfg), "teacher", processor, device, frozen=True)
        full_precision = outcomes(reference.model, validation, torch.float32)
        del reference
    result = Outcomes(
        teacher=teacher_outcomes,
        student=student,
        chance=validation.chance_accuracy(),
        full_precision_teacher=full_precision,
        teacher_blind=teacher_blind,
        student_blind=outcomes(student_model, Blinded(validation), dtype) if blind else None,
        student_before=before,
    )
    metrics, lines, verdict = summarize(result)
    for line in lines:
        (log.warning if line.startswith("WARNING") else log.info)(line.removeprefix("WARNING: "))
    if verdict is not None:
        tracker.set_tags({"firstsight.accuracy_verdict": str(verdict)})
    from firstsight.core.job import write_job_file

    kinds = [validation.kind_of(i) if hasattr(validation, "kind_of") else "" for i in range(len(validation))]
    write_job_file("eval_outcomes.json", outcome_record(kinds, result))
    return metrics


def per_process_figures(world: Any, summary: Dict[str, float], peak_name: str) -> Dict[str, float]:
    """A data-parallel job's memory and per-GPU throughput: `peak_name` becomes the largest peak of
    any process (what each GPU must hold), `<peak_name>_all_processes` their sum, and the job's
    throughputs (already summed over processes) also divided per process."""
    figures = {f"{k}_per_process": v / world.world_size for k, v in summary.items() if k.startswith("perf/throughput_")}
    peak = summary[peak_name]
    figures[peak_name] = world.all_reduce([peak], op="max")[0]
    figures[f"{peak_name}_all_processes"] = world.all_reduce([peak])[0]
    figures["perf/processes"] = float(world.world_size)
    return figures


RUN_RECORD = "firstsight_run.json"  # beside a saved student: what made it (read by the export task)


def run_record(cfg: DictConfig, tracker: Any, metrics: Dict[str, float]) -> str:
    """JSON of the run that made a checkpoint: its MLflow run, resolved config and final metrics."""
    import datetime
    import json

    from firstsight.tracking.tracker import absolute_tracking_uri, package_versions, resolve_tracking_uri

    return json.dumps(
        {
            "mlflow_run_id": tracker.run_id,
            "mlflow_tracking_uri": absolute_tracking_uri(resolve_tracking_uri(cfg)) if cfg.tracking.enabled else None,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        },
        indent=2,
    )


def save_student(cfg: DictConfig, tracker: Any, student_model: Any, processor: Any, metrics: Dict[str, float]) -> None:
    """checkpoints/student: the trained student as a plain transformers model (LoRA merged);
    with LoRA also checkpoints/student_adapter: the adapters alone (peft format)."""
    from firstsight.models.loading import save_model_atomically

    checkpoints = job_output_dir() / "checkpoints"
    extra = {RUN_RECORD: run_record(cfg, tracker, metrics)}
    tags = {}
    if cfg.lora.enabled:
        from firstsight.models.lora import merged_model

        save_model_atomically(student_model, processor, str(checkpoints / "student_adapter"), extra)
        tags["firstsight.adapter_checkpoint"] = str(checkpoints / "student_adapter")
        from firstsight.core.runtime import torch_dtype

        student_model = merged_model(student_model, torch_dtype(cfg.precision.dtype))  # the base's dtype
    save_model_atomically(student_model, processor, str(checkpoints / "student"), extra)
    tags["firstsight.checkpoint"] = str(checkpoints / "student")
    tracker.set_tags(tags)
    if cfg.tracking.log_model:  # also as an MLflow model of the run (transformers flavour)
        tracker.log_model(str(checkpoints / "student"))
