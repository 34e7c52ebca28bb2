"""Checks of the machine and the files a config names: the GPUs and the processes that run the job,
the quantization backends installed, model directories and their weight headers, the hub cache
when offline, the data files and their records, and the two tokenizers of a distill job.

They run after (or between) the pure checks of firstsight.suite.validate.ranges, in the order
firstsight.suite.validate.validate gives, before any model is loaded or any MLflow run is created.
torch and transformers are imported inside the probes that need them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig

from firstsight.core.errors import ConfigError
from firstsight.core.runtime import device_type, in_hub_cache
from firstsight.suite.validate.common import check, enum_value, origin, value_at

# Quantization backends: the package that runs them and the devices it runs on
# (bitsandbytes 0.50 has a CPU backend besides CUDA; torchao's float8 needs a GPU with float8 matmuls).
QUANTIZATION_BACKENDS = {
    "int8": ("bitsandbytes", ("cpu", "cuda")),
    "nf4": ("bitsandbytes", ("cpu", "cuda")),
    "int8_weight_only": ("torchao", ("cpu", "cuda")),
    "fp8": ("torchao", ("cuda",)),
}
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: torch._scaled_mm


def validate_export_checkpoint(cfg: DictConfig) -> None:
    """task=export: the student directory to export exists and holds a model or a LoRA adapter."""
    key = "task.checkpoint"
    checkpoint = cfg.task.checkpoint
    example = "e.g. task.checkpoint=outputs/<date>/<time>/checkpoints/student (a directory a distill run wrote)"
    check(bool(checkpoint), key, checkpoint, f"give the student directory to export, {example}")
    path = Path(os.path.expanduser(checkpoint))
    check(path.is_dir(), key, checkpoint, f"no such directory; {example}")
    check(
        (path / "config.json").is_file() or (path / "adapter_config.json").is_file(),
        key,
        checkpoint,
        f"it holds neither config.json (a model) nor adapter_config.json (a LoRA adapter), so it is not a "
        f"checkpoint; {example}",
    )


def validate_logged_export(cfg: DictConfig) -> None:
    """tracking.log_model with task=export: an adapter is merged first (MLflow loads models only)."""
    if not cfg.tracking.log_model or cfg.task.name != "export":
        return
    check(
        bool(cfg.task.merge_lora)
        or not (Path(os.path.expanduser(str(cfg.task.checkpoint))) / "adapter_config.json").is_file(),
        "tracking.log_model",
        cfg.tracking.log_model,
        "an adapter exported without merging (task.merge_lora=false) is not a model MLflow's transformers "
        "flavour loads: set task.merge_lora=true",
    )


def validate_data_files(cfg: DictConfig) -> None:
    """File data: the image root and the file of each split the task reads (their records: read_data)."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.data.files import resolve_path

    data = cfg.data
    if "format" not in data:
        return
    if data.image_root is not None:
        root = resolve_path(data.image_root)
        check(root.is_dir(), "data.image_root", data.image_root, f"no such directory: {root}")
    for split in _data_splits_read(cfg):
        key = f"data.{split}_file"
        value = value_at(cfg, key)
        check(
            bool(value), key, value, f"task={cfg.task.name} reads the {split} split, so give its .jsonl or .json file"
        )
        path = resolve_path(value)
        check(
            path.is_file(),
            key,
            value,
            f"the file is missing: no such file {path} (relative paths are from the directory run.py was started in)",
        )


def validate_process_layout(cfg: DictConfig) -> None:
    """The processes that run this job (torchrun / SLURM tasks) against hardware.num_gpus."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.core.world import check_layout, launched_world

    problem = check_layout(cfg.hardware, cfg.task.name, launched_world())
    check(problem is None, "hardware.num_gpus", cfg.hardware.num_gpus, str(problem))


def validate_local_gpus(cfg: DictConfig) -> None:
    """A CUDA job on this machine: a GPU is visible, enough of them, and the memory budget fits one."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    import torch

    hw = cfg.hardware
    budget = hw.get("memory_budget_gb")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.device=cuda{origin('hardware.device')} but no CUDA GPU is visible "
            f"(torch {torch.__version__}); choose hardware=cpu or run on a GPU machine."
        )
    visible = torch.cuda.device_count()
    check(
        1 <= hw.num_gpus <= visible,
        "hardware.num_gpus",
        hw.num_gpus,
        f"this machine shows {visible} GPU(s); a CUDA job uses 1..{visible}",
    )
    if budget is not None:
        total_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
        check(
            budget <= total_gb,
            "hardware.memory_budget_gb",
            budget,
            f"this GPU has {total_gb:.1f} GB: a budget can be at most that (or null: no budget)",
        )


def validate_quantization_backend(cfg: DictConfig, key: str, quantization: str, valid: str) -> None:
    """The package of a quantization is installed, runs on the job's device, and fp8 has the GPU it needs."""
    package, devices = QUANTIZATION_BACKENDS[quantization]
    if not _installed(package):
        raise ConfigError(
            f"{key}={quantization}{origin(key)} needs the {package} "
            f"package, which cannot be imported on this machine; install it or {valid}."
        )
    device = device_type(cfg.hardware)
    check(
        device in devices,
        key,
        quantization,
        f"{package} runs on {list(devices)}, not on {device}; {valid}",
    )
    if quantization == "fp8" and _cuda_here(cfg):
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        import torch

        capability = torch.cuda.get_device_capability()
        check(
            capability >= FP8_MIN_CAPABILITY,
            key,
            quantization,
            f"float8 matmuls need a GPU of compute capability >= 8.9 (Ada, Hopper); this "
            f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}; choose int8_weight_only, or {valid}",
        )


def _cuda_here(cfg: DictConfig) -> bool:
    """The job runs on this machine's GPU (not a SLURM node), and torch sees one."""
    if device_type(cfg.hardware) != "cuda":
        return False
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    import torch

    return torch.cuda.is_available()


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules: import blocked
        return False


def validate_model_source(cfg: DictConfig, role: str) -> None:
    """model.<role>.source other than tiny: a loadable local model directory, or a hub id that can be
    fetched (in the local cache when offline)."""
    side = cfg.model[role]
    key = f"model.{role}.source"
    source = side.source
    if source == "tiny":
        return
    if _looks_like_path(source):
        path = Path(os.path.expanduser(source))
        if path.is_file():
            raise ConfigError(
                f"{key}={source!r}{origin(key)} is a file, not a model directory. Give the directory "
                "save_pretrained wrote (with config.json and model.safetensors), a hub id, or 'tiny'."
            )
        if not path.is_dir():
            raise ConfigError(
                f"{key}={source!r}{origin(key)}: no such directory. Give an existing local model directory, a hub id, or 'tiny'."
            )
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}={source!r}{origin(key)} is a LoRA adapter, not a model: give the merged student the "
                f"same run wrote beside it ({path.parent / 'student'}), or export it merged with task=export."
            )
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}={source!r}{origin(key)}: {path} has no config.json, so it is not a model directory (a save_pretrained output is expected)."
            )
        problem = _model_dir_problem(path, role, weights_needed=enum_value(side.weights) != "random")
        if problem:
            raise ConfigError(f"{key}={source!r}{origin(key)}: {problem}.")
        return
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.models.architectures import KNOWN_ARCHITECTURES
    from firstsight.models.llava_ov import KNOWN_LLAVA_ONEVISION

    known = sorted({**KNOWN_ARCHITECTURES, **KNOWN_LLAVA_ONEVISION})  # built offline for weights=random
    if enum_value(side.weights) == "random" and source in known:
        return  # built from the embedded architecture: no download
    if _offline() and not in_hub_cache(source, side.revision):
        raise ConfigError(
            f"{key}={source!r}{origin(key)} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and it is "
            f"not in the local cache. Download it first, give a local directory, use model.{role}.weights=random "
            f"(known architectures: {known}), or model=tiny."
        )


def _model_dir_problem(path: Path, role: str, weights_needed: bool) -> Optional[str]:
    """Why a local model directory cannot be loaded (unreadable config.json, no or missing
    safetensors weights), or None. Only safetensors are loaded: .bin files are pickles."""
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
    loading judges it (firstsight.models.loading.weights_mismatch: other shapes, missing tensors; extra
    ones are ignored). Only Qwen2-VL checkpoints that are not pre-quantized are judged here; loading
    checks the others."""
    config_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if (
        not isinstance(config_json, dict)
        or config_json.get("model_type") != "qwen2_vl"
        or "quantization_config" in config_json
    ):
        return None
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    # deferred: a bad config fails in one line before torch, transformers and mlflow load
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


def validate_pairable(cfg: DictConfig) -> None:
    """The student is a Qwen2-VL, the teacher a Qwen2-VL or a LLaVA-OneVision (read from a tiny
    side's settings, a known hub id or the checkpoint's config.json; no model is loaded)."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.models.loading import check_pairable

    check_pairable(cfg.model)


def check_tokenizers(cfg: DictConfig) -> Tuple[Any, Any]:
    """Distill with two processors: the student's and the teacher's tokenizers agree (loaded, no model,
    before any run exists). Returns the student's processor so loaded and a teacher of another
    architecture's own one, each None where not loaded."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.models.loading import (
        check_same_tokenizer,
        load_processor,
        load_teacher_processor,
        shares_the_processor,
    )

    if shares_the_processor(cfg.model):
        return None, None
    teacher_processor = load_teacher_processor(cfg.model, cfg.cache_dir)
    if teacher_processor is not None and cfg.distill_loss.hidden_weight > 0:
        raise ConfigError(
            f"distill_loss.hidden_weight={cfg.distill_loss.hidden_weight}: the hidden-state term compares the two "
            f"models position by position, and a teacher of another architecture (model.teacher.source="
            f"{cfg.model.teacher.source!r}) sees other positions (its own visual tokens); set distill_loss.hidden_weight=0"
        )
    processor = load_processor(cfg.model, cfg.cache_dir)
    check_same_tokenizer(cfg.model, processor, teacher_processor)
    return processor, teacher_processor


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


def read_data(cfg: DictConfig, processor: Any = None, teacher_processor: Any = None) -> None:
    """The records of each split the task reads (file data): a bad record stops the job here, before
    any model is loaded or run created (firstsight.data.files.file_split keeps what it read for the
    task). With data.max_length set, every sample is measured with the student's processor (loaded
    here, no model); a synthetic sample cannot be skipped, so a longer one is an error."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.data import load_split

    data = cfg.data
    max_length = data.get("max_length")
    if "format" not in data and max_length is None:
        return  # synthetic samples without a limit: nothing to check
    if (max_length is not None or teacher_processor is not None) and processor is None:
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from firstsight.models.loading import load_processor

        processor = load_processor(cfg.model, cfg.cache_dir)
    for split in _data_splits_read(cfg):
        dataset = load_split(data, split, cfg.seed, processor=processor)
        if "format" not in data:
            _check_synthetic_lengths(cfg, dataset, split, processor)
        elif teacher_processor is not None:  # two processors: each must take every frame
            _check_frames(dataset, {"student": processor, "teacher": teacher_processor})


def _check_frames(dataset: Any, processors: Dict[str, Any]) -> None:
    """Every image of the split, at each distinct size, goes through each processor's image
    processor once (a blank frame of that size: no file is decoded); the first sample with a size
    one of them refuses stops the job, naming the sample, the size and the processor."""
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from PIL import Image

    refused: Dict[Tuple[str, Tuple[int, int]], Optional[str]] = {}
    for index in range(len(dataset)):
        for size in dataset.image_sizes(index):
            for role, processor in processors.items():
                if (role, size) not in refused:
                    try:
                        processor.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")
                        refused[role, size] = None
                    except Exception as err:  # whatever the processor raises: its words, on one line
                        refused[role, size] = " ".join(str(err).split()) or type(err).__name__
                if refused[role, size] is not None:
                    raise ConfigError(
                        f"{dataset.where(index)}: a frame of {size[0]}x{size[1]} pixels (after data.max_pixels and "
                        f"data.min_pixels) is refused by the {role}'s processor ({type(processor).__name__}): "
                        f"{refused[role, size]}. Resize the image, change data.max_pixels / data.min_pixels, or "
                        "leave the sample out of the file"
                    )


def _check_synthetic_lengths(cfg: DictConfig, dataset: Any, split: str, processor: Any) -> None:
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
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
        f"data.max_length={max_length}{origin('data.max_length')} is too small for the synthetic data: {split} "
        f"sample {index} (a {sample.kind} question, {len(sample.images)} frame(s) of {side}x{side} px) is {length} "
        f"tokens long ({visual} visual tokens, {length - visual} of text), and generated samples cannot be skipped. "
        f"The longest {split} sample is {longest} tokens: set data.max_length >= {longest} or null (no limit), or "
        "lower data.image_size or data.num_frames."
    )
