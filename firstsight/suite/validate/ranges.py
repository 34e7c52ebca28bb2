"""Checks that read the config alone: ranges, known keys, choices and combinations of settings.

No filesystem, no environment and no device: whatever the machine, a config passes or fails them
the same way (firstsight.suite.validate.environment looks at the machine and the files). Each
message names the bad value, where it came from and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from firstsight.config.composition import closest  # the closest valid key, as for Hydra's unknown keys
from firstsight.config.schema import OPTIMIZERS, PARALLEL_DTYPES, HardwareConfig
from firstsight.core.errors import ConfigError
from firstsight.suite.validate.common import at_least, check, enum_value, origin, roles_used, value_at

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def validate_task_name(cfg: DictConfig, tasks: Optional[Mapping[str, Any]]) -> None:
    if tasks is not None:
        check(cfg.task.name in tasks, "task.name", cfg.task.name, f"choose one of {sorted(tasks)}")


def validate_known_keys(node: Any, path: str = "") -> None:
    """Every key of a typed section is one its schema has. Hydra refuses an unknown key given as
    `key=value`, but `+key=value` appends it; under a typed section (a dataclass of
    firstsight.config.schema) nothing would read it, so a typo there would be silently ignored. Dict-typed
    nodes (precision.parts) are checked where they are used."""
    schema = OmegaConf.get_type(node)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if fields is not None and key not in fields and not (not path and key == "hydra"):
            guess = closest(full, path, fields, node)
            where = path or "the config (top level)"
            raise ConfigError(
                f"{full}{origin(full)} is not a key of {where}"
                + (f"; did you mean {guess}?" if guess else ".")
                + f" Valid keys of {path or 'the top level'}: {', '.join(fields)}."
            )
        child = node._get_node(key)
        if fields is not None and isinstance(child, DictConfig) and not (not path and key == "hydra"):
            validate_known_keys(child, full)  # not below a dict-typed node: precision.parts has its own checks


def validate_numbers(cfg: DictConfig) -> None:
    _validate_minimums(cfg)
    _validate_train_choices(cfg)
    _validate_hardware_numbers(cfg)
    _validate_loss_weights(cfg)


def _validate_minimums(cfg: DictConfig) -> None:
    for key, minimum in [
        ("hardware.batch_size", 1),
        ("hardware.grad_accum_steps", 1),
        ("hardware.num_gpus", 0),
        ("hardware.dataloader_workers", 0),
        ("train.max_steps", 1),
        ("train.weight_decay", 0),
        ("train.warmup_steps", 0),
        ("train.max_grad_norm", 0),
        ("train.log_every_n_steps", 1),
        ("train.throughput_warmup_steps", 0),
        ("distill_loss.chunk_size", 1),
        ("train.checkpoint_every_n_steps", 0),
        ("train.keep_checkpoints", 1),
    ]:
        at_least(cfg, key, minimum)


def _validate_train_choices(cfg: DictConfig) -> None:
    check(cfg.train.lr > 0, "train.lr", cfg.train.lr, "the learning rate must be > 0")
    # train.max_steps <= train.throughput_warmup_steps runs (a smoke run): firstsight.core.perf.ThroughputMeter
    # measures what it can and warns.
    check(
        cfg.train.optimizer in OPTIMIZERS,
        "train.optimizer",
        cfg.train.optimizer,
        f"choose one of {', '.join(OPTIMIZERS)}",
    )
    check(
        cfg.train.logits in ("answer_positions", "all_positions"),
        "train.logits",
        cfg.train.logits,
        "choose answer_positions (the output head only where a loss is taken) or all_positions (every token)",
    )
    resume = str(cfg.train.resume)
    check(
        resume in ("auto", "never") or bool(resume.strip()),
        "train.resume",
        resume,
        "auto, never, or the path of a run directory or checkpoint to continue from",
    )


def _validate_hardware_numbers(cfg: DictConfig) -> None:
    budget = cfg.hardware.compile_memory_budget
    check(
        0 < budget <= 1,
        "hardware.compile_memory_budget",
        budget,
        "a share of the activations in (0, 1]; 1 keeps what the compiler would keep anyway",
    )
    check(
        budget == 1 or cfg.hardware.compile,
        "hardware.compile_memory_budget",
        budget,
        "it acts on compiled blocks only: add hardware.compile=true, or leave it at 1",
    )
    multiple = cfg.hardware.pad_to_multiple_of
    check(
        multiple is None or multiple >= 1,
        "hardware.pad_to_multiple_of",
        multiple,
        "null (each batch as long as its longest sample) or a number of tokens >= 1, e.g. 64",
    )
    threads = cfg.hardware.num_threads
    check(threads is None or threads >= 1, "hardware.num_threads", threads, "null or >= 1")


def _validate_loss_weights(cfg: DictConfig) -> None:
    loss = cfg.distill_loss
    check(loss.temperature > 0, "distill_loss.temperature", loss.temperature, "it must be > 0")
    check(0 <= loss.alpha <= 1, "distill_loss.alpha", loss.alpha, "it must lie in [0, 1]")
    # Settings whose kd term is identically zero (losses.JSD, losses._Skewed) or carries no weight:
    # the run would train on cross-entropy alone while still paying for the teacher.
    ce_only = "the run would train on cross-entropy alone while paying for the teacher every step"
    control = "or distill_loss=none for a cross-entropy-only run (the control, which does not run the teacher)"
    if "beta" in loss:
        check(
            0 <= loss.beta <= 1,
            "distill_loss.beta",
            loss.beta,
            "it must lie strictly between 0 and 1 (0.5: the symmetric JSD)",
        )
        check(
            0 < loss.beta < 1,
            "distill_loss.beta",
            loss.beta,
            f"at beta 0 and 1 the generalized JSD is identically zero: {ce_only}; choose beta strictly between "
            f"0 and 1 (0.5: the symmetric JSD), distill_loss=forward_kl / reverse_kl for the KLs it tends to "
            f"at those ends, {control}",
        )
    if "skew" in loss:
        check(
            0 <= loss.skew <= 1,
            "distill_loss.skew",
            loss.skew,
            "it must lie in [0, 1) (0: the plain KL; 0.1: the default)",
        )
        check(
            loss.skew < 1,
            "distill_loss.skew",
            loss.skew,
            f"at skew 1 the mixture is the first distribution itself and the skew KL is identically zero: "
            f"{ce_only}; choose skew in [0, 1) (0: the plain KL; 0.1: the default), {control}",
        )
    if loss.name == "none":
        check(
            loss.alpha == 0,
            "distill_loss.alpha",
            loss.alpha,
            "distill_loss=none trains on cross-entropy alone, so alpha must be 0",
        )
    elif loss.get("hidden_weight", 0) == 0:  # alpha 0 with the hidden-state term is meaningful (it needs the teacher)
        check(
            loss.alpha > 0,
            "distill_loss.alpha",
            loss.alpha,
            f"alpha 0 gives the kd term no weight: {ce_only}; choose alpha in (0, 1], {control}",
        )


def validate_hidden_loss(cfg: DictConfig) -> None:
    """distill_loss.hidden_*: the optional hidden-state term (firstsight.losses.kd.HiddenDistillation)."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.losses.kd import HIDDEN_LOSS_KINDS

    loss = cfg.distill_loss
    weight = loss.hidden_weight
    check(
        weight >= 0 and math.isfinite(weight),
        "distill_loss.hidden_weight",
        weight,
        "it must be a finite number >= 0 (0 turns the hidden-state term off)",
    )
    check(
        loss.hidden_loss in HIDDEN_LOSS_KINDS,
        "distill_loss.hidden_loss",
        loss.hidden_loss,
        f"choose one of {list(HIDDEN_LOSS_KINDS)}",
    )
    layers = list(loss.hidden_layers)
    check(
        len(layers) > 0,
        "distill_loss.hidden_layers",
        layers,
        "name at least one student hidden-state index, e.g. [-1] (the last)",
    )
    student = cfg.model.student
    if student.source == "tiny" and student.tiny is not None:  # other models: checked once loaded
        depth = student.tiny.num_layers
        for index in layers:
            check(
                -(depth + 1) <= index <= depth,
                "distill_loss.hidden_layers",
                layers,
                f"the student has {depth} layers: indices lie in [{-(depth + 1)}, {depth}] "
                "(0: the embeddings, -1: the last)",
            )
    if weight == 0 or cfg.task.name != "distill":
        return
    check(
        loss.name != "none",
        "distill_loss.hidden_weight",
        weight,
        "distill_loss=none does not run the teacher, whose hidden states the term needs; set it to 0, "
        "or keep plain cross-entropy plus the hidden term with distill_loss=forward_kl distill_loss.alpha=0",
    )
    cache = cfg.get("teacher_cache")
    if cache is not None and cache.enabled:
        check(
            False,
            "distill_loss.hidden_weight",
            weight,
            "the teacher-logit cache (teacher_cache.enabled=true) does not run the teacher, whose hidden "
            "states the term needs; set it to 0 or teacher_cache.enabled=false",
        )


def validate_task_settings(cfg: DictConfig) -> None:
    """The settings of task=profile, evaluate and report (export's checkpoint is a directory: environment)."""
    if cfg.task.name == "profile":
        for key, minimum in [
            ("task.new_tokens", 1),
            ("task.warmup_queries", 0),
            ("task.latency_queries", 1),
            ("task.throughput_batch_size", 1),
            ("task.throughput_batches", 1),
        ]:
            at_least(cfg, key, minimum)
    if cfg.task.name == "evaluate":
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from firstsight.data.synthetic import SPLITS

        check(cfg.task.split in SPLITS, "task.split", cfg.task.split, f"choose one of {list(SPLITS)}")
        at_least(cfg, "task.max_new_tokens", 1)
        at_least(cfg, "task.batch_size", 1)
    if cfg.task.name == "report":
        _validate_report(cfg)


def _validate_report(cfg: DictConfig) -> None:
    task = cfg.task
    at_least(cfg, "task.max_runs", 1)
    for key in ("task.experiment", "task.sweep", "task.output_dir"):
        value = value_at(cfg, key)
        check(value is None or bool(str(value).strip()), key, value, "leave it unset (null) or give a non-empty value")
    check(
        0 <= task.accuracy_drop_target <= 1,
        "task.accuracy_drop_target",
        task.accuracy_drop_target,
        "accuracies are fractions: it must lie in [0, 1] (0.01 = 1 point)",
    )
    check(
        task.throughput_gain_target > 0,
        "task.throughput_gain_target",
        task.throughput_gain_target,
        "it is a ratio to the baseline's throughput and must be > 0 (2.0 = twice as fast)",
    )
    check(
        0 < task.vram_saving_target <= 1,
        "task.vram_saving_target",
        task.vram_saving_target,
        "it is the largest allowed ratio to the baseline's peak VRAM and must lie in (0, 1] (0.5 = half)",
    )


def validate_tracking(cfg: DictConfig) -> None:
    """tracking.*; that an exported adapter is merged before it is logged: environment.validate_logged_export."""
    tracking = cfg.tracking
    check(
        tracking.system_metrics_interval_s > 0,
        "tracking.system_metrics_interval_s",
        tracking.system_metrics_interval_s,
        "it is the seconds between samples and must be > 0 (tracking.system_metrics=false turns them off)",
    )
    if not tracking.log_model:
        return
    check(
        bool(tracking.enabled),
        "tracking.log_model",
        tracking.log_model,
        "it logs the student to the job's MLflow run, and tracking.enabled=false means no run: enable tracking",
    )
    if cfg.task.name == "distill":
        check(
            bool(cfg.train.save_checkpoint),
            "tracking.log_model",
            tracking.log_model,
            "it logs the saved student, and train.save_checkpoint=false saves none: set train.save_checkpoint=true",
        )


def validate_lora(cfg: DictConfig) -> None:
    lora = cfg.lora
    at_least(cfg, "lora.rank", 1)
    check(lora.alpha > 0, "lora.alpha", lora.alpha, "it must be > 0")
    check(0 <= lora.dropout < 1, "lora.dropout", lora.dropout, "it must lie in [0, 1)")
    check(
        len(lora.target_modules) > 0,
        "lora.target_modules",
        list(lora.target_modules),
        "name at least one linear layer, e.g. [q_proj,v_proj]",
    )


def validate_teacher_cache(cfg: DictConfig) -> None:
    """teacher_cache.*; that top_k fits the student's vocabulary is checked once the student is
    loaded, and with distill_loss=none (no teacher) the cache is ignored, with a message."""
    if cfg.get("teacher_cache") is None:
        return
    if cfg.teacher_cache.top_k is not None:  # null: every id of the student's vocabulary
        at_least(cfg, "teacher_cache.top_k", 1)
    at_least(cfg, "teacher_cache.shard_size", 1)
    directory = cfg.teacher_cache.dir
    check(
        directory is None or bool(str(directory).strip()),
        "teacher_cache.dir",
        directory,
        "leave it unset (null: <cache_dir>/teacher-logits) or give a directory",
    )


def validate_data(cfg: DictConfig) -> None:
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.data.synthetic import QUESTION_KINDS

    data = cfg.data
    at_least(cfg, "data.train_size", 1)
    at_least(cfg, "data.validation_size", 1)
    at_least(cfg, "data.image_size", 56)
    at_least(cfg, "data.num_frames", 2)
    kinds: List[str] = list(data.kinds)
    check(len(kinds) > 0, "data.kinds", kinds, f"name at least one of {list(QUESTION_KINDS)}")
    for kind in kinds:
        check(kind in QUESTION_KINDS, "data.kinds", kind, f"choose from {list(QUESTION_KINDS)}")
    max_length = data.get("max_length")
    check(
        max_length is None or max_length >= 1,
        "data.max_length",
        max_length,
        "null (no limit) or >= 1 tokens per sample (prompt with its visual tokens, and answer)",
    )
    if "format" in data:  # read from files (the synthetic settings above only shape the tiny teacher's pre-training)
        _validate_data_file_settings(cfg)


def _validate_data_file_settings(cfg: DictConfig) -> None:
    """How files are read (the files themselves: environment.validate_data_files)."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.data.files import BAD_SAMPLE_POLICIES, FORMATS

    data = cfg.data
    check(data.format in FORMATS, "data.format", data.format, f"choose one of {list(FORMATS)}")
    check(
        data.on_bad_sample in BAD_SAMPLE_POLICIES,
        "data.on_bad_sample",
        data.on_bad_sample,
        f"choose one of {list(BAD_SAMPLE_POLICIES)} (stop at the first bad record, or skip and count bad records)",
    )
    at_least(cfg, "data.max_pixels", 28 * 28)  # one 28 px grid cell
    at_least(cfg, "data.min_pixels", 1)
    check(
        data.max_pixels >= data.min_pixels,
        "data.max_pixels",
        data.max_pixels,
        f"it must be >= data.min_pixels={data.min_pixels}",
    )
    check(data.fps > 0, "data.fps", data.fps, "frames sampled per second of a video must be > 0")
    at_least(cfg, "data.max_frames", 1)


def validate_attention_and_budget(cfg: DictConfig) -> None:
    hw = cfg.hardware
    check(
        hw.attn_implementation in ATTN_IMPLEMENTATIONS,
        "hardware.attn_implementation",
        hw.attn_implementation,
        f"choose one of {list(ATTN_IMPLEMENTATIONS)}",
    )
    budget = hw.get("memory_budget_gb")
    if budget is not None:
        check(
            math.isfinite(budget) and budget > 0,
            "hardware.memory_budget_gb",
            budget,
            "it must be a positive number of GB (e.g. 4.0), or null for no budget",
        )
        check(
            cfg.task.name == "profile",
            "hardware.memory_budget_gb",
            budget,
            f"a memory budget is judged by task=profile (edge/fits); task={cfg.task.name} runs uncapped: "
            "set hardware.memory_budget_gb=null (e.g. hardware=gpu or cpu instead of an edge_* preset)",
        )


def validate_data_parallel(cfg: DictConfig) -> None:
    hw = cfg.hardware
    check(
        hw.data_parallel in ("ddp", "fsdp"),
        "hardware.data_parallel",
        hw.data_parallel,
        "choose ddp (a whole student per GPU) or fsdp (the student sharded over the GPUs)",
    )
    if hw.data_parallel == "fsdp":
        check(
            not cfg.lora.enabled,
            "hardware.data_parallel",
            hw.data_parallel,
            "fsdp shards a fully trained student; with lora.enabled=true use ddp (the adapters are small)",
        )
        check(
            not cfg.distill_loss.hidden_weight > 0,
            "hardware.data_parallel",
            hw.data_parallel,
            "fsdp does not train the hidden-state projections; use ddp with distill_loss.hidden_weight > 0",
        )
        check(
            cfg.train.optimizer == "adamw",
            "hardware.data_parallel",
            hw.data_parallel,
            "fsdp's sharded weights need torch's AdamW (train.optimizer=adamw), or use ddp with adamw_8bit",
        )
    validate_parallel_levers(cfg)


def validate_parallel_levers(cfg: DictConfig) -> None:
    """hardware.ddp_* and fsdp_*: valid values, each set only under the strategy it acts on."""
    hw = cfg.hardware
    for key in ("ddp_comm_dtype", "fsdp_param_dtype", "fsdp_reduce_dtype"):
        value = hw[key]
        none = "" if key == "ddp_comm_dtype" else "null or "  # the fsdp dtypes are optional
        check(
            value in PARALLEL_DTYPES or (value is None and bool(none)),
            f"hardware.{key}",
            value,
            f"choose {none}one of {', '.join(PARALLEL_DTYPES)}",
        )
    cap = hw.ddp_bucket_cap_mb
    check(
        cap is None or cap >= 1, "hardware.ddp_bucket_cap_mb", cap, "null (torch's default, 25) or a number of MB >= 1"
    )
    at_least(cfg, "hardware.fsdp_prefetch", 0)
    # a lever of the other strategy would be ignored silently: refuse it, as compile_memory_budget does without compile
    unused = "fsdp" if hw.data_parallel == "ddp" else "ddp"
    for key in (str(k) for k in hw.keys() if str(k).startswith(f"{unused}_")):
        default = getattr(HardwareConfig, key)
        shown = "null" if default is None else str(default).lower()  # as YAML writes it
        check(
            hw[key] == default,
            f"hardware.{key}",
            hw[key],
            f"it acts under hardware.data_parallel={unused} only: set that, or leave it at {shown}",
        )


def validate_cpu_hardware(cfg: DictConfig) -> None:
    """A job on the CPU."""
    hw = cfg.hardware
    check(
        hw.num_gpus == 0,
        "hardware.num_gpus",
        hw.num_gpus,
        "a CPU job uses 0 GPUs (set hardware=gpu for CUDA; on the CPU, torchrun's processes share the cores)",
    )
    check(
        hw.attn_implementation != "flash_attention_2",
        "hardware.attn_implementation",
        hw.attn_implementation,
        "flash_attention_2 needs a CUDA GPU; use sdpa or eager on the CPU",
    )


def validate_remote_gpus(cfg: DictConfig) -> None:
    """A CUDA job checked on another machine than the one it runs on (a SLURM sweep's submitting machine)."""
    hw = cfg.hardware
    check(hw.num_gpus >= 1, "hardware.num_gpus", hw.num_gpus, "a CUDA job uses at least 1 GPU")
    check(
        hw.num_gpus == 1 or cfg.task.name == "distill",
        "hardware.num_gpus",
        hw.num_gpus,
        f"only task=distill trains on several GPUs (data-parallel); task={cfg.task.name} uses 1",
    )


def validate_part_names(cfg: DictConfig) -> None:
    """precision.parts.*: known part names, and only dtype and quantization set on each."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.models.parts import PART_DESCRIPTIONS, PARTS, part_settings

    parts_text = ", ".join(f"{p} ({PART_DESCRIPTIONS[p]})" for p in PARTS)
    for name, own in part_settings(cfg.precision).items():
        if name not in PARTS:
            set_keys = [
                f"precision.parts.{name}.{k}"
                for k in ("dtype", "quantization")
                if own is not None and own.get(k) is not None
            ] or [f"precision.parts.{name}"]
            raise ConfigError(
                f"precision.parts.{name}{origin(set_keys[0])} names no part of the model: choose among "
                f"{parts_text} (the modules of Qwen2VLForConditionalGeneration)."
            )
        for field_name in own or {}:
            if field_name not in ("dtype", "quantization"):
                key = f"precision.parts.{name}.{field_name}"
                raise ConfigError(f"{key}{origin(key)} is not a setting of a part: a part has dtype and quantization.")


def explicit_part_quantizations(cfg: DictConfig) -> List[Tuple[str, str]]:
    """(key, quantization) of each part quantization set to a kind (not none, not null)."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.models.parts import explicit_quantizations

    return [(key, q) for key, q in explicit_quantizations(cfg.precision) if q != "none"]


def validate_part_quantization(cfg: DictConfig, explicit: Sequence[Tuple[str, str]]) -> None:
    """No quantized part on a student that distill trains in full, and one bitsandbytes kind per
    model; `explicit`: explicit_part_quantizations (their backends are checked before)."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.models.parts import resolve_parts

    if explicit and cfg.task.name == "distill" and not cfg.lora.enabled:
        key, quantization = explicit[0]
        part = key.split(".")[2]
        raise ConfigError(
            f"{key}={quantization}{origin(key)} is invalid: it would quantize the student's {part} part, which "
            f"task=distill trains in full, and quantized weights must train through LoRA adapters: set "
            f"lora.enabled=true (QLoRA), or set it to null (the model-wide precision.quantization, which "
            f"quantizes frozen weights only: the teacher; precision.teacher_quantization for the teacher alone)."
        )
    explicit_parts = [key.split(".")[2] for key, _ in explicit]
    for role in roles_used(cfg):
        trained_in_full = role == "student" and cfg.task.name == "distill" and not cfg.lora.enabled
        resolved = resolve_parts(cfg.precision, role, frozen_weights=not trained_in_full)
        kinds = {p: r.quantization for p, r in resolved.items() if r.quantized}
        if len(set(kinds.values())) > 1:  # name a part set explicitly, against the kind of the others
            part = next((p for p in reversed(explicit_parts) if p in kinds), list(kinds)[-1])
            other = next(q for p, q in kinds.items() if q != kinds[part])
            key = f"precision.parts.{part}.quantization"
            mix = ", ".join(f"{p}={q}" for p, q in kinds.items())
            raise ConfigError(
                f"{key}={kinds[part]}{origin(key)} is invalid: the {role}'s quantized parts would be {mix}, "
                f"but one model is quantized by one bitsandbytes config, so they must share one kind: "
                f"choose {other} or none for {part}."
            )


def validate_quantization_under_lora(cfg: DictConfig, key: str, quantization: str) -> None:
    """A torchao-quantized base carries no LoRA adapters (its backend: environment.validate_quantization_backend)."""
    if (
        quantization in ("int8_weight_only", "fp8")
        and cfg.task.name == "distill"
        and cfg.lora.enabled
        and not key.endswith("teacher_quantization")
    ):
        raise ConfigError(
            f"{key}={quantization}{origin(key)} is invalid under LoRA: torchao-quantized weights "
            "carry no LoRA adapters here; choose int8 or nf4 (bitsandbytes, QLoRA) for the student's base."
        )


def validate_model_side(cfg: DictConfig, role: str) -> None:
    """model.<role>: a source, and a tiny model's sizes (a directory or hub id: environment.validate_model_source)."""
    side = cfg.model[role]
    key = f"model.{role}.source"
    source = side.source
    check(bool(source.strip()), key, source, "give 'tiny', a hub id or a local model directory")
    if source == "tiny":
        check(
            side.tiny is not None, f"model.{role}.tiny", None, "a tiny model needs its sizes (see conf/model/tiny.yaml)"
        )
        _validate_tiny(cfg, role)
        if role == "teacher" and enum_value(side.weights) == "pretrained":
            check(
                side.tiny.pretrain_steps >= 1,
                f"model.{role}.tiny.pretrain_steps",
                side.tiny.pretrain_steps,
                "a pretrained tiny teacher is trained on first use for >= 1 steps (or set weights=random)",
            )


def _validate_tiny(cfg: DictConfig, role: str) -> None:
    tiny = cfg.model[role].tiny
    prefix = f"model.{role}.tiny"
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "vision_depth",
        "vision_embed_dim",
        "vision_heads",
        "vocab_padding",
    ):
        at_least(cfg, f"{prefix}.{name}", 1)
    check(
        tiny.hidden_size % tiny.num_heads == 0,
        f"{prefix}.num_heads",
        tiny.num_heads,
        f"it must divide hidden_size={tiny.hidden_size}",
    )
    head_dim = tiny.hidden_size // tiny.num_heads
    check(
        head_dim % 8 == 0,
        f"{prefix}.num_heads",
        tiny.num_heads,
        f"the head size hidden_size/num_heads={head_dim} must be a multiple of 8 (multimodal rotary sections)",
    )
    check(
        tiny.num_heads % tiny.num_kv_heads == 0,
        f"{prefix}.num_kv_heads",
        tiny.num_kv_heads,
        f"it must divide num_heads={tiny.num_heads}",
    )
    check(
        tiny.vision_embed_dim % tiny.vision_heads == 0,
        f"{prefix}.vision_heads",
        tiny.vision_heads,
        f"it must divide vision_embed_dim={tiny.vision_embed_dim}",
    )
    check(
        (tiny.vision_embed_dim // tiny.vision_heads) % 4 == 0,
        f"{prefix}.vision_heads",
        tiny.vision_heads,
        "the vision head size must be a multiple of 4 (2-D rotary)",
    )
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.models.parts import resolve_parts

    trained_in_full = role == "student" and cfg.task.name == "distill" and not cfg.lora.enabled
    if any(p.quantized for p in resolve_parts(cfg.precision, role, frozen_weights=not trained_in_full).values()):
        for name in ("hidden_size", "intermediate_size", "vision_embed_dim"):
            value = tiny[name]
            check(
                value % 64 == 0, f"{prefix}.{name}", value, "bitsandbytes kernels need widths that are multiples of 64"
            )


def validate_trainable_dtype(cfg: DictConfig) -> None:
    trainable = enum_value(cfg.precision.trainable_dtype)
    check(
        trainable in ("float32", "bfloat16"),
        "precision.trainable_dtype",
        trainable,
        "choose float32 (master weights under autocast) or bfloat16 (pure bf16 training); float16 "
        "weights cannot be trained with the gradient scaler fp16 needs",
    )
