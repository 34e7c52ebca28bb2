"""Small frozen specs a task builds from its config for the parts below it.

Below the tasks nothing reads the whole config: a function takes the typed section it acts on
(`PrecisionConfig`, `TrainConfig`, ...) or one of these specs, which name the few sections a part
needs when it needs more than one."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

from omegaconf import DictConfig, open_dict

from firstsight.config.record import config_record
from firstsight.config.schema import (
    DataConfig,
    DistillLossConfig,
    HardwareConfig,
    LoraConfig,
    ModelConfig,
    PrecisionConfig,
    TeacherCacheConfig,
    TrackingConfig,
)


@dataclass(frozen=True)
class ModelSpec:
    """What loading the teacher or the student needs: `model_spec(cfg)` builds it."""

    model: ModelConfig  # both sides: source, revision, weights, tiny sizes; trust_remote_code
    precision: PrecisionConfig  # each part's dtype and quantization
    hardware: (
        HardwareConfig  # attention kernels, gradient checkpointing; a tiny model's pre-training device and workers
    )
    lora: LoraConfig  # adapters on a trained student
    data: DataConfig  # the samples a tiny model is pre-trained on (first use)
    seed: int  # random weights (weights=random) start from it
    cache_dir: str  # tiny processor and models trained on first use
    progress_bar: bool  # a tiny model's first-use pre-training shows one

    def full_precision(self) -> ModelSpec:
        """The same models with the teacher unquantized in precision.dtype: the study's reference teacher."""
        return dataclasses.replace(self, precision=full_precision(self.precision))


def model_spec(cfg: DictConfig) -> ModelSpec:
    return ModelSpec(
        model=cfg.model,
        precision=cfg.precision,
        hardware=cfg.hardware,
        lora=cfg.lora,
        data=cfg.data,
        seed=int(cfg.seed),
        cache_dir=str(cfg.cache_dir),
        progress_bar=bool(cfg.train.progress_bar),
    )


def full_precision(precision: PrecisionConfig) -> PrecisionConfig:
    """A copy of `precision` with nothing quantized (the run's section stays as it is)."""
    fp = copy.deepcopy(precision)  # keeps the typed schema (enums)
    with open_dict(fp):
        fp.quantization = "none"
        fp.teacher_quantization = None
        for part in fp.parts:
            if fp.parts[part] is not None:
                fp.parts[part].quantization = None
    return fp


@dataclass(frozen=True)
class TeacherCacheSpec:
    """What the teacher-logit cache needs: `teacher_cache_spec(cfg)` builds it."""

    models: ModelSpec  # the teacher a miss runs; the data, seed, hardware and cache_dir it is keyed and built with
    loss: DistillLossConfig  # the temperature and chunk size of the cached top-k targets
    cache: TeacherCacheConfig  # enabled, dir, top_k, shard_size
    eval_at_end: bool  # a miss measures the teacher's accuracy while the teacher is loaded


def teacher_cache_spec(cfg: DictConfig) -> TeacherCacheSpec:
    return TeacherCacheSpec(
        models=model_spec(cfg),
        loss=cfg.distill_loss,
        cache=cfg.teacher_cache,
        eval_at_end=bool(cfg.train.eval_at_end),
    )


@dataclass(frozen=True)
class TrackingSpec:
    """What the job's MLflow run needs: `tracking_spec(cfg)` builds it."""

    tracking: TrackingConfig  # the store, experiment, run name, system metrics
    task: str  # the run's firstsight.task tag and default name
    record: Dict[str, Any]  # the config record: the run's params and config.yaml


def tracking_spec(cfg: DictConfig, record: Optional[Dict[str, Any]] = None) -> TrackingSpec:
    """`record`: the config record when the caller has resolved it already."""
    record = config_record(cfg) if record is None else record
    return TrackingSpec(tracking=cfg.tracking, task=str(cfg.task.name), record=record)
