"""LoRA / QLoRA adapters on the student, with peft.

The student's base is frozen (in `precision.dtype`, or quantized by bitsandbytes when the
precision quantizes: QLoRA) and only the adapters train, in float32 (peft's adapter autocast).
Default targets are the text decoder's linear layers (q/k/v/o and the MLP); the vision tower's
layers are named qkv/proj/fc1/fc2, so it stays frozen unless a target names them.
"""

from __future__ import annotations

import os
from typing import Any, List

import torch

from firstsight.config.schema import LoraConfig as LoraSettings  # peft has a LoraConfig too
from firstsight.core.errors import FirstSightError

ADAPTER_CONFIG = "adapter_config.json"


def linear_module_suffixes(model: Any) -> List[str]:
    """The distinct last name parts of the model's linear layers (what `target_modules` may name)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model: Any, lora: LoraSettings, quantized: bool, source: str, gradient_checkpointing: bool) -> Any:
    """Wrap `model` (the student, from `source`) with trainable LoRA adapters per the `lora`
    section; everything else is frozen."""
    # deferred: peft imports bitsandbytes and torchao (seconds); only LoRA runs need it
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = list(lora.target_modules)
    available = linear_module_suffixes(model)
    missing = [t for t in targets if t not in available]
    if missing or not targets:
        raise FirstSightError(
            f"lora.target_modules={targets} names {missing or 'nothing'} that matches no linear layer of "
            f"model.student.source={source!r}; valid names: {available}"
        )
    if quantized:
        # casts the frozen non-quantized parts (norms, vision tower) to fp32 for stable training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = get_peft_model(
        model,
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"),
    )
    model.train()
    return model


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def merged_model(peft_model: Any, dtype: Any = None) -> Any:
    """The adapters folded into the base weights, as a plain transformers model in float weights
    (a quantized base is merged by peft, then dequantized, so stock transformers loads it), cast to
    `dtype` when given (QLoRA leaves norms, embeddings and the vision tower in fp32 for training)."""
    merged = peft_model.merge_and_unload()
    if getattr(merged, "is_quantized", False) or getattr(merged, "quantization_method", None):
        merged = merged.dequantize()
    return merged.to(dtype) if dtype is not None else merged
