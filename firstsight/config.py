"""Typed schemas of the composed config, registered with Hydra's ConfigStore.

Each group's YAML files are merged onto these dataclasses, so a misspelt key or a
value of the wrong type fails at composition with Hydra's own message. Ranges and
cross-field rules that types cannot express live in `firstsight.validate`.

Only the standard library, omegaconf and hydra are imported here: `run.py --help`
and `--cfg job` must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING


class Weights(Enum):
    pretrained = "pretrained"  # load the checkpoint's weights (tiny: the cached trained teacher)
    random = "random"  # the same architecture at full size, randomly initialised (no download)


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(Enum):
    none = "none"
    int8 = "int8"  # bitsandbytes LLM.int8
    nf4 = "nf4"  # bitsandbytes 4-bit NormalFloat


class Device(Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"  # cuda when available, else cpu


@dataclass
class TinyArchConfig:
    """Sizes of an embedded tiny Qwen2-VL, built offline (multiples of 64 keep bitsandbytes happy)."""

    hidden_size: int = 64  # text width; the vision merger projects to it
    intermediate_size: int = 128  # text MLP width
    num_layers: int = 2  # text decoder layers
    num_heads: int = 4  # text attention heads (head size = hidden_size / num_heads)
    num_kv_heads: int = 2  # grouped-query attention key/value heads
    vision_depth: int = 1  # ViT blocks
    vision_embed_dim: int = 64  # ViT width
    vision_heads: int = 4  # ViT attention heads
    vocab_padding: int = 64  # output rows are rounded up to a multiple of this (as the real models pad)
    pretrain_steps: int = 0  # >0: train on the synthetic train split on first use, cached (teacher)
    pretrain_lr: float = 3e-3  # learning rate of that pre-training
    pretrain_batch_size: int = 16  # batch size of that pre-training
    pretrain_seed: int = 0  # seeds that pre-training (init and data), apart from the run's seed


@dataclass
class ModelSideConfig:
    """One side (teacher or student) of the model pair."""

    source: str = "tiny"  # "tiny" (built offline), a hub id, or a local directory
    weights: Weights = Weights.pretrained  # pretrained | random
    tiny: Optional[TinyArchConfig] = None  # sizes when source is "tiny"
    revision: Optional[str] = None  # hub revision (branch, tag or commit) for hub ids


@dataclass
class ModelConfig:
    name: str = MISSING  # the choice's name, logged as a param
    teacher: ModelSideConfig = field(default_factory=ModelSideConfig)
    student: ModelSideConfig = field(default_factory=ModelSideConfig)
    trust_remote_code: bool = False  # never run code from a checkpoint unless asked


@dataclass
class PrecisionConfig:
    name: str = MISSING
    dtype: DType = DType.float32  # unquantized weights of frozen models, and autocast for the trainable one
    quantization: Quantization = Quantization.none  # frozen weights: the teacher during distillation


@dataclass
class DistillLossConfig:
    _target_: str = MISSING  # the loss class in firstsight.losses
    name: str = MISSING
    temperature: float = 1.0  # T: softens both distributions; the kd term is scaled by T²
    alpha: float = 0.5  # weight of the kd term; (1 - alpha) weighs the cross-entropy on answers
    chunk_size: int = 1024  # answer tokens per chunk of the full-vocabulary loss computation


@dataclass
class JSDLossConfig(DistillLossConfig):
    beta: float = 0.5  # mixture weight of the generalized Jensen-Shannon divergence


@dataclass
class SkewLossConfig(DistillLossConfig):
    skew: float = 0.1  # λ: how much of the first distribution is mixed into the second (DistiLLM)


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.cpu  # where the models run
    batch_size: int = 4  # samples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # trade compute for activation memory (student)
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    num_gpus: int = 0  # GPUs this job uses (0 on CPU)
    num_threads: Optional[int] = None  # torch intra-op threads on CPU; None = torch's default
    dataloader_workers: int = 0  # background processes rendering/processing samples


@dataclass
class DataConfig:
    name: str = MISSING
    train_size: int = 512  # samples in the train split
    validation_size: int = 128  # samples in the validation split
    image_size: int = 112  # square frame size in pixels (multiple of 28 keeps patches whole)
    num_frames: int = 2  # frames of a temporal (video-like) question
    kinds: List[str] = field(
        default_factory=lambda: ["colour_at", "shape_of", "count", "held", "moved"]
    )  # question kinds to generate


@dataclass
class TrainConfig:
    max_steps: int = 40  # optimizer steps
    lr: float = 1e-3  # AdamW learning rate (peak)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 4  # linear learning-rate warm-up steps
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    log_every_n_steps: int = 10  # metrics are buffered and flushed to MLflow in one batch this often
    throughput_warmup_steps: int = 3  # first steps excluded from throughput (allocation, caches)
    eval_at_end: bool = True  # teacher-forced exact-match accuracy of teacher and student on validation
    save_checkpoint: bool = True  # write the trained student (safetensors) under the run directory
    progress_bar: bool = True  # tqdm bar on stderr


@dataclass
class TaskConfig:
    name: str = MISSING  # distill | profile | evaluate (export, report: later tasks)


class ProfileTarget(Enum):
    student = "student"
    teacher = "teacher"


@dataclass
class ProfileTaskConfig(TaskConfig):
    target: ProfileTarget = ProfileTarget.student  # the model under test (sweep task.target for both)
    new_tokens: int = 32  # tokens generated per query, fixed (no early stop) so runs compare
    warmup_queries: int = 3  # untimed single queries first (allocation, caches)
    latency_queries: int = 20  # timed single queries: latency p50 / p90
    throughput_batch_size: int = 8  # queries per batch for the throughput measurement
    throughput_batches: int = 3  # timed batches (after one untimed batch)


@dataclass
class EvaluateTaskConfig(TaskConfig):
    split: str = "validation"  # the synthetic split to answer: validation | train
    max_new_tokens: int = 8  # greedy answer length cap (answers are a word, a number or a letter)
    batch_size: int = 16  # questions per generation batch


@dataclass
class TrackingConfig:
    enabled: bool = True  # one MLflow run per job
    experiment_name: str = "firstsight"  # MLflow experiment
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    run_name: Optional[str] = None  # None: derived from the overrides of the job


@dataclass
class Config:
    model: ModelConfig = MISSING
    precision: PrecisionConfig = MISSING
    distill_loss: Any = MISSING  # DistillLossConfig or a subclass (each choice names its schema)
    hardware: HardwareConfig = MISSING
    data: DataConfig = MISSING
    task: Any = MISSING  # TaskConfig or a subclass (each choice names its schema)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0  # seeds torch, numpy, python and the synthetic data
    cache_dir: str = MISSING  # trained tiny teachers and offline tokenizers are cached here


def register_configs() -> None:
    """Register the schemas under `schema/`; each group file names its schema in its defaults
    list (`- /schema/precision@_here_`), as Hydra's structured-config-schema pattern does."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, node in {
        "model": ModelConfig,
        "precision": PrecisionConfig,
        "distill_loss": DistillLossConfig,
        "distill_loss_jsd": JSDLossConfig,
        "distill_loss_skew": SkewLossConfig,
        "hardware": HardwareConfig,
        "data": DataConfig,
        "task": TaskConfig,
        "task_profile": ProfileTaskConfig,
        "task_evaluate": EvaluateTaskConfig,
    }.items():
        cs.store(group="schema", name=name, node=node)
