"""Checks of the composed config that types cannot express: ranges, combinations, backends.

They run before any model is loaded or any MLflow run is created, so a mistake costs seconds.
Each message names the bad value, where it came from and what is valid.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

from omegaconf import DictConfig

from firstsight.config.schema import OPTIMIZERS
from firstsight.core.errors import ConfigError
from firstsight.core.runtime import device_type, in_hub_cache

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# Quantization backends: the package that runs them and the devices it runs on
# (bitsandbytes 0.50 has a CPU backend besides CUDA; torchao's float8 needs a GPU with float8 matmuls).
QUANTIZATION_BACKENDS = {
    "int8": ("bitsandbytes", ("cpu", "cuda")),
    "nf4": ("bitsandbytes", ("cpu", "cuda")),
    "int8_weight_only": ("torchao", ("cpu", "cuda")),
    "fp8": ("torchao", ("cuda",)),
}
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: torch._scaled_mm


def _origin(key: str) -> str:
    """Where a value came from: a command-line override, or the group's config file."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except Exception:  # composed with the compose API or by hand: no Hydra context
        return ""
    for override in reversed(hydra_cfg.overrides.task):  # the last one given is the one Hydra applied
        if override.lstrip("+~").split("=", 1)[0] == key:
            return f" (command-line override '{override}')"
    group = key.split(".", 1)[0]
    choice = hydra_cfg.runtime.choices.get(group)
    if choice:
        return f" (from conf/{group}/{choice}.yaml)"
    return " (from conf/config.yaml)"


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}{_origin(key)} is invalid: {valid}.")


def _at_least(cfg: DictConfig, key: str, minimum: float) -> None:
    value = _get(cfg, key)
    _check(value >= minimum, key, value, f"it must be >= {minimum}")


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig, tasks: Optional[Mapping[str, Callable]] = None, local_device: bool = True) -> None:
    """Raise ConfigError for the first problem found in `cfg`. `local_device=False`: the job runs
    elsewhere (a SLURM sweep checked on the submitting machine), so this machine's GPUs are not
    looked at; the job checks them again where it runs."""
    if tasks is not None:
        _check(cfg.task.name in tasks, "task.name", cfg.task.name, f"choose one of {sorted(tasks)}")
    _validate_known_keys(cfg)
    _validate_numbers(cfg)
    _validate_hidden_loss(cfg)
    if cfg.task.name == "profile":
        for key, minimum in [
            ("task.new_tokens", 1),
            ("task.warmup_queries", 0),
            ("task.latency_queries", 1),
            ("task.throughput_batch_size", 1),
            ("task.throughput_batches", 1),
        ]:
            _at_least(cfg, key, minimum)
    if cfg.task.name == "evaluate":
        from firstsight.data.synthetic import SPLITS

        _check(cfg.task.split in SPLITS, "task.split", cfg.task.split, f"choose one of {list(SPLITS)}")
        _at_least(cfg, "task.max_new_tokens", 1)
        _at_least(cfg, "task.batch_size", 1)
    if cfg.task.name == "export":
        _validate_export(cfg)
    if cfg.task.name == "report":
        _validate_report(cfg)
    _validate_tracking(cfg)
    _validate_lora(cfg)
    _validate_teacher_cache(cfg)
    _validate_data(cfg)
    _validate_hardware(cfg, local_device)
    _validate_precision(cfg)
    for role in _roles_used(cfg):
        _validate_model_side(cfg, role)
    processor = None
    if local_device and cfg.task.name == "distill" and "teacher" in _roles_used(cfg):
        from firstsight.models.loading import check_same_tokenizer, load_processor, shares_the_processor

        if not shares_the_processor(cfg):  # two tokenizers to compare: loaded (no model) before any run exists
            processor = load_processor(cfg)
            check_same_tokenizer(cfg, processor)
    if local_device:  # on the machine the job runs on (a SLURM sweep's submitting machine only checks the paths)
        _read_data(cfg, processor)


def _validate_report(cfg: DictConfig) -> None:
    task = cfg.task
    _at_least(cfg, "task.max_runs", 1)
    for key in ("task.experiment", "task.sweep", "task.output_dir"):
        value = _get(cfg, key)
        _check(value is None or bool(str(value).strip()), key, value, "leave it unset (null) or give a non-empty value")
    _check(
        0 <= task.accuracy_drop_target <= 1,
        "task.accuracy_drop_target",
        task.accuracy_drop_target,
        "accuracies are fractions: it must lie in [0, 1] (0.01 = 1 point)",
    )
    _check(
        task.throughput_gain_target > 0,
        "task.throughput_gain_target",
        task.throughput_gain_target,
        "it is a ratio to the baseline's throughput and must be > 0 (2.0 = twice as fast)",
    )
    _check(
        0 < task.vram_saving_target <= 1,
        "task.vram_saving_target",
        task.vram_saving_target,
        "it is the largest allowed ratio to the baseline's peak VRAM and must lie in (0, 1] (0.5 = half)",
    )


def _roles_used(cfg: DictConfig) -> List[str]:
    """The model sides a task loads (profile: only its target; export and report: none)."""
    if cfg.task.name == "profile":
        return [_enum_value(cfg.task.target)]
    if cfg.task.name in ("export", "report"):
        return []
    return ["teacher", "student"]


def _validate_known_keys(node: Any, path: str = "") -> None:
    """Every key of a typed section is one its schema has. Hydra refuses an unknown key given as
    `key=value`, but `+key=value` appends it; under a typed section (a dataclass of
    firstsight.config.schema) nothing would read it, so a typo there would be silently ignored. Dict-typed
    nodes (precision.parts) are checked where they are used."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    from firstsight.config.composition import closest  # the closest valid key, as for Hydra's unknown keys

    schema = OmegaConf.get_type(node)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if fields is not None and key not in fields and not (not path and key == "hydra"):
            guess = closest(full, path, fields, node)
            where = path or "the config (top level)"
            raise ConfigError(
                f"{full}{_origin(full)} is not a key of {where}"
                + (f"; did you mean {guess}?" if guess else ".")
                + f" Valid keys of {path or 'the top level'}: {', '.join(fields)}."
            )
        child = node._get_node(key)
        if fields is not None and isinstance(child, DictConfig) and not (not path and key == "hydra"):
            _validate_known_keys(child, full)  # not below a dict-typed node: precision.parts has its own checks


def _validate_numbers(cfg: DictConfig) -> None:
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
        _at_least(cfg, key, minimum)
    _check(cfg.train.lr > 0, "train.lr", cfg.train.lr, "the learning rate must be > 0")
    # train.max_steps <= train.throughput_warmup_steps runs (a smoke run): firstsight.core.perf.ThroughputMeter
    # measures what it can and warns.
    _check(
        cfg.train.optimizer in OPTIMIZERS,
        "train.optimizer",
        cfg.train.optimizer,
        f"choose one of {', '.join(OPTIMIZERS)}",
    )
    _check(
        cfg.train.logits in ("answer_positions", "all_positions"),
        "train.logits",
        cfg.train.logits,
        "choose answer_positions (the output head only where a loss is taken) or all_positions (every token)",
    )
    resume = str(cfg.train.resume)
    _check(
        resume in ("auto", "never") or bool(resume.strip()),
        "train.resume",
        resume,
        "auto, never, or the path of a run directory or checkpoint to continue from",
    )
    budget = cfg.hardware.compile_memory_budget
    _check(
        0 < budget <= 1,
        "hardware.compile_memory_budget",
        budget,
        "a share of the activations in (0, 1]; 1 keeps what the compiler would keep anyway",
    )
    _check(
        budget == 1 or cfg.hardware.compile,
        "hardware.compile_memory_budget",
        budget,
        "it acts on compiled blocks only: add hardware.compile=true, or leave it at 1",
    )
    multiple = cfg.hardware.pad_to_multiple_of
    _check(
        multiple is None or multiple >= 1,
        "hardware.pad_to_multiple_of",
        multiple,
        "null (each batch as long as its longest sample) or a number of tokens >= 1, e.g. 64",
    )
    threads = cfg.hardware.num_threads
    _check(threads is None or threads >= 1, "hardware.num_threads", threads, "null or >= 1")
    loss = cfg.distill_loss
    _check(loss.temperature > 0, "distill_loss.temperature", loss.temperature, "it must be > 0")
    _check(0 <= loss.alpha <= 1, "distill_loss.alpha", loss.alpha, "it must lie in [0, 1]")
    # Settings whose kd term is identically zero (losses.JSD, losses._Skewed) or carries no weight:
    # the run would train on cross-entropy alone while still paying for the teacher.
    ce_only = "the run would train on cross-entropy alone while paying for the teacher every step"
    control = "or distill_loss=none for a cross-entropy-only run (the control, which does not run the teacher)"
    if "beta" in loss:
        _check(
            0 <= loss.beta <= 1,
            "distill_loss.beta",
            loss.beta,
            "it must lie strictly between 0 and 1 (0.5: the symmetric JSD)",
        )
        _check(
            0 < loss.beta < 1,
            "distill_loss.beta",
            loss.beta,
            f"at beta 0 and 1 the generalized JSD is identically zero: {ce_only}; choose beta strictly between "
            f"0 and 1 (0.5: the symmetric JSD), distill_loss=forward_kl / reverse_kl for the KLs it tends to "
            f"at those ends, {control}",
        )
    if "skew" in loss:
        _check(
            0 <= loss.skew <= 1,
            "distill_loss.skew",
            loss.skew,
            "it must lie in [0, 1) (0: the plain KL; 0.1: the default)",
        )
        _check(
            loss.skew < 1,
            "distill_loss.skew",
            loss.skew,
            f"at skew 1 the mixture is the first distribution itself and the skew KL is identically zero: "
            f"{ce_only}; choose skew in [0, 1) (0: the plain KL; 0.1: the default), {control}",
        )
    if loss.name == "none":
        _check(
            loss.alpha == 0,
            "distill_loss.alpha",
            loss.alpha,
            "distill_loss=none trains on cross-entropy alone, so alpha must be 0",
        )
    elif loss.get("hidden_weight", 0) == 0:  # alpha 0 with the hidden-state term is meaningful (it needs the teacher)
        _check(
            loss.alpha > 0,
            "distill_loss.alpha",
            loss.alpha,
            f"alpha 0 gives the kd term no weight: {ce_only}; choose alpha in (0, 1], {control}",
        )


def _validate_hidden_loss(cfg: DictConfig) -> None:
    """distill_loss.hidden_*: the optional hidden-state term (firstsight.losses.kd.HiddenDistillation)."""
    import math

    from firstsight.losses.kd import HIDDEN_LOSS_KINDS

    loss = cfg.distill_loss
    weight = loss.hidden_weight
    _check(
        weight >= 0 and math.isfinite(weight),
        "distill_loss.hidden_weight",
        weight,
        "it must be a finite number >= 0 (0 turns the hidden-state term off)",
    )
    _check(
        loss.hidden_loss in HIDDEN_LOSS_KINDS,
        "distill_loss.hidden_loss",
        loss.hidden_loss,
        f"choose one of {list(HIDDEN_LOSS_KINDS)}",
    )
    layers = list(loss.hidden_layers)
    _check(
        len(layers) > 0,
        "distill_loss.hidden_layers",
        layers,
        "name at least one student hidden-state index, e.g. [-1] (the last)",
    )
    student = cfg.model.student
    if student.source == "tiny" and student.tiny is not None:  # other models: checked once loaded
        depth = student.tiny.num_layers
        for index in layers:
            _check(
                -(depth + 1) <= index <= depth,
                "distill_loss.hidden_layers",
                layers,
                f"the student has {depth} layers: indices lie in [{-(depth + 1)}, {depth}] "
                "(0: the embeddings, -1: the last)",
            )
    if weight == 0 or cfg.task.name != "distill":
        return
    _check(
        loss.name != "none",
        "distill_loss.hidden_weight",
        weight,
        "distill_loss=none does not run the teacher, whose hidden states the term needs; set it to 0, "
        "or keep plain cross-entropy plus the hidden term with distill_loss=forward_kl distill_loss.alpha=0",
    )
    cache = cfg.get("teacher_cache")
    if cache is not None and cache.enabled:
        _check(
            False,
            "distill_loss.hidden_weight",
            weight,
            "the teacher-logit cache (teacher_cache.enabled=true) does not run the teacher, whose hidden "
            "states the term needs; set it to 0 or teacher_cache.enabled=false",
        )


def _validate_data(cfg: DictConfig) -> None:
    from firstsight.data.synthetic import QUESTION_KINDS

    data = cfg.data
    _at_least(cfg, "data.train_size", 1)
    _at_least(cfg, "data.validation_size", 1)
    _at_least(cfg, "data.image_size", 56)
    _at_least(cfg, "data.num_frames", 2)
    kinds: List[str] = list(data.kinds)
    _check(len(kinds) > 0, "data.kinds", kinds, f"name at least one of {list(QUESTION_KINDS)}")
    for kind in kinds:
        _check(kind in QUESTION_KINDS, "data.kinds", kind, f"choose from {list(QUESTION_KINDS)}")
    max_length = data.get("max_length")
    _check(
        max_length is None or max_length >= 1,
        "data.max_length",
        max_length,
        "null (no limit) or >= 1 tokens per sample (prompt with its visual tokens, and answer)",
    )
    if "format" in data:  # read from files (the synthetic settings above only shape the tiny teacher's pre-training)
        _validate_data_files(cfg)


def _data_splits_read(cfg: DictConfig) -> List[str]:
    """The splits a task reads: distill its train split (and validation when it evaluates at the end),
    evaluate its task.split, profile the validation split; export and report none."""
    name = cfg.task.name
    if name == "distill":
        return ["train", "validation"] if cfg.train.eval_at_end else ["train"]
    if name == "evaluate":
        return [cfg.task.split]
    if name == "profile":
        return ["validation"]
    return []


def _validate_data_files(cfg: DictConfig) -> None:
    """The file settings and the files of each split the task reads (their records: _read_data)."""
    from firstsight.data.files import BAD_SAMPLE_POLICIES, FORMATS, resolve_path

    data = cfg.data
    _check(data.format in FORMATS, "data.format", data.format, f"choose one of {list(FORMATS)}")
    _check(
        data.on_bad_sample in BAD_SAMPLE_POLICIES,
        "data.on_bad_sample",
        data.on_bad_sample,
        f"choose one of {list(BAD_SAMPLE_POLICIES)} (stop at the first bad record, or skip and count bad records)",
    )
    _at_least(cfg, "data.max_pixels", 28 * 28)  # one 28 px grid cell
    _at_least(cfg, "data.min_pixels", 1)
    _check(
        data.max_pixels >= data.min_pixels,
        "data.max_pixels",
        data.max_pixels,
        f"it must be >= data.min_pixels={data.min_pixels}",
    )
    _check(data.fps > 0, "data.fps", data.fps, "frames sampled per second of a video must be > 0")
    _at_least(cfg, "data.max_frames", 1)
    if data.image_root is not None:
        root = resolve_path(data.image_root)
        _check(root.is_dir(), "data.image_root", data.image_root, f"no such directory: {root}")
    for split in _data_splits_read(cfg):
        key = f"data.{split}_file"
        value = _get(cfg, key)
        _check(
            bool(value), key, value, f"task={cfg.task.name} reads the {split} split, so give its .jsonl or .json file"
        )
        path = resolve_path(value)
        _check(
            path.is_file(),
            key,
            value,
            f"the file is missing: no such file {path} (relative paths are from the directory run.py was started in)",
        )


def _read_data(cfg: DictConfig, processor: Any = None) -> None:
    """The records of each split the task reads (file data): a bad record stops the job here, before
    any model is loaded or run created (firstsight.data.files.file_split keeps what it read for the
    task). With data.max_length set, every sample is measured with the student's processor (loaded
    here, no model); a synthetic sample cannot be skipped, so a longer one is an error."""
    from firstsight.data import load_split

    data = cfg.data
    max_length = data.get("max_length")
    if "format" not in data and max_length is None:
        return  # synthetic samples without a limit: nothing to check
    if max_length is not None and processor is None:
        from firstsight.models.loading import load_processor

        processor = load_processor(cfg)
    for split in _data_splits_read(cfg):
        dataset = load_split(data, split, cfg.seed, processor=processor)
        if "format" not in data:
            _check_synthetic_lengths(cfg, dataset, split, processor)


def _check_synthetic_lengths(cfg: DictConfig, dataset: Any, split: str, processor: Any) -> None:
    from firstsight.data.batching import sample_length

    max_length = cfg.data.max_length
    longest, first = 0, None
    for index in range(len(dataset)):
        sample = dataset[index]
        length, visual = sample_length(processor, sample.question, sample.answer, [im.size for im in sample.images])
        longest = max(longest, length)
        if first is None and length > max_length:
            first = (index, sample, length, visual)
    if first is None:
        return
    index, sample, length, visual = first
    side = cfg.data.image_size
    raise ConfigError(
        f"data.max_length={max_length}{_origin('data.max_length')} is too small for the synthetic data: {split} "
        f"sample {index} (a {sample.kind} question, {len(sample.images)} frame(s) of {side}x{side} px) is {length} "
        f"tokens long ({visual} visual tokens, {length - visual} of text), and generated samples cannot be skipped. "
        f"The longest {split} sample is {longest} tokens: set data.max_length >= {longest} or null (no limit), or "
        "lower data.image_size or data.num_frames."
    )


def _validate_hardware(cfg: DictConfig, local_device: bool = True) -> None:
    hw = cfg.hardware
    _check(
        hw.attn_implementation in ATTN_IMPLEMENTATIONS,
        "hardware.attn_implementation",
        hw.attn_implementation,
        f"choose one of {list(ATTN_IMPLEMENTATIONS)}",
    )
    budget = hw.get("memory_budget_gb")
    if budget is not None:
        _check(
            math.isfinite(budget) and budget > 0,
            "hardware.memory_budget_gb",
            budget,
            "it must be a positive number of GB (e.g. 4.0), or null for no budget",
        )
        _check(
            cfg.task.name == "profile",
            "hardware.memory_budget_gb",
            budget,
            f"a memory budget is judged by task=profile (edge/fits); task={cfg.task.name} runs uncapped: "
            "set hardware.memory_budget_gb=null (e.g. hardware=gpu or cpu instead of an edge_* preset)",
        )
    device = device_type(cfg)
    if local_device:  # the processes that run this job (torchrun / SLURM tasks) against hardware.num_gpus
        from firstsight.core.world import check_layout, launched_world

        problem = check_layout(cfg, launched_world())
        _check(problem is None, "hardware.num_gpus", hw.num_gpus, str(problem))
    _check(
        hw.data_parallel in ("ddp", "fsdp"),
        "hardware.data_parallel",
        hw.data_parallel,
        "choose ddp (a whole student per GPU) or fsdp (the student sharded over the GPUs)",
    )
    if hw.data_parallel == "fsdp":
        _check(
            not cfg.lora.enabled,
            "hardware.data_parallel",
            hw.data_parallel,
            "fsdp shards a fully trained student; with lora.enabled=true use ddp (the adapters are small)",
        )
        _check(
            not cfg.distill_loss.hidden_weight > 0,
            "hardware.data_parallel",
            hw.data_parallel,
            "fsdp does not train the hidden-state projections; use ddp with distill_loss.hidden_weight > 0",
        )
        _check(
            cfg.train.optimizer == "adamw",
            "hardware.data_parallel",
            hw.data_parallel,
            "fsdp's sharded weights need torch's AdamW (train.optimizer=adamw), or use ddp with adamw_8bit",
        )
    if device == "cpu":
        _check(
            hw.num_gpus == 0,
            "hardware.num_gpus",
            hw.num_gpus,
            "a CPU job uses 0 GPUs (set hardware=gpu for CUDA; on the CPU, torchrun's processes share the cores)",
        )
        _check(
            hw.attn_implementation != "flash_attention_2",
            "hardware.attn_implementation",
            hw.attn_implementation,
            "flash_attention_2 needs a CUDA GPU; use sdpa or eager on the CPU",
        )
        return
    if not local_device:
        _check(hw.num_gpus >= 1, "hardware.num_gpus", hw.num_gpus, "a CUDA job uses at least 1 GPU")
        _check(
            hw.num_gpus == 1 or cfg.task.name == "distill",
            "hardware.num_gpus",
            hw.num_gpus,
            f"only task=distill trains on several GPUs (data-parallel); task={cfg.task.name} uses 1",
        )
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.device=cuda{_origin('hardware.device')} but no CUDA GPU is visible "
            f"(torch {torch.__version__}); choose hardware=cpu or run on a GPU machine."
        )
    visible = torch.cuda.device_count()
    _check(
        1 <= hw.num_gpus <= visible,
        "hardware.num_gpus",
        hw.num_gpus,
        f"this machine shows {visible} GPU(s); a CUDA job uses 1..{visible}",
    )
    if budget is not None:
        total_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
        _check(
            budget <= total_gb,
            "hardware.memory_budget_gb",
            budget,
            f"this GPU has {total_gb:.1f} GB: a budget can be at most that (or null: no budget)",
        )


def _validate_precision(cfg: DictConfig) -> None:
    for key in ("precision.quantization", "precision.teacher_quantization"):
        quantization = _enum_value(_get(cfg, key))
        if quantization not in ("none", "None"):
            _validate_quantization_backend(cfg, key, quantization)
    _validate_precision_parts(cfg)
    trainable = _enum_value(cfg.precision.trainable_dtype)
    _check(
        trainable in ("float32", "bfloat16"),
        "precision.trainable_dtype",
        trainable,
        "choose float32 (master weights under autocast) or bfloat16 (pure bf16 training); float16 "
        "weights cannot be trained with the gradient scaler fp16 needs",
    )


def _validate_precision_parts(cfg: DictConfig) -> None:
    """precision.parts.*: known part names, a backend for each part quantization, one bitsandbytes
    kind per model, and no quantized part on a student that distill trains in full."""
    from firstsight.models.parts import PART_DESCRIPTIONS, PARTS, explicit_quantizations, part_settings, resolve_parts

    parts_text = ", ".join(f"{p} ({PART_DESCRIPTIONS[p]})" for p in PARTS)
    for name, own in part_settings(cfg).items():
        if name not in PARTS:
            set_keys = [
                f"precision.parts.{name}.{k}"
                for k in ("dtype", "quantization")
                if own is not None and own.get(k) is not None
            ] or [f"precision.parts.{name}"]
            raise ConfigError(
                f"precision.parts.{name}{_origin(set_keys[0])} names no part of the model: choose among "
                f"{parts_text} (the modules of Qwen2VLForConditionalGeneration)."
            )
        for field_name in own or {}:
            if field_name not in ("dtype", "quantization"):
                key = f"precision.parts.{name}.{field_name}"
                raise ConfigError(f"{key}{_origin(key)} is not a setting of a part: a part has dtype and quantization.")
    explicit = [(key, q) for key, q in explicit_quantizations(cfg) if q != "none"]
    for key, quantization in explicit:
        _validate_quantization_backend(
            cfg, key, quantization, valid=f"set {key}=none, or null to follow precision.quantization"
        )
    if explicit and cfg.task.name == "distill" and not cfg.lora.enabled:
        key, quantization = explicit[0]
        part = key.split(".")[2]
        raise ConfigError(
            f"{key}={quantization}{_origin(key)} is invalid: it would quantize the student's {part} part, which "
            f"task=distill trains in full, and quantized weights must train through LoRA adapters: set "
            f"lora.enabled=true (QLoRA), or set it to null (the model-wide precision.quantization, which "
            f"quantizes frozen weights only: the teacher; precision.teacher_quantization for the teacher alone)."
        )
    explicit_parts = [key.split(".")[2] for key, _ in explicit]
    for role in _roles_used(cfg):
        trained_in_full = role == "student" and cfg.task.name == "distill" and not cfg.lora.enabled
        resolved = resolve_parts(cfg, role, frozen_weights=not trained_in_full)
        kinds = {p: r.quantization for p, r in resolved.items() if r.quantized}
        if len(set(kinds.values())) > 1:  # name a part set explicitly, against the kind of the others
            part = next((p for p in reversed(explicit_parts) if p in kinds), list(kinds)[-1])
            other = next(q for p, q in kinds.items() if q != kinds[part])
            key = f"precision.parts.{part}.quantization"
            mix = ", ".join(f"{p}={q}" for p, q in kinds.items())
            raise ConfigError(
                f"{key}={kinds[part]}{_origin(key)} is invalid: the {role}'s quantized parts would be {mix}, "
                f"but one model is quantized by one bitsandbytes config, so they must share one kind: "
                f"choose {other} or none for {part}."
            )


def _validate_quantization_backend(
    cfg: DictConfig, key: str, quantization: str, valid: str = "choose precision=fp32, bf16 or fp16 (no quantization)"
) -> None:
    package, devices = QUANTIZATION_BACKENDS[quantization]
    if not _installed(package):
        raise ConfigError(
            f"{key}={quantization}{_origin(key)} needs the {package} "
            f"package, which cannot be imported on this machine; install it or {valid}."
        )
    device = device_type(cfg)
    _check(
        device in devices,
        key,
        quantization,
        f"{package} runs on {list(devices)}, not on {device}; {valid}",
    )
    if quantization == "fp8" and _cuda_here(cfg):
        import torch

        capability = torch.cuda.get_device_capability()
        _check(
            capability >= FP8_MIN_CAPABILITY,
            key,
            quantization,
            f"float8 matmuls need a GPU of compute capability >= 8.9 (Ada, Hopper); this "
            f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}; choose int8_weight_only, or {valid}",
        )
    if (
        quantization in ("int8_weight_only", "fp8")
        and cfg.task.name == "distill"
        and cfg.lora.enabled
        and not key.endswith("teacher_quantization")
    ):
        raise ConfigError(
            f"{key}={quantization}{_origin(key)} is invalid under LoRA: torchao-quantized weights "
            "carry no LoRA adapters here; choose int8 or nf4 (bitsandbytes, QLoRA) for the student's base."
        )


def _cuda_here(cfg: DictConfig) -> bool:
    """The job runs on this machine's GPU (not a SLURM node), and torch sees one."""
    if device_type(cfg) != "cuda":
        return False
    import torch

    return torch.cuda.is_available()


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules: import blocked
        return False


def _enum_value(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)


def _validate_tracking(cfg: DictConfig) -> None:
    tracking = cfg.tracking
    _check(
        tracking.system_metrics_interval_s > 0,
        "tracking.system_metrics_interval_s",
        tracking.system_metrics_interval_s,
        "it is the seconds between samples and must be > 0 (tracking.system_metrics=false turns them off)",
    )
    if not tracking.log_model:
        return
    _check(
        bool(tracking.enabled),
        "tracking.log_model",
        tracking.log_model,
        "it logs the student to the job's MLflow run, and tracking.enabled=false means no run: enable tracking",
    )
    if cfg.task.name == "distill":
        _check(
            bool(cfg.train.save_checkpoint),
            "tracking.log_model",
            tracking.log_model,
            "it logs the saved student, and train.save_checkpoint=false saves none: set train.save_checkpoint=true",
        )
    if cfg.task.name == "export":
        _check(
            bool(cfg.task.merge_lora)
            or not (Path(os.path.expanduser(str(cfg.task.checkpoint))) / "adapter_config.json").is_file(),
            "tracking.log_model",
            tracking.log_model,
            "an adapter exported without merging (task.merge_lora=false) is not a model MLflow's transformers "
            "flavour loads: set task.merge_lora=true",
        )


def _validate_export(cfg: DictConfig) -> None:
    key = "task.checkpoint"
    checkpoint = cfg.task.checkpoint
    example = "e.g. task.checkpoint=outputs/<date>/<time>/checkpoints/student (a directory a distill run wrote)"
    _check(bool(checkpoint), key, checkpoint, f"give the student directory to export, {example}")
    path = Path(os.path.expanduser(checkpoint))
    _check(path.is_dir(), key, checkpoint, f"no such directory; {example}")
    _check(
        (path / "config.json").is_file() or (path / "adapter_config.json").is_file(),
        key,
        checkpoint,
        f"it holds neither config.json (a model) nor adapter_config.json (a LoRA adapter), so it is not a "
        f"checkpoint; {example}",
    )


def _validate_lora(cfg: DictConfig) -> None:
    lora = cfg.lora
    _at_least(cfg, "lora.rank", 1)
    _check(lora.alpha > 0, "lora.alpha", lora.alpha, "it must be > 0")
    _check(0 <= lora.dropout < 1, "lora.dropout", lora.dropout, "it must lie in [0, 1)")
    _check(
        len(lora.target_modules) > 0,
        "lora.target_modules",
        list(lora.target_modules),
        "name at least one linear layer, e.g. [q_proj,v_proj]",
    )


def _validate_teacher_cache(cfg: DictConfig) -> None:
    """teacher_cache.*; that top_k fits the student's vocabulary is checked once the student is
    loaded, and with distill_loss=none (no teacher) the cache is ignored, with a message."""
    if cfg.get("teacher_cache") is None:
        return
    if cfg.teacher_cache.top_k is not None:  # null: every id of the student's vocabulary
        _at_least(cfg, "teacher_cache.top_k", 1)
    _at_least(cfg, "teacher_cache.shard_size", 1)
    directory = cfg.teacher_cache.dir
    _check(
        directory is None or bool(str(directory).strip()),
        "teacher_cache.dir",
        directory,
        "leave it unset (null: <cache_dir>/teacher-logits) or give a directory",
    )


def _validate_model_side(cfg: DictConfig, role: str) -> None:
    side = cfg.model[role]
    key = f"model.{role}.source"
    source = side.source
    _check(bool(source.strip()), key, source, "give 'tiny', a hub id or a local model directory")
    if source == "tiny":
        _check(
            side.tiny is not None, f"model.{role}.tiny", None, "a tiny model needs its sizes (see conf/model/tiny.yaml)"
        )
        _validate_tiny(cfg, role)
        if role == "teacher" and _enum_value(side.weights) == "pretrained":
            _check(
                side.tiny.pretrain_steps >= 1,
                f"model.{role}.tiny.pretrain_steps",
                side.tiny.pretrain_steps,
                "a pretrained tiny teacher is trained on first use for >= 1 steps (or set weights=random)",
            )
        return
    if _looks_like_path(source):
        path = Path(os.path.expanduser(source))
        if path.is_file():
            raise ConfigError(
                f"{key}={source!r}{_origin(key)} is a file, not a model directory. Give the directory "
                "save_pretrained wrote (with config.json and model.safetensors), a hub id, or 'tiny'."
            )
        if not path.is_dir():
            raise ConfigError(
                f"{key}={source!r}{_origin(key)}: no such directory. Give an existing local model directory, a hub id, or 'tiny'."
            )
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}={source!r}{_origin(key)} is a LoRA adapter, not a model: give the merged student the "
                f"same run wrote beside it ({path.parent / 'student'}), or export it merged with task=export."
            )
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}={source!r}{_origin(key)}: {path} has no config.json, so it is not a model directory (a save_pretrained output is expected)."
            )
        problem = _model_dir_problem(path, role, weights_needed=_enum_value(side.weights) != "random")
        if problem:
            raise ConfigError(f"{key}={source!r}{_origin(key)}: {problem}.")
        return
    from firstsight.models.architectures import KNOWN_ARCHITECTURES

    if _enum_value(side.weights) == "random" and source in KNOWN_ARCHITECTURES:
        return  # built from the embedded architecture: no download
    if _offline() and not in_hub_cache(source, side.revision):
        raise ConfigError(
            f"{key}={source!r}{_origin(key)} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and it is "
            f"not in the local cache. Download it first, give a local directory, use model.{role}.weights=random "
            f"(known architectures: {sorted(KNOWN_ARCHITECTURES)}), or model=tiny."
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
        _at_least(cfg, f"{prefix}.{name}", 1)
    _check(
        tiny.hidden_size % tiny.num_heads == 0,
        f"{prefix}.num_heads",
        tiny.num_heads,
        f"it must divide hidden_size={tiny.hidden_size}",
    )
    head_dim = tiny.hidden_size // tiny.num_heads
    _check(
        head_dim % 8 == 0,
        f"{prefix}.num_heads",
        tiny.num_heads,
        f"the head size hidden_size/num_heads={head_dim} must be a multiple of 8 (multimodal rotary sections)",
    )
    _check(
        tiny.num_heads % tiny.num_kv_heads == 0,
        f"{prefix}.num_kv_heads",
        tiny.num_kv_heads,
        f"it must divide num_heads={tiny.num_heads}",
    )
    _check(
        tiny.vision_embed_dim % tiny.vision_heads == 0,
        f"{prefix}.vision_heads",
        tiny.vision_heads,
        f"it must divide vision_embed_dim={tiny.vision_embed_dim}",
    )
    _check(
        (tiny.vision_embed_dim // tiny.vision_heads) % 4 == 0,
        f"{prefix}.vision_heads",
        tiny.vision_heads,
        "the vision head size must be a multiple of 4 (2-D rotary)",
    )
    from firstsight.models.parts import resolve_parts

    trained_in_full = role == "student" and cfg.task.name == "distill" and not cfg.lora.enabled
    if any(p.quantized for p in resolve_parts(cfg, role, frozen_weights=not trained_in_full).values()):
        for name in ("hidden_size", "intermediate_size", "vision_embed_dim"):
            value = tiny[name]
            _check(
                value % 64 == 0, f"{prefix}.{name}", value, "bitsandbytes kernels need widths that are multiples of 64"
            )


def _model_dir_problem(path: Path, role: str, weights_needed: bool) -> Optional[str]:
    """Why a local model directory cannot be loaded (unreadable config.json, no or missing
    safetensors weights), or None. Only safetensors are loaded: .bin files are pickles."""
    import json

    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return (
            f"{path / 'config.json'} cannot be read as JSON ({err}): the directory is damaged or was cut short; "
            "save the model again (save_pretrained)"
        )
    if not weights_needed:
        return None
    random = f", or set model.{role}.weights=random for its architecture alone"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            return f"{index} cannot be read ({err}): the checkpoint is damaged; save the model again"
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            return (
                f"the checkpoint is incomplete: {len(missing)} of the {len(shards)} weight files that "
                f"model.safetensors.index.json lists are missing ({', '.join(missing[:3])}); copy them again{random}"
            )
        return _weights_problem(path, shards, random)
    if (path / "model.safetensors").is_file():
        return _weights_problem(path, ["model.safetensors"], random)
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickled:
        return (
            f"{path} holds {', '.join(pickled[:3])} but no model.safetensors: FirstSight loads weights only as "
            f"safetensors, never pickle files; convert them (save_pretrained(..., safe_serialization=True)){random}"
        )
    return (
        f"{path} has config.json but no weights (model.safetensors or model.safetensors.index.json): "
        f"an incomplete checkpoint; save or copy it again{random}"
    )


def _weights_problem(path: Path, files: List[str], random: str) -> Optional[str]:
    """Tensors of the safetensors `files` in `path` whose names or shapes do not fit its config.json,
    or None. Read from the files' headers (no tensor data) and compared with the model built from
    config.json on the meta device, under transformers' own renaming of checkpoint keys; judged as
    loading judges it (firstsight.models.loading._weights_mismatch: other shapes, missing tensors; extra
    ones are ignored). Only Qwen2-VL checkpoints that are not pre-quantized are judged here; loading
    checks the others."""
    import json

    config_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if (
        not isinstance(config_json, dict)
        or config_json.get("model_type") != "qwen2_vl"
        or "quantization_config" in config_json
    ):
        return None
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from firstsight.models.loading import weights_mismatch

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):  # shapes only: no memory, ~0.3 s at 7B
            model = Qwen2VLForConditionalGeneration._from_config(config)
        mapping = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a config.json transformers cannot build: loading says why
        return None
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    found, mismatched, holding = set(), [], {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as weights:
                stored = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
        except Exception as err:  # noqa: BLE001 - safetensors' own error: a header that cannot be read
            return (
                f"{path / name} cannot be read as safetensors ({err}): the file is damaged or was cut short; "
                f"save or copy the model again{random}"
            )
        for key, shape in stored.items():
            target, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
            if target not in expected and key in expected:  # as transformers loads it
                target, converted = key, None
            if target not in expected:
                continue  # a tensor the model does not have: ignored when loading too
            found.add(target)
            if converted is None and shape != expected[target]:  # a converter's tensors change shape
                mismatched.append((target, shape, expected[target]))
                holding.setdefault(name, target)
    mismatched.sort()
    problem = weights_mismatch(model, {"mismatched_keys": mismatched, "missing_keys": sorted(set(expected) - found)})
    if problem is None:
        return None
    named = list(holding or files)
    shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    return (
        f"the weights in {path} ({shown}) do not match its config.json: {problem}. The checkpoint "
        f"is damaged or incomplete, or config.json was edited or belongs to another model; save the model "
        f"again{random}"
    )


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.path.isdir(source) or source.count("/") != 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
