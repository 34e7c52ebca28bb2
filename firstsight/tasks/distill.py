"""The distill task: frozen teacher, trained student, alpha·T²·KD + (1−alpha)·CE on answer tokens."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from firstsight.config.record import config_record
from firstsight.config.specs import model_spec, teacher_cache_spec
from firstsight.core.errors import FirstSightError, OutOfMemory, RunFailed
from firstsight.core.job import job_output_dir, prepare_job, write_job_file
from firstsight.core.memory import is_out_of_memory as torch_out_of_memory
from firstsight.core.perf import GB, PeakMemory, ThroughputMeter, vm_hwm_bytes
from firstsight.core.runtime import device_type, torch_dtype
from firstsight.core.world import SINGLE
from firstsight.data import Blinded, load_split
from firstsight.data.batching import QACollator, ShuffledBatches, in_order
from firstsight.evaluation.accuracy import Outcomes, outcome_record, summarize, teacher_is_quantized
from firstsight.kd import paired  # paired.teacher_answer_targets: a module attribute, tests patch it
from firstsight.kd.paired import TEACHER, PairedCollator
from firstsight.kd.teacher_cache import cache_wanted, open_cache
from firstsight.losses.build import build_loss
from firstsight.losses.kd import HiddenDistillation, answer_logit_slice
from firstsight.models import loading  # loading.load_model: a module attribute, tests patch it
from firstsight.models.distributed import gathered_copy, wrap
from firstsight.models.loading import (
    compile_blocks,
    load_processor,
    load_teacher_processor,
    save_model_atomically,
    side_architecture,
)
from firstsight.models.lora import merged_model, trainable_parameters
from firstsight.models.parts import resolve_parts
from firstsight.models.positions import mrope_positions, same_rope
from firstsight.models.pretrain import model_info
from firstsight.tracking.tracker import absolute_tracking_uri, package_versions, resolve_tracking_uri
from firstsight.training.loop import LoopSettings, answer_outcomes, model_inputs, optimize
from firstsight.training.resume import Checkpointer, named_trained_tensors

log = logging.getLogger(__name__)


class Stage:
    """What the distill job is doing now, for the message of an out-of-memory error: the run owns
    one, gives it to out_of_memory_reported and to distill, which keeps `now` up to date."""

    def __init__(self, now: str = "while loading the models"):
        self.now = now


def is_out_of_memory(err: BaseException) -> bool:
    """PyTorch's out-of-memory error (CUDA), a RuntimeError saying so, the CPU allocator's failure, or Python's."""
    if isinstance(err, MemoryError) or torch_out_of_memory(err):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err).lower()  # DefaultCPUAllocator


@contextlib.contextmanager
def out_of_memory_reported(cfg: DictConfig, stage: Stage) -> Iterator[Stage]:
    """An out-of-memory error inside becomes OutOfMemory (a one-line `error:`, exit status 2, the
    run FAILED with it in firstsight.error): where (`stage`, which the job inside keeps up to date),
    the batch settings, the memory figures and what to change."""
    stage.now = "while loading the models"
    try:
        yield stage
    except Exception as err:  # noqa: BLE001 - only out-of-memory errors are turned into OutOfMemory
        if not is_out_of_memory(err):
            raise
        raise OutOfMemory(out_of_memory_message(cfg, stage.now, err)) from err


def out_of_memory_message(cfg: DictConfig, stage: str, err: BaseException) -> str:
    hw = cfg.hardware
    device = device_type(cfg.hardware)
    if device == "cuda":
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
    cfg: DictConfig,
    tracker: Any,
    resume_point: Optional[Any] = None,
    world: Optional[Any] = None,
    stage: Optional[Stage] = None,
) -> Dict[str, float]:
    """`resume_point` (firstsight.training.resume.ResumePoint): continue that checkpoint's training.
    `world` (firstsight.models.distributed.Distributed): this process's place in a data-parallel job;
    only its rank 0 gets a real tracker, writes checkpoints and saves the student. `stage`: where the
    job is, kept up to date for out_of_memory_reported (the caller's, else one of its own)."""
    recipe = DistillRecipe(cfg, tracker, resume_point, world, stage if stage is not None else Stage())
    recipe.load_models()  # the processor, the teacher (or its cache), the student
    recipe.log_models()
    recipe.build()  # the loss, the collator, the training data, data parallelism, the hidden-state term
    before = recipe.evaluate_before()  # before compiling, so the compiled blocks see only training shapes
    recipe.compile()
    loop = recipe.train()
    summary = recipe.training_figures(loop)
    summary.update(recipe.evaluate(before))
    return recipe.save(summary)


class DistillRecipe:
    """The steps of `distill`, in the order it calls them; each leaves on the recipe what the later ones use."""

    def __init__(self, cfg: DictConfig, tracker: Any, resume_point: Optional[Any], world: Optional[Any], stage: Stage):
        self.cfg, self.tracker, self.resume_point, self.stage = cfg, tracker, resume_point, stage
        self.record = config_record(cfg)  # resolved once: the checkpoints and the run record carry it
        self.models = model_spec(cfg)  # what loading the teacher and the student reads of the config
        self.world = world or SINGLE
        self.fsdp = self.world.active and cfg.hardware.data_parallel == "fsdp"
        self.device = prepare_job(cfg.hardware, cfg.seed, tracker)
        self.peak = PeakMemory(self.device)
        self.peak.reset()

    # ------------------------------------------------------------------ load

    def load_models(self) -> None:
        """The processor, the frozen teacher (or the cache of its top-k targets) and the student."""
        cfg, device = self.cfg, self.device
        self.processor = load_processor(cfg.model, cfg.cache_dir)
        # a teacher of another architecture (LLaVA-OneVision) sees the samples through its own processor
        self.teacher_processor = load_teacher_processor(cfg.model, cfg.cache_dir)
        use_cache = cache_wanted(
            cfg.teacher_cache, cfg.distill_loss
        )  # teacher_cache.enabled: the teacher's top-k targets, computed once
        if not use_cache:
            self.teacher = loading.load_model(
                self.models, "teacher", self.teacher_processor or self.processor, device, frozen=True
            )
        self.student = loading.load_model(self.models, "student", self.processor, device, frozen=False)
        self.teacher_cache = None
        if use_cache:  # a hit never loads the teacher; a miss loads it to build the cache, then frees it
            self.teacher_cache = open_cache(
                teacher_cache_spec(cfg), self.tracker, self.processor, self.student, device, self.teacher_processor
            )
            self.teacher = self.teacher_cache.teacher  # as the manifest describes it (model=None)
            if self.teacher_cache.status == "built":
                self.peak.reset()  # perf/peak_* measure the training, not the teacher pass that built the cache
        teacher, student = self.teacher, self.student
        if teacher.vocab_rows < student.vocab_rows:
            raise FirstSightError(
                f"the teacher has {teacher.vocab_rows} output rows, fewer than the student's {student.vocab_rows}: "
                "the teacher's distribution cannot cover the student's vocabulary"
            )

    def log_models(self) -> None:
        """The models' sizes and load times as model/* metrics, where they came from as tags."""
        cfg, teacher, student = self.cfg, self.teacher, self.student
        self.model_metrics = {
            "model/params_b": student.params_b,
            "model/trainable_params_b": trainable_parameters(student.model) / 1e9,
            "model/weights_gb": student.weights_gb,
            "model/teacher_params_b": teacher.params_b,
            "model/teacher_weights_gb": teacher.weights_gb,
            "model/load_time_s": student.load_time_s,
            "model/teacher_load_time_s": teacher.load_time_s,
        }
        tags = {
            "firstsight.teacher": teacher.origin,
            "firstsight.student": student.origin,
            "firstsight.teacher_architecture": side_architecture(cfg.model.teacher),
        }
        if cfg.model.teacher.source == "tiny" and cfg.model.teacher.weights.value == "pretrained":
            info = model_info(Path(teacher.origin))
            tags["firstsight.teacher_pretrain_accuracy"] = f"{info['validation_accuracy']:.4f}"
        self.tracker.set_tags(tags)
        self.tracker.log_metrics(self.model_metrics)

    # ------------------------------------------------------------------ build

    def build(self) -> None:
        """The loss, the collator, the training split, the student wrapped for data parallelism and
        the hidden-state term (None unless distill_loss.hidden_weight > 0)."""
        cfg = self.cfg
        self.loss_fn = build_loss(cfg.distill_loss)
        self.dtype = torch_dtype(cfg.precision.dtype)
        self.eval_collator = QACollator(
            self.processor,
            with_index=self.teacher_cache is not None,
            pad_to_multiple_of=cfg.hardware.pad_to_multiple_of,
        )
        self.teacher_runs = self.teacher_cache is None and self.loss_fn.uses_teacher
        # the teacher's answers to the same samples through its own processor, when it runs live
        self.teacher_collator = QACollator(self.teacher_processor) if self.teacher_processor is not None else None
        self.collator = (
            PairedCollator(self.eval_collator, self.teacher_collator)
            if self.teacher_runs and self.teacher_collator is not None
            else self.eval_collator
        )
        self.train_set = load_split(cfg.data, "train", cfg.seed, self.processor)
        if getattr(self.train_set, "skipped", 0):  # bad records left out under data.on_bad_sample=skip
            self.tracker.log_metrics({"data/skipped_samples": self.train_set.skipped})
        # several processes: DDP (or FSDP2, sharding in place) over them; else the student itself
        self.student_forward = wrap(self.world, self.student.model, self.device, cfg.hardware)
        # distill_loss.hidden_weight > 0: + hidden_weight * hidden-state term, through trained projections
        teacher_model = self.teacher.model if self.teacher_runs else None
        self.hidden_loss = build_hidden_loss(cfg, self.student.model, teacher_model, self.device)

    def compile(self) -> None:
        """hardware.compile: the student's blocks (and a live teacher's) compiled with torch.compile."""
        cfg = self.cfg
        if not cfg.hardware.compile:
            return
        settings = {
            "memory_budget": cfg.hardware.compile_memory_budget,
            "cpp_wrapper": cfg.hardware.compile_cpp_wrapper,
        }
        blocks = compile_blocks(self.student.model, **settings) + (
            compile_blocks(self.teacher.model, **settings) if self.teacher_runs else 0
        )
        log.info("hardware.compile: %d blocks compiled with torch.compile on first use", blocks)

    def kd_step(self) -> KDStep:
        """The loss of a micro-batch, for optimize."""
        cfg, student_model, teacher_model = self.cfg, self.student.model, self.teacher.model
        # the M-RoPE positions, computed once per batch on the host (firstsight/models/positions.py) and given
        # to both models, instead of each model computing them on the device with dozens of syncs
        share_positions = cfg.train.host_positions and (
            not self.teacher_runs or self.teacher_collator is not None or same_rope(student_model, teacher_model)
        )  # a teacher of another architecture takes its own inputs: the positions are the student's alone
        return KDStep(
            student_model=student_model,
            student_forward=self.student_forward,
            teacher_model=teacher_model,
            loss_fn=self.loss_fn,
            teacher_cache=self.teacher_cache,
            hidden_loss=self.hidden_loss,
            hidden_weight=cfg.distill_loss.hidden_weight,
            share_positions=share_positions,
            answer_positions_only=cfg.train.logits == "answer_positions",
            device=self.device,
        )

    # ------------------------------------------------------------------ evaluate before, train

    def evaluate_before(self) -> Optional[List[bool]]:
        """The student's answers before training, on the validation questions the end of the run
        answers (train.eval_before, not when resuming); else None."""
        cfg = self.cfg
        if not (cfg.train.eval_at_end and cfg.train.eval_before and self.resume_point is None):
            return None
        self.stage.now = "evaluating the student before training"
        eval_batch = cfg.hardware.eval_batch_size or cfg.hardware.batch_size
        validation = load_split(cfg.data, "validation", cfg.seed, self.processor)
        before = answer_outcomes(
            self.student.model, in_order(validation, self.eval_collator, eval_batch), self.device, self.dtype
        )
        self.peak.reset()  # perf/peak_* measure the training
        return before

    def train(self) -> Dict[str, Any]:
        """optimize over the training split from the start or the resume point, checkpointing as it
        goes; train_history.json on rank 0. Returns optimize's figures."""
        cfg, resume_point, world = self.cfg, self.resume_point, self.world
        kd_step = self.kd_step()
        self.steps = StepLog(cfg, self.tracker, self.stage)
        self.checkpointer = self.make_checkpointer()
        if resume_point is not None:  # the metrics of the checkpoint's step, in case no step is left to run
            self.steps.last.update({f"train/{k}": v for k, v in resume_point.state["metrics"].items()})
            self.tracker.set_tags(
                {
                    "firstsight.resumed_from": str(resume_point.path),
                    "firstsight.resumed_at_step": str(resume_point.step),
                }
            )
        self.stage.now = f"at training step {(resume_point.step if resume_point else 0) + 1} of {cfg.train.max_steps}"
        batches = ShuffledBatches(
            self.train_set,
            self.collator,
            cfg.hardware.batch_size,
            seed=cfg.seed,
            workers=cfg.hardware.dataloader_workers,
            position=resume_point.data_position if resume_point else None,
            rank=world.rank,
            world_size=world.world_size,
        )
        loop = optimize(
            self.student_forward,
            batches,
            kd_step,
            loop_settings(cfg),
            device=self.device,
            dtype=self.dtype,
            on_step=self.steps,
            # the hidden-state projections train too, but are not saved with the student (see build_hidden_loss)
            extra_parameters=self.hidden_loss.parameters() if self.hidden_loss is not None else (),
            checkpointer=self.checkpointer,
            world=world,
        )
        if world.is_main:  # the steps this process ran (a resumed job: those after its checkpoint)
            write_job_file("train_history.json", self.steps.history)
        return loop

    def make_checkpointer(self) -> Any:
        """The resumable checkpoints of the student's trained tensors and the hidden-state projections."""
        hidden = {"hidden_projection": self.hidden_loss} if self.hidden_loss else None
        return Checkpointer(
            self.cfg.train,
            self.record,
            job_output_dir(),
            named_trained_tensors(self.student.model, hidden),
            run_id=self.tracker.run_id,
            resume=self.resume_point,
            before_save=self.tracker.flush,
            writer=self.world.is_main,
            sharded_model=self.student_forward if self.fsdp else None,
        )

    def training_figures(self, loop: Dict[str, Any]) -> Dict[str, float]:
        """Throughput, peak memory and the harness's share of the step time (per process figures too
        in a data-parallel job)."""
        peak = self.peak
        summary = {**self.steps.throughput.summary(), peak.metric_name: peak.peak_gb()}
        if loop["step_seconds"] > 0:  # metric logging, MLflow flushes and the progress bar, against the steps
            summary["perf/harness_time_fraction"] = loop["harness_seconds"] / loop["step_seconds"]
        if self.world.active:  # throughput is the job's (all GPUs); memory is per process: the largest, and the sum
            summary.update(per_process_figures(self.world, summary, peak.metric_name))
        if peak.scope != "job":
            self.tracker.set_tags({"firstsight.peak_memory_scope": peak.scope})
        return summary

    # ------------------------------------------------------------------ evaluate, save

    def evaluate(self, before: Optional[List[bool]]) -> Dict[str, float]:
        """train.eval_at_end: the accuracies of teacher and student (end_of_run_accuracy); else none."""
        self.stage.now = "at the end of training (evaluating, saving)"
        if not self.cfg.train.eval_at_end:
            return {}
        return end_of_run_accuracy(
            self.cfg,
            self.tracker,
            self.processor,
            self.eval_collator,
            self.device,
            self.dtype,
            self.student.model,
            self.teacher if self.teacher_cache is None else None,
            self.teacher_cache,
            before,
            self.stage,
            self.teacher_collator,
            self.teacher_processor,
        )

    def save(self, summary: Dict[str, float]) -> Dict[str, float]:
        """The summary logged at the last step, the student saved (train.save_checkpoint), the
        resumable checkpoints discarded; returns the run's metrics."""
        cfg, tracker, world = self.cfg, self.tracker, self.world
        tracker.log_metrics(summary, step=cfg.train.max_steps)
        tracker.flush()

        # the cache's hit/miss and build time go into metrics.json too
        cache_metrics = self.teacher_cache.metrics if self.teacher_cache is not None else {}
        result = {**self.model_metrics, **cache_metrics, **self.steps.last, **summary}
        if cfg.train.save_checkpoint:
            student_model = self.student.model
            whole = gathered_copy(student_model, world.is_main) if self.fsdp else student_model  # fsdp: all take part
            if world.is_main:
                save_student(cfg, tracker, whole, self.processor, result)
        self.checkpointer.discard()  # done: a rerun in this directory starts afresh instead of resuming
        log.info("done: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
        return result


def loop_settings(cfg: DictConfig) -> Any:
    """optimize's settings from the config."""
    return LoopSettings(
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
    )


class KDStep:
    """The loss of one micro-batch for optimize: the student's forward, the teacher's targets (its
    live forward, the cache's top-k, or none for the control), the KD loss and the hidden-state term."""

    def __init__(
        self,
        student_model: Any,
        student_forward: Any,
        teacher_model: Any,
        loss_fn: Any,
        teacher_cache: Optional[Any],
        hidden_loss: Optional[Any],
        hidden_weight: float,
        share_positions: bool,
        answer_positions_only: bool,
        device: str,
    ):
        self.student_model, self.student_forward, self.teacher_model = student_model, student_forward, teacher_model
        self.loss_fn, self.teacher_cache, self.hidden_loss = loss_fn, teacher_cache, hidden_loss
        self.hidden_weight = hidden_weight
        self.share_positions, self.answer_positions_only = share_positions, answer_positions_only
        self.device = device
        self.hidden_kwargs = {"output_hidden_states": True} if hidden_loss is not None else {}

    def __call__(self, batch: Dict[str, Any], answer_tokens: int) -> Dict[str, Any]:
        # the cache's targets before the student's forward: their lookup reads the answer tokens
        # back to the host, which waits only for this batch's copy to the device, not for a forward
        cached_targets = self.teacher_cache.targets(batch) if self.teacher_cache is not None else None
        inputs, labels = step_inputs(batch, self.student_model, self.share_positions, self.answer_positions_only)
        # The frozen teacher already holds its weights in the precision's dtype (or quantized):
        # autocast is for the trainable student, and bitsandbytes' CPU kernels give NaN under it.
        student_out = self.student_forward(**inputs, **self.hidden_kwargs)
        student_logits = student_out.logits
        if cached_targets is not None:  # the cached top-k targets stand in for the teacher's logits
            teacher_logits = cached_targets
        elif (
            self.loss_fn.uses_teacher and TEACHER in batch
        ):  # another architecture: its own inputs, the answers aligned
            with torch.autocast(self.device, enabled=False):
                temperature = self.loss_fn.temperature
                teacher_logits = paired.teacher_answer_targets(
                    self.teacher_model, batch[TEACHER], student_logits.shape[-1], temperature
                )
        elif self.loss_fn.uses_teacher:
            with torch.no_grad(), torch.autocast(self.device, enabled=False):
                teacher_out = self.teacher_model(**inputs, **self.hidden_kwargs)
                teacher_logits = teacher_out.logits
        else:  # the control (distill_loss=none): plain fine-tuning needs no teacher pass
            teacher_logits = student_logits.detach()
        out = self.loss_fn(student_logits, teacher_logits, labels, num_answer_tokens=answer_tokens)
        metrics = {"loss": out.loss, "kd_loss": out.kd_loss, "ce_loss": out.ce_loss}
        if self.hidden_loss is not None:
            hidden = self.hidden_loss(
                student_out.hidden_states, teacher_out.hidden_states, batch["labels"], num_answer_tokens=answer_tokens
            )
            metrics["loss"] = out.loss + self.hidden_weight * hidden
            metrics["hidden_loss"] = hidden.detach()
        return metrics


class StepLog:
    """optimize's on_step: each step's figures to the tracker, to `history` (train_history.json) and
    to the throughput meter; `last` keeps the latest; a non-finite loss fails the run."""

    def __init__(self, cfg: DictConfig, tracker: Any, stage: Stage):
        self.cfg, self.tracker, self.stage = cfg, tracker, stage
        self.throughput = ThroughputMeter(cfg.train.throughput_warmup_steps)
        self.last: Dict[str, float] = {}
        self.history: List[Dict[str, float]] = []  # train_history.json: per-step figures without MLflow

    def __call__(self, step: int, metrics: Dict[str, float], seconds: float, samples: int, tokens: int) -> None:
        cfg, tracker = self.cfg, self.tracker
        if not math.isfinite(metrics["loss"]):
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)}, step=step)
            raise RunFailed(  # a sweep's other points still run (firstsight.suite.dispatch.exit_on_user_error)
                f"the loss is {metrics['loss']} at step {step} (kd {metrics['kd_loss']}, ce {metrics['ce_loss']}); "
                f"stopping before anything is saved. Try precision=fp32 or bf16, a lower train.lr={cfg.train.lr}, "
                f"or a smaller distill_loss.temperature={cfg.distill_loss.temperature}."
            )
        self.throughput.add_step(seconds, samples, tokens)
        named = {f"train/{k}": v for k, v in metrics.items()}
        named["perf/step_time_s"] = seconds
        tracker.log_metrics(named, step=step)
        self.last.update(named)
        self.history.append({"step": step, **named})
        if step % cfg.train.log_every_n_steps == 0:
            tracker.flush()
        self.stage.now = f"at training step {step + 1} of {cfg.train.max_steps}"


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
    stage: Optional[Stage] = None,
    teacher_collator: Optional[Any] = None,
    teacher_processor: Optional[Any] = None,
) -> Dict[str, float]:
    """Teacher-forced exact match of teacher and student on the validation split, per question:
    the accuracies with their intervals, the paired drops (against the run's teacher and, when
    that is quantized, against the teacher at full precision), the student's gain over `before`,
    and the same questions with grey frames ("is it looking?"). firstsight/evaluation/accuracy.py names them."""
    validation = load_split(cfg.data, "validation", cfg.seed, processor)
    blind = cfg.train.eval_blind

    def outcomes(model: Any, dataset: Any, model_dtype: Any, collate: Any = collator) -> List[bool]:
        return answer_outcomes(
            model,
            in_order(dataset, collate, cfg.hardware.eval_batch_size or cfg.hardware.batch_size),
            device,
            model_dtype,
        )

    teacher_collate = teacher_collator or collator  # another architecture: through its own processor
    # the teacher runs in its own dtype, without autocast, as in training
    if teacher_cache is not None:  # recorded when the cache was built (else the teacher is loaded now)
        teacher_outcomes, teacher_blind = teacher_cache.teacher_outcomes(validation, blind)
    else:
        teacher_outcomes = outcomes(teacher.model, validation, torch.float32, teacher_collate)
        teacher_blind = outcomes(teacher.model, Blinded(validation), torch.float32, teacher_collate) if blind else None
    quantized = teacher_is_quantized(resolve_parts(cfg.precision, "teacher"))
    student = outcomes(student_model, validation, dtype)
    full_precision = None
    if quantized:  # the study's drop is against the teacher unquantized: load it for the evaluation
        if stage is not None:
            stage.now = "evaluating the full-precision teacher"
        reference = loading.load_model(
            model_spec(cfg).full_precision(), "teacher", teacher_processor or processor, device, frozen=True
        )
        full_precision = outcomes(reference.model, validation, torch.float32, teacher_collate)
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
    return json.dumps(
        {
            "mlflow_run_id": tracker.run_id,
            "mlflow_tracking_uri": absolute_tracking_uri(resolve_tracking_uri(cfg.tracking))
            if cfg.tracking.enabled
            else None,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
            "config": config_record(cfg),
            "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        },
        indent=2,
    )


def save_student(cfg: DictConfig, tracker: Any, student_model: Any, processor: Any, metrics: Dict[str, float]) -> None:
    """checkpoints/student: the trained student as a plain transformers model (LoRA merged);
    with LoRA also checkpoints/student_adapter: the adapters alone (peft format)."""
    checkpoints = job_output_dir() / "checkpoints"
    extra = {RUN_RECORD: run_record(cfg, tracker, metrics)}
    tags = {}
    if cfg.lora.enabled:
        save_model_atomically(student_model, processor, str(checkpoints / "student_adapter"), extra)
        tags["firstsight.adapter_checkpoint"] = str(checkpoints / "student_adapter")
        student_model = merged_model(student_model, torch_dtype(cfg.precision.dtype))  # the base's dtype
    save_model_atomically(student_model, processor, str(checkpoints / "student"), extra)
    tags["firstsight.checkpoint"] = str(checkpoints / "student")
    tracker.set_tags(tags)
    if cfg.tracking.log_model:  # also as an MLflow model of the run (transformers flavour)
        tracker.log_model(str(checkpoints / "student"))
