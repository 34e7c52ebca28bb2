"""Qwen2-VL's 3-D M-RoPE position ids, computed on the host once per batch.

Left to itself, every Qwen2-VL forward runs `get_rope_index` on the model's device, with dozens of
read-backs (each a host-device synchronisation). Run on host copies of the four small integer
tensors it needs, it costs one copy back per tensor; the result goes to the device once, and a
distill step hands it to both the teacher and the student. The values are the model's own (its
own `get_rope_index`, only on the host; tests/unit/test_positions.py).

Design notes: docs/design/positions.md; measured (within noise so far):
docs/decisions/0009-host-positions.md.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def _rope_owner(model: Any) -> Any:
    """The module with `get_rope_index` (Qwen2VLModel), under a peft, DDP or FSDP wrapper or not;
    None for a model without M-RoPE."""
    for candidate in (model, getattr(model, "module", None)):  # DDP keeps the model as .module
        if candidate is None:
            continue
        get_base = getattr(candidate, "get_base_model", None)  # peft (LoRA)
        base = get_base() if callable(get_base) else candidate
        for owner in (base, getattr(base, "model", None)):
            if owner is not None and hasattr(owner, "get_rope_index"):
                return owner
    return None


def same_rope(a: Any, b: Any) -> bool:
    """Whether two models compute the same M-RoPE positions from the same batch (the spatial and
    temporal merge settings of their vision configs agree), so one computation serves both."""
    owners = (_rope_owner(a), _rope_owner(b))
    if None in owners:
        return False
    settings = []
    for owner in owners:
        vision = getattr(owner.config, "vision_config", None)
        settings.append(
            tuple(
                getattr(vision, key, None) for key in ("spatial_merge_size", "temporal_patch_size", "tokens_per_second")
            )
        )
    return settings[0] == settings[1] and type(owners[0]) is type(owners[1])


HOST_INPUTS = ("input_ids", "mm_token_type_ids", "attention_mask", "image_grid_thw", "video_grid_thw")


def host_inputs(batch: Dict[str, Any]) -> Dict[str, Any]:
    """Host copies of the batch's small integer tensors that the positions are computed from (None
    for those it lacks). Taken before anything is queued on the device, the copies wait for nothing."""
    return {key: (batch[key].cpu() if batch.get(key) is not None else None) for key in HOST_INPUTS}


def mrope_positions(
    model: Any, batch: Dict[str, Any], host: Optional[Dict[str, Any]] = None, on_host: bool = False
) -> Optional[Any]:
    """The [3, B, L] M-RoPE positions `model` computes for `batch` when none are given (a forward
    without a cache), on the batch's device (on the host with `on_host`); None when the batch has no
    image or video (the model then uses plain positions) or the model has no `get_rope_index`.
    `host`: the batch's host_inputs, if taken already."""
    owner = _rope_owner(model)
    if (
        owner is None
        or batch.get("mm_token_type_ids") is None
        or (batch.get("image_grid_thw") is None and batch.get("video_grid_thw") is None)
    ):
        return None
    host = host_inputs(batch) if host is None else host
    positions, _ = owner.get_rope_index(
        host["input_ids"],
        mm_token_type_ids=host["mm_token_type_ids"],
        image_grid_thw=host["image_grid_thw"],
        video_grid_thw=host["video_grid_thw"],
        attention_mask=host["attention_mask"],
    )
    return positions if on_host else positions.to(batch["input_ids"].device, non_blocking=True)


def prompt_positions(model: Any, batch: Dict[str, Any], host: Optional[Dict[str, Any]] = None) -> Any:
    """The prompt's position ids [4, B, L] as generate prepares them for Qwen2-VL: the text
    positions (attention-mask cumsum, 0 on padding) over the three M-RoPE rows of get_rope_index
    (the text positions thrice when the batch has no image or video), on the batch's device.

    With `host` (the batch's host_inputs), all of it is computed on the host and sent to the
    device in one asynchronous copy: nothing here waits for work already queued on the device
    (the static prefill queues the vision encoder first and computes these meanwhile)."""
    input_ids = batch["input_ids"]
    source = batch if host is None else host
    mask = source.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(source["input_ids"])
    text = mask.long().cumsum(-1) - 1
    text = text.masked_fill(mask == 0, 0)
    vision = mrope_positions(model, batch, host, on_host=host is not None)
    if vision is None:
        vision = text.unsqueeze(0).expand(3, -1, -1)
    positions = torch.cat([text.unsqueeze(0), vision.to(text.device, text.dtype)], dim=0)
    if host is None or input_ids.device.type == "cpu":
        return positions
    # from pinned memory the copy is queued without the host waiting (from pageable memory the
    # driver may wait for the queue, here the vision encoder's work)
    return positions.pin_memory().to(input_ids.device, non_blocking=True)
