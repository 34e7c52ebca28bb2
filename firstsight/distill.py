"""The distill task: frozen teacher, trained student, alpha·T²·KD + (1−alpha)·CE on answer tokens."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from firstsight.errors import FirstSightError
from firstsight.job import job_output_dir, prepare_job

log = logging.getLogger(__name__)


def build_loss(cfg: DictConfig) -> Any:
    from hydra.utils import instantiate

    loss_cfg = OmegaConf.to_container(cfg.distill_loss, resolve=True)
    loss_cfg.pop("name")
    return instantiate(loss_cfg)


def distill(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    import torch

    from firstsight.data import synthetic_split
    from firstsight.data.batching import QACollator, batches, in_order
    from firstsight.models import check_same_tokenizer, load_model, load_processor, save_model_atomically, torch_dtype
    from firstsight.perf import PeakMemory, ThroughputMeter
    from firstsight.train import LoopSettings, answer_accuracy, model_inputs, optimize

    device = prepare_job(cfg, tracker)
    peak = PeakMemory(device)
    peak.reset()

    processor = load_processor(cfg)
    check_same_tokenizer(cfg, processor)
    teacher = load_model(cfg, "teacher", processor, device, frozen=True)
    student = load_model(cfg, "student", processor, device, frozen=False)
    if teacher.vocab_rows < student.vocab_rows:
        raise FirstSightError(
            f"the teacher has {teacher.vocab_rows} output rows, fewer than the student's {student.vocab_rows}: "
            "the teacher's distribution cannot cover the student's vocabulary"
        )
    model_metrics = {
        "model/params_b": student.params_b,
        "model/weights_gb": student.weights_gb,
        "model/teacher_params_b": teacher.params_b,
        "model/teacher_weights_gb": teacher.weights_gb,
        "model/load_time_s": student.load_time_s,
        "model/teacher_load_time_s": teacher.load_time_s,
    }
    tags = {"firstsight.teacher": teacher.origin, "firstsight.student": student.origin}
    if cfg.model.teacher.source == "tiny" and cfg.model.teacher.weights.value == "pretrained":
        from firstsight.pretrain import teacher_info

        info = teacher_info(Path(teacher.origin))
        tags["firstsight.teacher_pretrain_accuracy"] = f"{info['validation_accuracy']:.4f}"
    tracker.set_tags(tags)
    tracker.log_metrics(model_metrics)

    loss_fn = build_loss(cfg)
    dtype = torch_dtype(cfg.precision.dtype)
    collator = QACollator(processor)
    train_set = synthetic_split(cfg.data, "train", cfg.seed)
    teacher_model, student_model = teacher.model, student.model

    def kd_step(batch: Dict[str, Any], answer_tokens: int) -> Dict[str, Any]:
        inputs = model_inputs(batch)
        # The frozen teacher already holds its weights in the precision's dtype (or quantized):
        # autocast is for the trainable student, and bitsandbytes' CPU kernels give NaN under it.
        student_logits = student_model(**inputs).logits
        if loss_fn.uses_teacher:
            with torch.no_grad(), torch.autocast(device, enabled=False):
                teacher_logits = teacher_model(**inputs).logits
        else:  # the control (distill_loss=none): plain fine-tuning needs no teacher pass
            teacher_logits = student_logits.detach()
        out = loss_fn(student_logits, teacher_logits, batch["labels"], num_answer_tokens=answer_tokens)
        return {"loss": out.loss, "kd_loss": out.kd_loss, "ce_loss": out.ce_loss}

    throughput = ThroughputMeter(cfg.train.throughput_warmup_steps)
    last: Dict[str, float] = {}

    def on_step(step: int, metrics: Dict[str, float], seconds: float, samples: int, tokens: int) -> None:
        if not math.isfinite(metrics["loss"]):
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)}, step=step)
            raise FirstSightError(
                f"the loss is {metrics['loss']} at step {step} (kd {metrics['kd_loss']}, ce {metrics['ce_loss']}); "
                f"stopping before anything is saved. Try precision=fp32 or bf16, a lower train.lr={cfg.train.lr}, "
                f"or a smaller distill_loss.temperature={cfg.distill_loss.temperature}."
            )
        throughput.add_step(seconds, samples, tokens)
        named = {f"train/{k}": v for k, v in metrics.items()}
        named["perf/step_time_s"] = seconds
        tracker.log_metrics(named, step=step)
        last.update(named)
        if step % cfg.train.log_every_n_steps == 0:
            tracker.flush()

    optimize(
        student_model,
        batches(train_set, collator, cfg.hardware.batch_size, seed=cfg.seed, workers=cfg.hardware.dataloader_workers),
        kd_step,
        LoopSettings(
            max_steps=cfg.train.max_steps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            warmup_steps=cfg.train.warmup_steps, max_grad_norm=cfg.train.max_grad_norm,
            grad_accum_steps=cfg.hardware.grad_accum_steps, progress_bar=cfg.train.progress_bar,
            description=f"distilling ({cfg.distill_loss.name}, {cfg.precision.name})",
        ),
        device=device,
        dtype=dtype,
        on_step=on_step,
    )
    summary = {**throughput.summary(), peak.metric_name: peak.peak_gb()}
    if peak.scope != "job":
        tracker.set_tags({"firstsight.peak_memory_scope": peak.scope})

    if cfg.train.eval_at_end:
        validation = synthetic_split(cfg.data, "validation", cfg.seed)
        eval_batches = lambda: in_order(validation, collator, cfg.hardware.batch_size)  # noqa: E731
        # the teacher runs in its own dtype, without autocast, as in training
        teacher_acc = answer_accuracy(teacher_model, eval_batches(), device, torch.float32)
        student_acc = answer_accuracy(student_model, eval_batches(), device, dtype)
        summary.update({
            "eval/teacher_accuracy": teacher_acc,
            "eval/student_accuracy": student_acc,
            "eval/accuracy_drop": teacher_acc - student_acc,
            "eval/chance_accuracy": validation.chance_accuracy(),
        })
    tracker.log_metrics(summary, step=cfg.train.max_steps)
    tracker.flush()

    if cfg.train.save_checkpoint:
        checkpoint = job_output_dir() / "checkpoints" / "student"
        save_model_atomically(student_model, processor, str(checkpoint))
        tracker.set_tags({"firstsight.checkpoint": str(checkpoint)})
    result = {**model_metrics, **last, **summary}
    log.info("done: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
    return result
