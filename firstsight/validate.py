"""Checks of the composed config that types cannot express: ranges, combinations, backends.

They run before any model is loaded or any MLflow run is created, so a mistake costs seconds.
Each message names the bad value, where it came from and what is valid.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

from omegaconf import DictConfig

from firstsight.errors import ConfigError

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# Quantization backends: the package that runs them and the devices it runs on
# (bitsandbytes 0.50 has a CPU backend besides CUDA).
QUANTIZATION_BACKENDS = {"int8": ("bitsandbytes", ("cpu", "cuda")), "nf4": ("bitsandbytes", ("cpu", "cuda"))}


def _origin(key: str) -> str:
    """Where a value came from: a command-line override, or the group's config file."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except Exception:  # composed with the compose API or by hand: no Hydra context
        return ""
    for override in hydra_cfg.overrides.task:
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


def validate(cfg: DictConfig, tasks: Optional[Mapping[str, Callable]] = None) -> None:
    """Raise ConfigError for the first problem found in `cfg`."""
    if tasks is not None:
        _check(cfg.task.name in tasks, "task.name", cfg.task.name, f"choose one of {sorted(tasks)}")
    _validate_numbers(cfg)
    if cfg.task.name == "profile":
        for key, minimum in [("task.new_tokens", 1), ("task.warmup_queries", 0), ("task.latency_queries", 1),
                             ("task.throughput_batch_size", 1), ("task.throughput_batches", 1)]:
            _at_least(cfg, key, minimum)
    if cfg.task.name == "evaluate":
        from firstsight.data.synthetic import SPLITS

        _check(cfg.task.split in SPLITS, "task.split", cfg.task.split, f"choose one of {list(SPLITS)}")
        _at_least(cfg, "task.max_new_tokens", 1)
        _at_least(cfg, "task.batch_size", 1)
    _validate_data(cfg)
    _validate_hardware(cfg)
    _validate_precision(cfg)
    for role in _roles_used(cfg):
        _validate_model_side(cfg, role)


def _roles_used(cfg: DictConfig) -> List[str]:
    """The model sides a task loads (profile: only its target)."""
    if cfg.task.name == "profile":
        return [_enum_value(cfg.task.target)]
    return ["teacher", "student"]


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
    ]:
        _at_least(cfg, key, minimum)
    _check(cfg.train.lr > 0, "train.lr", cfg.train.lr, "the learning rate must be > 0")
    _check(
        cfg.train.throughput_warmup_steps < cfg.train.max_steps,
        "train.throughput_warmup_steps",
        cfg.train.throughput_warmup_steps,
        f"it must be < train.max_steps={cfg.train.max_steps}, or no step is left to measure throughput on",
    )
    threads = cfg.hardware.num_threads
    _check(threads is None or threads >= 1, "hardware.num_threads", threads, "null or >= 1")
    loss = cfg.distill_loss
    _check(loss.temperature > 0, "distill_loss.temperature", loss.temperature, "it must be > 0")
    _check(0 <= loss.alpha <= 1, "distill_loss.alpha", loss.alpha, "it must lie in [0, 1]")
    if "beta" in loss:
        _check(0 <= loss.beta <= 1, "distill_loss.beta", loss.beta, "it must lie in [0, 1]")
    if "skew" in loss:
        _check(0 <= loss.skew <= 1, "distill_loss.skew", loss.skew, "it must lie in [0, 1]")
    if loss.name == "none":
        _check(loss.alpha == 0, "distill_loss.alpha", loss.alpha,
               "distill_loss=none trains on cross-entropy alone, so alpha must be 0")


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


def device_type(cfg: DictConfig) -> str:
    """The device the job will run on; 'auto' resolves to cuda only when a GPU is visible."""
    device = cfg.hardware.device.value if hasattr(cfg.hardware.device, "value") else str(cfg.hardware.device)
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _validate_hardware(cfg: DictConfig) -> None:
    hw = cfg.hardware
    _check(
        hw.attn_implementation in ATTN_IMPLEMENTATIONS,
        "hardware.attn_implementation",
        hw.attn_implementation,
        f"choose one of {list(ATTN_IMPLEMENTATIONS)}",
    )
    device = device_type(cfg)
    if device == "cpu":
        _check(hw.num_gpus == 0, "hardware.num_gpus", hw.num_gpus, "a CPU job uses 0 GPUs (set hardware=gpu for CUDA)")
        _check(
            hw.attn_implementation != "flash_attention_2",
            "hardware.attn_implementation",
            hw.attn_implementation,
            "flash_attention_2 needs a CUDA GPU; use sdpa or eager on the CPU",
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
    _check(
        hw.num_gpus == 1,
        "hardware.num_gpus",
        hw.num_gpus,
        "data-parallel training over several GPUs is not implemented yet; use 1",
    )


def _validate_precision(cfg: DictConfig) -> None:
    quantization = _enum_value(cfg.precision.quantization)
    if quantization == "none":
        return
    package, devices = QUANTIZATION_BACKENDS[quantization]
    valid = "choose precision=fp32, bf16 or fp16 (no quantization)"
    if not _installed(package):
        raise ConfigError(
            f"precision.quantization={quantization}{_origin('precision.quantization')} needs the {package} "
            f"package, which cannot be imported on this machine; install it or {valid}."
        )
    device = device_type(cfg)
    _check(
        device in devices,
        "precision.quantization",
        quantization,
        f"{package} runs on {list(devices)}, not on {device}; {valid}",
    )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules: import blocked
        return False


def _enum_value(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)


def _validate_model_side(cfg: DictConfig, role: str) -> None:
    side = cfg.model[role]
    key = f"model.{role}.source"
    source = side.source
    _check(bool(source.strip()), key, source, "give 'tiny', a hub id or a local model directory")
    if source == "tiny":
        _check(side.tiny is not None, f"model.{role}.tiny", None, "a tiny model needs its sizes (see conf/model/tiny.yaml)")
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
        if not path.is_dir():
            raise ConfigError(f"{key}={source!r}{_origin(key)}: no such directory. Give an existing local model directory, a hub id, or 'tiny'.")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}={source!r}{_origin(key)}: {path} has no config.json, so it is not a model directory (a save_pretrained output is expected).")
        return
    from firstsight.architectures import KNOWN_ARCHITECTURES

    if _enum_value(side.weights) == "random" and source in KNOWN_ARCHITECTURES:
        return  # built from the embedded architecture: no download
    if _offline() and not _in_hub_cache(source, side.revision):
        raise ConfigError(
            f"{key}={source!r}{_origin(key)} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and it is "
            f"not in the local cache. Download it first, give a local directory, use model.{role}.weights=random "
            f"(known architectures: {sorted(KNOWN_ARCHITECTURES)}), or model=tiny."
        )


def _validate_tiny(cfg: DictConfig, role: str) -> None:
    tiny = cfg.model[role].tiny
    prefix = f"model.{role}.tiny"
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "vision_depth", "vision_embed_dim", "vision_heads", "vocab_padding"):
        _at_least(cfg, f"{prefix}.{name}", 1)
    _check(tiny.hidden_size % tiny.num_heads == 0, f"{prefix}.num_heads", tiny.num_heads, f"it must divide hidden_size={tiny.hidden_size}")
    head_dim = tiny.hidden_size // tiny.num_heads
    _check(head_dim % 8 == 0, f"{prefix}.num_heads", tiny.num_heads, f"the head size hidden_size/num_heads={head_dim} must be a multiple of 8 (multimodal rotary sections)")
    _check(tiny.num_heads % tiny.num_kv_heads == 0, f"{prefix}.num_kv_heads", tiny.num_kv_heads, f"it must divide num_heads={tiny.num_heads}")
    _check(tiny.vision_embed_dim % tiny.vision_heads == 0, f"{prefix}.vision_heads", tiny.vision_heads, f"it must divide vision_embed_dim={tiny.vision_embed_dim}")
    _check((tiny.vision_embed_dim // tiny.vision_heads) % 4 == 0, f"{prefix}.vision_heads", tiny.vision_heads, "the vision head size must be a multiple of 4 (2-D rotary)")
    if _enum_value(cfg.precision.quantization) in ("int8", "nf4") and role == "teacher":
        for name in ("hidden_size", "intermediate_size", "vision_embed_dim"):
            value = tiny[name]
            _check(value % 64 == 0, f"{prefix}.{name}", value, "bitsandbytes kernels need widths that are multiples of 64")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.path.isdir(source) or source.count("/") != 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _in_hub_cache(repo_id: str, revision: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)

