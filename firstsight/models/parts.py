"""Per-part precision: the parts of a Qwen2-VL model, the modules they name, their resolved
dtype and quantization, and what each part weighs as loaded.

The parts and the modules of transformers' `Qwen2VLForConditionalGeneration` (the student's class,
tiny models included) they stand for (a LLaVA-OneVision teacher's: `model.vision_tower`,
`model.multi_modal_projector`, `model.language_model` and `lm_head`):

- `vision`: `model.visual` without its merger — the patch embedding and the ViT blocks;
- `merger`: `model.visual.merger` — the vision-language projector (LayerNorm + 2-layer MLP into
  the text width);
- `language`: `model.language_model` (token embeddings, decoder layers, final norm) and `lm_head`.

`precision.parts.<part>.dtype` / `.quantization` set a part; null (unset) follows the model-wide
`precision.dtype` / `precision.quantization` (the teacher's: `precision.teacher_quantization` when
set). Like the model-wide settings they apply to frozen weights: the model under profile/evaluate,
the teacher, and the student's base under LoRA; a student that distill trains in full keeps fp32
master weights (a part quantization there is refused by firstsight.suite.validate).

`lm_head` and the token embeddings belong to `language` for dtype and memory but are never
quantized: bitsandbytes replaces Linear layers only (embeddings are not), and the output head
stays unquantized as transformers does by default — with tied embeddings (Qwen2-VL-2B) it *is*
the embedding matrix. Quantized parts are quantized while loading (one BitsAndBytesConfig whose
`llm_int8_skip_modules` lists the unquantized parts, so all quantized parts of one model share one
kind); per-part dtypes are applied by casting each part's floating-point parameters after loading.

Only the standard library and omegaconf are imported at module level (validate uses this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from firstsight.config.schema import PARTS, PrecisionConfig
from firstsight.core.errors import FirstSightError
from firstsight.core.runtime import torch_dtype

# part -> (module name prefixes it covers, prefixes it leaves to another part), per architecture
# (config.model_type); the teacher may be a LLaVA-OneVision (firstsight/models/llava_ov.py), whose
# SigLIP tower, projector and Qwen2 language model are the same three parts under other names
PART_MODULES_BY_TYPE: Dict[str, Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]]] = {
    "qwen2_vl": {
        "vision": (("model.visual",), ("model.visual.merger",)),
        "merger": (("model.visual.merger",), ()),
        "language": (("model.language_model", "lm_head"), ()),
    },
    "llava_onevision": {
        "vision": (("model.vision_tower",), ()),
        "merger": (("model.multi_modal_projector", "model.image_newline"), ()),
        "language": (("model.language_model", "lm_head"), ()),
    },
}
PART_MODULES = PART_MODULES_BY_TYPE["qwen2_vl"]
# What bitsandbytes must leave alone when a part is not quantized: transformers matches each
# pattern from the start of a module name up to a module boundary ("model.visual.blocks" covers
# "model.visual.blocks.0.attn.qkv"). The vision part is `model.visual`'s children but the merger.
# Both architectures' names at once: they do not overlap, and a name a model lacks matches nothing.
UNQUANTIZED_PATTERNS: Dict[str, Tuple[str, ...]] = {
    "vision": ("model.visual.patch_embed", "model.visual.blocks", "model.vision_tower"),
    "merger": ("model.visual.merger", "model.multi_modal_projector"),
    "language": ("model.language_model",),
}
NEVER_QUANTIZED: Tuple[str, ...] = ("lm_head",)  # the output head (tied to the embeddings on 2B)
PART_DESCRIPTIONS = {
    "vision": "model.visual without model.visual.merger; LLaVA-OneVision: model.vision_tower",
    "merger": "model.visual.merger; LLaVA-OneVision: model.multi_modal_projector",
    "language": "model.language_model and lm_head",
}
QUANTIZED_KINDS = ("int8", "nf4", "int8_weight_only", "fp8")
# Quantized by torchao after loading (quantize_ on the parts' Linear layers), not by bitsandbytes while loading
TORCHAO_KINDS = ("int8_weight_only", "fp8")
GB = 1e9


@dataclass(frozen=True)
class PartPrecision:
    """A part's resolved precision: the dtype of its floating-point weights (the compute dtype of
    its quantized layers) and its quantization (none | int8 | nf4)."""

    dtype: str
    quantization: str

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


def _value(x: Any) -> Optional[str]:
    if x is None:
        return None
    return x.value if hasattr(x, "value") else str(x)


def quantization_of(precision: PrecisionConfig, role: str) -> str:
    """The model-wide quantization of a side's frozen weights: the teacher may have its own."""
    teacher_own = precision.get("teacher_quantization")
    if role == "teacher" and teacher_own is not None:
        return _value(teacher_own)
    return _value(precision.quantization)


def part_settings(precision: PrecisionConfig) -> Dict[str, Any]:
    """`precision.parts` as given (names → node with dtype/quantization, None = follow)."""
    parts = precision.get("parts")
    return dict(parts.items()) if parts else {}


def resolve_parts(precision: PrecisionConfig, role: str, frozen_weights: bool = True) -> Dict[str, PartPrecision]:
    """Each part's dtype and quantization for `role`. A side whose weights train (the student of
    distill without LoRA) is held in precision.trainable_dtype (float32 master weights by default),
    unquantized, whatever the rest of the precision says."""
    if not frozen_weights:
        return {part: PartPrecision(_value(precision.trainable_dtype), "none") for part in PARTS}
    dtype = _value(precision.dtype)
    quantization = quantization_of(precision, role)
    settings = part_settings(precision)
    resolved = {}
    for part in PARTS:
        own = settings.get(part)
        own_dtype = _value(own.get("dtype")) if own is not None else None
        own_quant = _value(own.get("quantization")) if own is not None else None
        resolved[part] = PartPrecision(own_dtype or dtype, own_quant or quantization)
    return resolved


def explicit_quantizations(precision: PrecisionConfig) -> List[Tuple[str, str]]:
    """(config key, quantization) of every part whose quantization is set explicitly."""
    found = []
    for part, own in part_settings(precision).items():
        quant = _value(own.get("quantization")) if own is not None else None
        if quant is not None:
            found.append((f"precision.parts.{part}.quantization", quant))
    return found


def skip_modules(parts: Dict[str, PartPrecision]) -> List[str]:
    """`llm_int8_skip_modules`: the unquantized parts' modules, and the output head."""
    skip = [pattern for part in PARTS if not parts[part].quantized for pattern in UNQUANTIZED_PATTERNS[part]]
    return skip + list(NEVER_QUANTIZED)


def quantization_kind(parts: Dict[str, PartPrecision]) -> Optional[str]:
    """The one bitsandbytes kind the model's quantized parts use; None when none is quantized."""
    kinds = sorted({p.quantization for p in parts.values() if p.quantized})
    if len(kinds) > 1:
        raise FirstSightError(
            f"parts quantized as {kinds}: one model is quantized by one bitsandbytes config, so its quantized "
            f"parts must share one kind (int8 or nf4); set the others to that kind or none"
        )
    return kinds[0] if kinds else None


def precision_tags(parts: Dict[str, PartPrecision], prefix: str = "firstsight.precision") -> Dict[str, str]:
    """`{prefix}.<part>.dtype` / `.quantization` tags of the resolved per-part precision."""
    tags = {}
    for part, precision in parts.items():
        tags[f"{prefix}.{part}.dtype"] = precision.dtype
        tags[f"{prefix}.{part}.quantization"] = precision.quantization
    return tags


# ----------------------------------------------------------------------------- on a loaded model


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def part_of(name: str) -> Optional[str]:
    """The part a module, parameter or buffer name belongs to (None: no part), in either architecture."""
    for modules in PART_MODULES_BY_TYPE.values():
        for part, (covered, left) in modules.items():
            if _under(name, covered) and not _under(name, left):
                return part
    return None


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA), whose names the parts resolve against."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_part_modules(model: Any) -> None:
    """Every part's module prefixes exist in `model` (names as in Qwen2VLForConditionalGeneration,
    or LlavaOnevisionForConditionalGeneration's for a model of that type)."""
    base = base_model(model)
    names = {name for name, _ in base.named_modules()} | {name for name, _ in base.named_parameters()}
    model_type = getattr(getattr(base, "config", None), "model_type", "qwen2_vl")
    for part, (covered, left) in PART_MODULES_BY_TYPE.get(model_type, PART_MODULES).items():
        missing = [prefix for prefix in covered + left if prefix not in names]
        if missing:
            top = sorted(n for n in names if n and n.count(".") <= 1)
            raise FirstSightError(
                f"precision part {part!r} ({PART_DESCRIPTIONS[part]}): {type(model).__name__} has no module "
                f"{missing[0]!r}; its top-level modules: {top}. Per-part precision needs a Qwen2-VL or a "
                f"LLaVA-OneVision model ({', '.join(PART_MODULES_BY_TYPE)})."
            )


def part_bytes(model: Any) -> Dict[str, int]:
    """Bytes of each part's parameters and buffers as loaded (shared tensors counted once), the same
    count as transformers' get_memory_footprint, split by part; names outside every part under "other"."""
    totals = {part: 0 for part in PARTS}
    totals["other"] = 0
    seen = set()
    model = base_model(model)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        totals[part_of(name) or "other"] += stored_bytes(tensor)
    return totals


def stored_bytes(tensor: Any) -> int:
    """The bytes a tensor holds. A tensor subclass that wraps others (torchao's quantized weights:
    int8/float8 data + scales) reports its logical dtype's size, so its inner tensors are counted."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(stored_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.nelement() * tensor.element_size()


def part_weights_gb(model: Any) -> Dict[str, float]:
    return {part: size / GB for part, size in part_bytes(model).items() if part in PARTS}


def apply_part_dtypes(model: Any, parts: Dict[str, PartPrecision], loaded_dtype: str) -> None:
    """Cast each part whose dtype differs from the one the model was loaded in: its floating-point
    parameters (quantized weights are integer tensors and stay as they are; buffers such as the
    rotary frequencies keep the dtype the model's own code gives them), and the compute dtype of its
    4-bit layers. Where the vision blocks and the merger differ, the merger's input is cast on entry
    (transformers already casts pixels into the vision tower and image features into the text)."""
    if all(p.dtype == loaded_dtype for p in parts.values()):
        return
    check_part_modules(model)
    for name, module in model.named_modules():
        part = part_of(name)
        if part is None or parts[part].dtype == loaded_dtype:
            continue
        dtype = torch_dtype(parts[part].dtype)
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
            module.compute_dtype = dtype
    if parts["merger"].dtype != parts["vision"].dtype:
        merger_dtype = torch_dtype(parts["merger"].dtype)

        def cast_input(_module: Any, args: Sequence[Any]) -> Tuple[Any, ...]:
            return tuple(a.to(merger_dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        model.get_submodule("model.visual.merger").register_forward_pre_hook(cast_input)
