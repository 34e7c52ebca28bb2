"""A competent tiny teacher for the embedded default, trained on first use and cached.

KD needs a teacher that knows something. The tiny teacher is trained with plain cross-entropy on
the answer tokens of the synthetic train split, checked on the validation split, and saved (as a
stock save_pretrained directory) under `cache_dir/tiny-teacher-<hash>`; the hash covers its
sizes, its training settings (with its own seed: runs of any seed share one teacher) and the data
settings, so any change trains a new one.
Later runs load it like any local checkpoint (so INT8/NF4 loading takes the real code path).
The teacher of the default settings ships in firstsight/assets (trained by this module on an
H200 in 4 minutes: 2500 steps), so the default run does not pay the pre-training; any other
settings train their own on first use (minutes on a CPU, with a progress bar).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from firstsight.cache import cached_dir, content_key, read_info

log = logging.getLogger(__name__)
RECIPE = "tiny-teacher-v1"


def _data_settings(cfg: DictConfig) -> Dict[str, Any]:
    """The data settings that shape the teacher's weights (not the validation split's size)."""
    return {k: OmegaConf.to_container(cfg.data, resolve=True)[k]
            for k in ("train_size", "image_size", "num_frames", "kinds")}


def tiny_teacher_dir(cfg: DictConfig, role: str, processor: Any) -> Path:
    side = cfg.model[role]
    arch = OmegaConf.to_container(side.tiny, resolve=True)
    key = content_key(RECIPE, arch, _data_settings(cfg), len(processor.tokenizer))
    path = Path(cfg.cache_dir) / f"tiny-teacher-{key}"
    return cached_dir(path, lambda out: _pretrain(cfg, role, processor, out))


def teacher_info(path: Path) -> Dict[str, Any]:
    return read_info(path)


def _pretrain(cfg: DictConfig, role: str, processor: Any, out_dir: Path) -> Dict[str, Any]:
    import torch

    from firstsight.validate import device_type

    from firstsight.data import synthetic_split
    from firstsight.data.batching import QACollator, batches, in_order
    from firstsight.tiny import tiny_model_config
    from firstsight.tracking import device_name
    from firstsight.losses import answer_logit_slice
    from firstsight.train import LoopSettings, answer_accuracy, model_inputs, optimize
    from transformers import Qwen2VLForConditionalGeneration

    tiny = cfg.model[role].tiny
    log.info("training the tiny %s on first use (%d steps); it is cached in %s", role, tiny.pretrain_steps, out_dir.parent)
    device = device_type(cfg)
    seed = tiny.pretrain_seed
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(tiny_model_config(tiny, processor.tokenizer), dtype=torch.float32)
    model.to(device)
    collator = QACollator(processor)
    train = synthetic_split(cfg.data, "train", seed)
    validation = synthetic_split(cfg.data, "validation", seed)

    def cross_entropy(batch: Dict[str, Any], answer_tokens: int) -> Dict[str, Any]:
        keep, labels = answer_logit_slice(batch["labels"])  # the output head only where an answer is predicted
        logits = model(**model_inputs(batch), logits_to_keep=keep).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
        ) / answer_tokens
        return {"loss": loss}

    losses = []
    optimize(
        model,
        batches(train, collator, tiny.pretrain_batch_size, seed=seed, workers=cfg.hardware.dataloader_workers),
        cross_entropy,
        LoopSettings(max_steps=tiny.pretrain_steps, lr=tiny.pretrain_lr, warmup_steps=tiny.pretrain_steps // 10,
                     progress_bar=cfg.train.progress_bar, description=f"pre-training tiny {role} (first use, cached)"),
        device=device,
        dtype=torch.float32,
        on_step=lambda step, metrics, *_: losses.append(metrics["loss"]),
    )
    accuracy = answer_accuracy(model, in_order(validation, collator, 32), device, torch.float32)
    info = {
        "recipe": RECIPE,
        "validation_accuracy": accuracy,
        "chance_accuracy": validation.chance_accuracy(),
        "validation_size": len(validation),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "steps": tiny.pretrain_steps,
        "trained_on": device_name(device),
    }
    log.info("tiny %s: validation accuracy %.3f (chance %.3f)", role, accuracy, info["chance_accuracy"])
    # bf16 on disk halves the size; loading upcasts to the run's dtype.
    model.to(device="cpu", dtype=torch.bfloat16).save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    return info
