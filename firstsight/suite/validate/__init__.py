"""Checks of the composed config that types cannot express: ranges, combinations, backends.

They run before any model is loaded or any MLflow run is created, so a mistake costs seconds.
Each message names the bad value, where it came from and what is valid. `ranges` holds the checks
that read the config alone; `environment` the probes of this machine and of the files the config
names; `validate` runs both in one fixed order, so the first problem found is always the same one.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from omegaconf import DictConfig

from firstsight.core.runtime import device_type
from firstsight.suite.validate import environment, ranges
from firstsight.suite.validate.common import enum_value, roles_used, value_at
from firstsight.suite.validate.environment import FP8_MIN_CAPABILITY, QUANTIZATION_BACKENDS
from firstsight.suite.validate.ranges import ATTN_IMPLEMENTATIONS

__all__ = ["ATTN_IMPLEMENTATIONS", "FP8_MIN_CAPABILITY", "QUANTIZATION_BACKENDS", "validate"]


def validate(cfg: DictConfig, tasks: Optional[Mapping[str, Callable]] = None, local_device: bool = True) -> None:
    """Raise ConfigError for the first problem found in `cfg`. `local_device=False`: the job runs
    elsewhere (a SLURM sweep checked on the submitting machine), so this machine's GPUs are not
    looked at; the job checks them again where it runs."""
    ranges.validate_task_name(cfg, tasks)
    ranges.validate_known_keys(cfg)
    ranges.validate_numbers(cfg)
    ranges.validate_hidden_loss(cfg)
    ranges.validate_task_settings(cfg)  # profile, evaluate, report
    if cfg.task.name == "export":
        environment.validate_export_checkpoint(cfg)
    ranges.validate_tracking(cfg)
    environment.validate_logged_export(cfg)
    ranges.validate_lora(cfg)
    ranges.validate_teacher_cache(cfg)
    ranges.validate_data(cfg)
    environment.validate_data_files(cfg)
    _validate_hardware(cfg, local_device)
    _validate_precision(cfg)
    if "teacher" in roles_used(cfg):
        environment.validate_pairable(cfg)  # a teacher class the suite can pair with the student
    for role in roles_used(cfg):
        ranges.validate_model_side(cfg, role)
        environment.validate_model_source(cfg, role)
    processor = teacher_processor = None
    if local_device and cfg.task.name == "distill" and "teacher" in roles_used(cfg):
        # two tokenizers to compare, before any run exists
        processor, teacher_processor = environment.check_tokenizers(cfg)
    if local_device:  # on the machine the job runs on (a SLURM sweep's submitting machine only checks the paths)
        environment.read_data(cfg, processor, teacher_processor)


def _validate_hardware(cfg: DictConfig, local_device: bool = True) -> None:
    ranges.validate_attention_and_budget(cfg)
    device = device_type(cfg.hardware)
    if local_device:
        environment.validate_process_layout(cfg)
    ranges.validate_data_parallel(cfg)
    if device == "cpu":
        ranges.validate_cpu_hardware(cfg)
        return
    if not local_device:
        ranges.validate_remote_gpus(cfg)
        return
    environment.validate_local_gpus(cfg)


def _validate_precision(cfg: DictConfig) -> None:
    for key in ("precision.quantization", "precision.teacher_quantization"):
        quantization = enum_value(value_at(cfg, key))
        if quantization not in ("none", "None"):
            _validate_quantization(cfg, key, quantization)
    # precision.parts.*: known part names, a backend for each part quantization, one bitsandbytes
    # kind per model, and no quantized part on a student that distill trains in full.
    ranges.validate_part_names(cfg)
    explicit = ranges.explicit_part_quantizations(cfg)
    for key, quantization in explicit:
        _validate_quantization(
            cfg, key, quantization, valid=f"set {key}=none, or null to follow precision.quantization"
        )
    ranges.validate_part_quantization(cfg, explicit)
    ranges.validate_trainable_dtype(cfg)


def _validate_quantization(
    cfg: DictConfig, key: str, quantization: str, valid: str = "choose precision=fp32, bf16 or fp16 (no quantization)"
) -> None:
    environment.validate_quantization_backend(cfg, key, quantization, valid)
    ranges.validate_quantization_under_lora(cfg, key, quantization)
