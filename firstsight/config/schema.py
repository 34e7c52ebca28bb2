"""Typed schemas of the composed config, registered with Hydra's ConfigStore.

Each group's YAML files are merged onto these dataclasses, so a misspelt key or a
value of the wrong type fails at composition with Hydra's own message. Ranges and
cross-field rules that types cannot express live in `firstsight.suite.validate`.

Only the standard library, omegaconf and hydra are imported here: `run.py --help`
and `--cfg job` must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# The parts of a Qwen2-VL model whose precision can be set apart (firstsight/models/parts.py)
PARTS: Tuple[str, ...] = ("vision", "merger", "language")


class Weights(Enum):
    pretrained = "pretrained"  # load the checkpoint's weights (tiny: the cached trained teacher)
    random = "random"  # the same architecture at full size, randomly initialised (no download)


class Architecture(Enum):
    qwen2_vl = "qwen2_vl"  # Qwen2-VL: the student's, and the study's Qwen2-VL-7B teacher
    llava_onevision = "llava_onevision"  # LLaVA-OneVision (EgoGPT's base): its own processor, aligned on answers


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(Enum):
    none = "none"
    int8 = "int8"  # bitsandbytes LLM.int8
    nf4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    int8_weight_only = "int8_weight_only"  # torchao: int8 weights (per-row scales), matmuls in the compute dtype
    fp8 = "fp8"  # torchao: float8 e4m3 weights and dynamically scaled activations, per-row (Hopper/Ada GPUs)


class Device(Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"  # cuda when available, else cpu


class Generation(Enum):
    static = "static"  # firstsight.inference.generation: static KV cache, decode step replayed as a CUDA graph on CUDA
    static_compile = "static_compile"  # the same, the captured step torch.compile'd first (CUDA; compiles per shape)
    hf = "hf"  # transformers' model.generate with its dynamic cache (the naive baseline)


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
    # the tiny model's class; null: Qwen2-VL. llava_onevision: a teacher with its own processor
    # (firstsight/models/llava_ov.py); the student is always Qwen2-VL
    architecture: Optional[Architecture] = None
    pretrain_steps: int = 0  # >0: with weights=pretrained, train on the synthetic train split on first use, cached
    pretrain_lr: float = 3e-3  # learning rate of that pre-training
    pretrain_batch_size: int = 16  # batch size of that pre-training
    pretrain_seed: int = 0  # seeds that pre-training (init and data), apart from the run's seed
    # Samples of the synthetic train split that pre-training draws from; null: data.train_size
    # (then data.train_size shapes the trained model too, and a change trains a new one).
    pretrain_train_size: Optional[int] = None


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
class PartPrecisionConfig:
    """One part's precision (firstsight/models/parts.py); null follows the model-wide setting."""

    dtype: Optional[DType] = None  # None: precision.dtype
    quantization: Optional[Quantization] = None  # None: precision.quantization (the teacher's own when set)


@dataclass
class PrecisionConfig:
    name: str = MISSING
    dtype: DType = DType.float32  # unquantized weights of frozen models, and autocast for the trainable one
    quantization: Quantization = Quantization.none  # frozen weights: the teacher; the student's base under LoRA
    teacher_quantization: Optional[Quantization] = None  # the teacher's own, when it differs (None: `quantization`)
    # The trained student's weights, and so their gradients and AdamW states (not under LoRA):
    # float32 = fp32 master weights with autocast to `dtype` | bfloat16 = pure bf16 training
    # (half the optimizer memory; updates are rounded to bf16, as torchtune's recipes do)
    trainable_dtype: DType = DType.float32
    # Per part of the model: vision (model.visual without its merger), merger (model.visual.merger),
    # language (model.language_model and lm_head; lm_head and embeddings are never quantized).
    # Known parts are typed (PartPrecisionConfig); another name composes and is refused by validate.
    parts: Dict[str, Any] = field(default_factory=lambda: {part: PartPrecisionConfig() for part in PARTS})


@dataclass
class DistillLossConfig:
    _target_: str = MISSING  # the loss class in firstsight.losses.kd
    name: str = MISSING
    temperature: float = 1.0  # T: softens both distributions; the kd term is scaled by T²
    alpha: float = 0.5  # weight of the kd term; (1 - alpha) weighs the cross-entropy on answers
    chunk_size: int = 1024  # answer tokens per chunk of the full-vocabulary loss computation
    # Hidden-state term (firstsight.losses.kd.HiddenDistillation), added to the loss as
    # hidden_weight * hidden; not passed to the KD loss class (distill.build_loss drops these keys).
    hidden_weight: float = 0.0  # weight of the hidden-state term; 0 = off (no hidden states requested)
    hidden_loss: str = "mse"  # mse: ||W h_s - h_t||² / d_t | cosine: 1 - cos(W h_s, h_t), per answer token
    hidden_layers: List[int] = field(
        default_factory=lambda: [-1]
    )  # student hidden-state indices (0: embeddings, -1: last), each paired with the teacher's at the same relative depth


@dataclass
class JSDLossConfig(DistillLossConfig):
    beta: float = 0.5  # mixture weight of the generalized Jensen-Shannon divergence


@dataclass
class SkewLossConfig(DistillLossConfig):
    skew: float = 0.1  # λ: how much of the first distribution is mixed into the second (DistiLLM)


# hardware.ddp_comm_dtype, fsdp_param_dtype and fsdp_reduce_dtype (torch dtype names)
PARALLEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.cpu  # where the models run
    batch_size: int = 4  # samples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # trade compute for activation memory (student)
    compile: bool = False  # distill: torch.compile each decoder layer / vision block of both models (firstsight.models.loading.compile_blocks)
    # with compile: the share of each compiled block's activations kept for the backward (torch's
    # activation_memory_budget); below 1 the compiled backward recomputes the cheapest of the rest
    compile_memory_budget: float = 1.0
    # with compile: inductor's C++ wrapper launches each compiled block's kernels from C++ instead
    # of from generated Python; the compiled KD step waits on the host (H200: ~half of each step),
    # and this cut its step by ~1.3x (benchmarks/README.md). None: on CUDA only; on a 2-core CPU the
    # tiny pair compiled ~2.5x longer with it and stepped no faster. Needs a C++ compiler, as inductor does
    compile_cpp_wrapper: Optional[bool] = None
    # Qwen2-VL with sdpa: the vision encoder attends over all frames of one size in one SDPA call
    # (firstsight/models/vision_attention.py); false: one call per frame, as transformers does
    batched_vision_attention: bool = True
    # Qwen2-VL with sdpa: a decode step's attention groups the query heads that share a KV head
    # instead of copying the KV cache per query head (firstsight/models/decode_attention.py); false: as
    # transformers does
    grouped_decode_attention: bool = True
    # distill: right-pad each training batch to a multiple of this many tokens (padding is masked
    # and carries no label), so that batches come in a few shapes: on an H200 every step with a
    # padded length not seen before took ~0.17 s longer (kernel plans, allocations); None: each
    # batch as long as its longest sample
    pad_to_multiple_of: Optional[int] = None
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    num_gpus: int = 0  # GPUs this job uses (0 on CPU)
    data_parallel: str = "ddp"  # several processes: ddp (a full student per GPU) | fsdp (student weights, gradients and AdamW state sharded)
    # ddp: the dtype gradients travel in (one of PARALLEL_DTYPES): float32 | bfloat16 / float16 = torch's
    # bf16_compress_hook / fp16_compress_hook (half the bytes all-reduced, gradients rounded to it)
    ddp_comm_dtype: str = "float32"
    ddp_bucket_cap_mb: Optional[int] = None  # ddp: MB of gradients per all-reduce bucket; None: torch's default (25)
    ddp_gradient_as_bucket_view: bool = False  # ddp: gradients are views into the buckets (no copy, less memory)
    # ddp: DDP records on the first steps which trained weights get gradients and in what order, and
    # reuses that (torch's static_graph): valid only if every step uses the same weights the same way
    ddp_static_graph: bool = False
    # fsdp: the dtype blocks gather their weights in and compute with (torch's MixedPrecisionPolicy
    # param_dtype; the sharded master weights stay as trained); None: the weights' own (no policy)
    fsdp_param_dtype: Optional[str] = None
    # fsdp: the dtype gradients are reduce-scattered in; None: float32 with fsdp_param_dtype, else the
    # gradients' own
    fsdp_reduce_dtype: Optional[str] = None
    # fsdp: free each block's gathered weights after its forward (the backward gathers them again);
    # false keeps them to the backward (one all-gather less per block, more memory); None: torch's
    # default (true for the blocks, false for the root)
    fsdp_reshard_after_forward: Optional[bool] = None
    # fsdp: each block issues the all-gathers of the next this many blocks (forward order; torch's
    # set_modules_to_forward_prefetch) once its own is done, earlier from the CPU than torch's
    # default: each block's all-gather issued by its own forward, overlapping only if the CPU runs ahead
    fsdp_prefetch: int = 0
    num_threads: Optional[int] = None  # torch intra-op threads on CPU; None = torch's default
    dataloader_workers: int = 0  # background processes rendering/processing samples
    eval_batch_size: Optional[int] = None  # distill's teacher-forced evaluations (no gradients); None = batch_size
    memory_budget_gb: Optional[float] = (
        None  # profile: cap (CUDA) and judge (edge/fits) the job's memory; None = no budget
    )
    generation: Generation = (
        Generation.static
    )  # greedy decoding of profile/evaluate: static | static_compile | hf (model.generate)


@dataclass
class LoraConfig:
    """LoRA adapters on the student (peft). With a quantized precision the student's frozen base
    is quantized too and only the adapters train (QLoRA)."""

    enabled: bool = False  # train adapters instead of every student weight
    rank: int = 16  # r: rank of each adapter's update
    alpha: float = 32.0  # scaling numerator: the update is scaled by alpha / rank
    dropout: float = 0.05  # dropout on the adapters' input
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # module name suffixes that get adapters (default: every linear layer of the text decoder)


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
    # Tokens of one whole sample as the student's processor batches it (prompt with its visual
    # tokens, and answer); longer samples are bad samples (data.on_bad_sample). None: no limit.
    max_length: Optional[int] = None


@dataclass
class FileDataConfig(DataConfig):
    """QA samples read from JSONL/JSON files (firstsight/data/files.py) instead of generated.

    The fields inherited from DataConfig keep their synthetic meaning: they only shape the tiny
    teacher's pre-training on synthetic data (firstsight/models/pretrain.py), not the samples read here.
    """

    format: str = MISSING  # conversations (LLaVA / Qwen messages) | egoschema (multiple choice)
    train_file: Optional[str] = None  # .jsonl or .json; relative to the directory run.py was started in
    validation_file: Optional[str] = None  # the validation split (evaluate, profile, eval at the end of distill)
    image_root: Optional[str] = None  # base of relative media paths; None: the directory of each data file
    max_pixels: int = 448 * 448  # frames larger than this are downscaled (qwen-vl-utils smart_resize, 28 px grid)
    min_pixels: int = 56 * 56  # frames smaller than this are upscaled
    fps: float = 2.0  # frames sampled per second of a video file
    max_frames: int = 8  # at most this many frames per video (a file or a frame list), evenly spaced
    on_bad_sample: str = "error"  # error: stop at the first bad record | skip: skip it, count and log it


OPTIMIZERS = ("adamw", "adamw_8bit")  # train.optimizer


@dataclass
class TrainConfig:
    max_steps: int = 400  # optimizer steps
    lr: float = 1e-3  # AdamW learning rate (peak)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 20  # linear learning-rate warm-up steps
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    log_every_n_steps: int = 10  # metrics are buffered and flushed to MLflow in one batch this often
    # first steps excluded from throughput (allocation, caches); a shorter run still runs: it measures
    # the steps after its first (none for one step: perf/measured_steps 0), with a warning
    throughput_warmup_steps: int = 3
    eval_at_end: bool = True  # teacher-forced exact-match accuracy of teacher and student on validation
    eval_before: bool = True  # with eval_at_end: the student's accuracy before training too (eval/distill_gain)
    eval_blind: bool = True  # with eval_at_end: teacher and student also with grey frames ("is it looking?")
    save_checkpoint: bool = True  # write the trained student (safetensors) under the run directory
    progress_bar: bool = True  # tqdm bar on stderr
    # Preemption safety (firstsight/training/resume.py): resumable checkpoints under checkpoints/resume/.
    checkpoint_every_n_steps: int = 0  # a resumable checkpoint every N optimizer steps; 0: only on SIGUSR2/SIGTERM
    keep_checkpoints: int = 2  # resumable checkpoints kept (the newest); older ones are deleted
    resume: str = (
        "auto"  # auto: continue from this job's own latest checkpoint if any | never | a run dir or checkpoint path
    )
    # Speed (benchmarks/kd_step.py measures each against the naive way):
    logits: str = (
        "answer_positions"  # answer_positions: lm_head only where a loss is taken | all_positions: every token (naive)
    )
    fused_optimizer: bool = True  # CUDA: AdamW's fused kernel (one launch for all tensors); same update as the loop
    # adamw: torch's | adamw_8bit: bitsandbytes' AdamW8bit, both moments stored in 8 bits (block-wise
    # quantized): 2 bytes less optimizer state per weight than bf16 moments, an approximate update
    optimizer: str = "adamw"  # one of OPTIMIZERS
    host_positions: bool = (
        True  # M-RoPE positions computed once per batch on the host, given to both models (positions.py)
    )


@dataclass
class TaskConfig:
    name: str = MISSING  # distill | profile | evaluate | export | report


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
    blind: bool = True  # also answer with grey frames: eval/*_blind_accuracy ("is it looking?")


@dataclass
class ExportTaskConfig(TaskConfig):
    checkpoint: Optional[str] = None  # a student directory a distill run wrote (…/checkpoints/student)
    output_dir: Optional[str] = None  # where the export goes; None: <the job's output dir>/export
    merge_lora: bool = True  # fold LoRA adapters into the weights (else the adapter is written beside the base)
    dtype: Optional[DType] = None  # cast the exported weights; None: as the checkpoint holds them
    push_to_hub: Optional[str] = None  # a hub repo id to upload to, when a token is configured (HF_TOKEN)
    private: bool = True  # a newly created hub repo is private


@dataclass
class ReportTaskConfig(TaskConfig):
    experiment: Optional[str] = None  # MLflow experiment to report on; None: tracking.experiment_name
    sweep: Optional[str] = None  # one sweep only: its parent run id, its multirun dir, or "latest"
    include_failed: bool = False  # rows for FAILED/KILLED runs too (marked so)
    output_dir: Optional[str] = None  # where report.md/.html and the plots go; None: <the job's output dir>/report
    max_runs: int = 1000  # rows at most: the most recent job runs selected (older ones are left out, and said so)
    accuracy_drop_target: float = 0.01  # the study's target: student within 1 point of the teacher
    throughput_gain_target: float = 2.0  # the study's target: >= 2x training throughput vs its baseline
    vram_saving_target: float = 0.5  # the study's target: <= 0.5x the baseline's peak memory


@dataclass
class TrackingConfig:
    enabled: bool = True  # one MLflow run per job
    experiment_name: str = "firstsight"  # MLflow experiment
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    run_name: Optional[str] = None  # None: derived from the overrides of the job
    # MLflow's own system metrics in the job's run, sampled by a background thread: system/cpu_utilization_percentage,
    # system/system_memory_usage_megabytes, disk and network everywhere; system/gpu_<i>_utilization_percentage,
    # _memory_usage_megabytes and _power_usage_watts where an NVIDIA GPU is visible (nvidia-ml-py)
    system_metrics: bool = True
    # seconds between samples; a sample cost the CPU default ~25 ms, so 10 s is ~0.25 % of the job's
    # step time, under the 1 % allowed (docs/decisions/0012-system-metrics-interval.md).
    # The environment variable MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
    system_metrics_interval_s: float = 10.0
    # the trained student (distill's checkpoints/student, export's directory) also as an MLflow model
    # (transformers flavour) in the run, for MLflow's Models view and registry; off: a 2B student is ~4 GB more
    log_model: bool = False


@dataclass
class TeacherCacheConfig:
    """Teacher-logit cache (firstsight/kd/teacher_cache.py): the teacher's top-k log-probabilities on
    the train split, computed once per teacher/data/precision/temperature/k and reused by every
    student run that shares them, so a sweep over student settings runs the teacher once."""

    enabled: bool = False  # distill from the cache (built on first use) instead of a teacher pass per step
    # teacher log-probabilities kept per answer token; the rest is one explicit tail bucket.
    # null: every id (k = the student's vocabulary rows), so the loss is the live one exactly
    top_k: Optional[int] = 64
    dir: Optional[str] = None  # where caches are kept; None: <cache_dir>/teacher-logits
    shard_size: int = 1024  # train samples per safetensors shard


@dataclass
class Config:
    model: ModelConfig = MISSING
    precision: PrecisionConfig = MISSING
    distill_loss: Any = MISSING  # DistillLossConfig or a subclass (each choice names its schema)
    hardware: HardwareConfig = MISSING
    data: DataConfig = MISSING
    task: Any = MISSING  # TaskConfig or a subclass (each choice names its schema)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    seed: int = 0  # seeds torch, numpy, python and the synthetic data
    cache_dir: str = MISSING  # trained tiny teachers and offline tokenizers are cached here


def register_configs() -> None:
    """Register the schemas under `schema/`; each group file names its schema in its defaults
    list (`- /schema/precision@_here_`), as Hydra's structured-config-schema pattern does."""
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
        "data_file": FileDataConfig,
        "task": TaskConfig,
        "task_profile": ProfileTaskConfig,
        "task_evaluate": EvaluateTaskConfig,
        "task_export": ExportTaskConfig,
        "task_report": ReportTaskConfig,
    }.items():
        cs.store(group="schema", name=name, node=node)
