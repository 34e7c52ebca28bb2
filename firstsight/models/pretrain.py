"""Competent tiny models for the embedded default, trained on first use and cached.

KD needs a teacher that knows something, and the study's student is itself a pretrained model
(weaker than the teacher), not a random one. Both tiny sides are made the same way: plain
cross-entropy on the answer tokens of the synthetic train split, checked on the validation split,
and saved (as a stock save_pretrained directory, bf16 safetensors) under
`cache_dir/tiny-<role>-<hash>`; the hash covers the side's sizes, its training settings (with its
own seed: runs of any seed share one model) and the data settings, so any change trains a new one.
The train split's size in the hash is the side's `pretrain_train_size` where it sets one (then
data.train_size, the distillation's transfer set, leaves the model alone), else data.train_size.
Later runs load it like any local checkpoint (so INT8/NF4 loading takes the real code path).
Both of the default settings ship in firstsight/assets, so the default run pays no pre-training:
the teacher (2500 steps of 64 fresh samples, trained by this module on an H100 in 7 minutes) and
the student base (the student's smaller architecture, the same recipe and samples for 700 steps of
32: clearly weaker than the teacher, above chance; docs/decisions/0013-main-job.md). Any other
settings train their own on first use (minutes on a CPU, with a progress bar).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import OmegaConf
from transformers import LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration

from firstsight.config.schema import DataConfig, ModelSideConfig
from firstsight.config.specs import ModelSpec
from firstsight.core.errors import ConfigError
from firstsight.core.files import cached_dir, content_key, read_info
from firstsight.core.runtime import device_name, device_type
from firstsight.data import synthetic_split
from firstsight.data.batching import QACollator, batches, in_order
from firstsight.losses.kd import answer_logit_slice
from firstsight.models.llava_ov import LLAVA_ONEVISION, tiny_llava_config
from firstsight.models.tiny import tiny_model_config
from firstsight.training.loop import LoopSettings, answer_accuracy, model_inputs, optimize

log = logging.getLogger(__name__)
RECIPE = "tiny-teacher-v1"  # the teacher's: part of its key, so the shipped teacher keeps its name
RECIPES = {"teacher": RECIPE, "student": "tiny-student-v1"}


def _data_settings(data: DataConfig) -> Dict[str, Any]:
    """The data settings that shape a tiny model's weights (not the validation split's size)."""
    return {
        k: OmegaConf.to_container(data, resolve=True)[k] for k in ("train_size", "image_size", "num_frames", "kinds")
    }


def _key_arch(side: ModelSideConfig) -> Dict[str, Any]:
    """The side's tiny settings as its key sees them. A field added after a shipped model was
    made leaves the key alone while it is unset, so that model keeps its name (the train size is
    in the data settings)."""
    arch = OmegaConf.to_container(side.tiny, resolve=True)
    arch.pop("pretrain_train_size", None)
    if arch.get("architecture") is None:  # Qwen2-VL, as before the field: the shipped models keep their keys
        arch.pop("architecture", None)
    else:
        arch["architecture"] = getattr(arch["architecture"], "value", arch["architecture"])
    return arch


def _pretrain_data(data: DataConfig, side: ModelSideConfig, role: str) -> DataConfig:
    """`data` with the train split's size of the `role`'s pre-training."""
    data = copy.deepcopy(data)
    size = side.tiny.get("pretrain_train_size")
    if size is not None:
        if size < 1:
            raise ConfigError(f"model.{role}.tiny.pretrain_train_size={size}: must be >= 1 (or null: data.train_size)")
        OmegaConf.update(data, "train_size", size)
    return data


def tiny_model_dir(spec: ModelSpec, role: str, processor: Any) -> Path:
    """The trained tiny `role` ("teacher" or "student") of `spec`: the shipped directory of its
    name, else the cached one, trained first if it is not there yet."""
    side = spec.model[role]
    data = _pretrain_data(spec.data, side, role)  # refuses a bad size before anything is trained
    key = content_key(RECIPES[role], _key_arch(side), _data_settings(data), len(processor.tokenizer))
    path = Path(spec.cache_dir) / f"tiny-{role}-{key}"
    return cached_dir(path, lambda out: _pretrain(spec, role, processor, data, out))


def model_info(path: Path) -> Dict[str, Any]:
    """What the pre-training of a trained tiny model recorded (validation accuracy, steps, ...)."""
    return read_info(path)


def _pretrain(spec: ModelSpec, role: str, processor: Any, data: DataConfig, out_dir: Path) -> Dict[str, Any]:
    tiny = spec.model[role].tiny
    log.info(
        "training the tiny %s on first use (%d steps); it is cached in %s", role, tiny.pretrain_steps, out_dir.parent
    )
    device = device_type(spec.hardware)
    seed = tiny.pretrain_seed
    torch.manual_seed(seed)
    if (
        tiny.get("architecture") is not None
        and getattr(tiny.architecture, "value", tiny.architecture) == LLAVA_ONEVISION
    ):
        # a teacher of another architecture, over its own processor (the one passed in)
        model = LlavaOnevisionForConditionalGeneration._from_config(
            tiny_llava_config(tiny, processor.tokenizer), dtype=torch.float32
        )
    else:
        model = Qwen2VLForConditionalGeneration._from_config(
            tiny_model_config(tiny, processor.tokenizer), dtype=torch.float32
        )
    model.to(device)
    collator = QACollator(processor)
    train = synthetic_split(data, "train", seed)
    validation = synthetic_split(spec.data, "validation", seed)

    def cross_entropy(batch: Dict[str, Any], answer_tokens: int) -> Dict[str, Any]:
        keep, labels = answer_logit_slice(batch["labels"])  # the output head only where an answer is predicted
        logits = model(**model_inputs(batch), logits_to_keep=keep).logits[:, :-1].float()
        loss = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
            )
            / answer_tokens
        )
        return {"loss": loss}

    losses = []
    optimize(
        model,
        batches(train, collator, tiny.pretrain_batch_size, seed=seed, workers=spec.hardware.dataloader_workers),
        cross_entropy,
        LoopSettings(
            max_steps=tiny.pretrain_steps,
            lr=tiny.pretrain_lr,
            warmup_steps=tiny.pretrain_steps // 10,
            progress_bar=spec.progress_bar,
            description=f"pre-training tiny {role} (first use, cached)",
        ),
        device=device,
        dtype=torch.float32,
        on_step=lambda step, metrics, *_: losses.append(metrics["loss"]),
    )
    accuracy = answer_accuracy(model, in_order(validation, collator, 32), device, torch.float32)
    info = {
        "recipe": RECIPES[role],
        "validation_accuracy": accuracy,
        "chance_accuracy": validation.chance_accuracy(),
        "validation_size": len(validation),
        "train_size": len(train),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "steps": tiny.pretrain_steps,
        "trained_on": device_name(device),
    }
    log.info("tiny %s: validation accuracy %.3f (chance %.3f)", role, accuracy, info["chance_accuracy"])
    # bf16 on disk halves the size; loading upcasts to the run's dtype.
    model.to(device="cpu", dtype=torch.bfloat16).save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    return info
