"""Qwen2-VL's vision attention with every frame of one size in a single SDPA call.

transformers splits the encoder's packed frames at their boundaries (a `.tolist()` read-back in
every block, a graph break when compiled) and calls SDPA once per frame. Frames of one size are the
same attention as one SDPA call over a batch of frames: [1, heads, n * L, d] viewed as
[n, heads, L, d]. Frames of different sizes fall back to one call per frame.

transformers hands the frames' boundaries (`cu_seq_lens_q`, `max_length_q`) only to attention
implementations whose name contains "flash" (`is_flash_attention_requested`), hence this one's
name; it runs torch's SDPA, nothing from flash-attn. Only the vision encoder's config is switched
(`hardware.batched_vision_attention`); the language model keeps SDPA.

An attention module marked with EAGER_UNDER_COMPILE (static_compile's prefill marks the vision
blocks it compiles: firstsight/inference/compiled_prefill.py) runs this call outside torch.compile's
graph, the block's graph broken around it: compiled on an H100 (torch 2.11, the blocks compiled
with dynamic shapes), the call attended over all frames of the batch at once, and the tiny
teacher's answers changed (tests/gpu/test_gpu_decoding.py).

Design notes: docs/design/vision_attention.md; measured:
docs/decisions/0004-batched-vision-attention.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from firstsight.models.attention import switch_implementation
from firstsight.models.decode_attention import group_decode, ungroup_decode

NAME = "firstsight_flash_frames"  # "flash" in the name: see the module docstring
_SWITCHED_FROM = "sdpa"  # the only implementation this one replaces (the same kernels, fewer calls)
# set (True) on a vision attention module whose attention call runs outside torch.compile's graph
# when its block is compiled (attend_eagerly_under_compile; the module docstring says why)
EAGER_UNDER_COMPILE = "_firstsight_attention_eager"
_outside_compiler: Optional[Any] = None  # calls its first argument with the rest, compiler-disabled (made once)


def frames_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Optional[Any] = None,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Optional[Any] = None,
    max_length_q: Optional[int] = None,
    **_: Any,
) -> Tuple[Any, None]:
    """Attention within each frame of `query`/`key`/`value` [1, heads, total, dim] (frames packed
    along `total`, boundaries `cu_seq_lens_q`); returns [1, total, heads, dim] as flash
    implementations do, and no weights. Traced by torch.compile where `module` carries
    EAGER_UNDER_COMPILE, it runs eagerly instead (a graph break)."""
    args = (query, key, value, attention_mask, scaling, dropout, cu_seq_lens_q, max_length_q)
    if _outside_compiler is not None and torch.compiler.is_compiling() and getattr(module, EAGER_UNDER_COMPILE, False):
        return _outside_compiler(_attend_within_frames, *args)
    return _attend_within_frames(*args)


def attend_eagerly_under_compile(module: Any) -> None:
    """Mark a vision attention module (Qwen2-VL's block.attn, which hands itself to frames_attention):
    traced by torch.compile, its frames_attention call runs eagerly (the module docstring says why).
    Undone by deleting the attribute EAGER_UNDER_COMPILE."""
    global _outside_compiler
    if _outside_compiler is None:  # made here, outside any compiled region (dynamo would break on making it)
        _outside_compiler = torch.compiler.disable(_call)
    vars(module)[EAGER_UNDER_COMPILE] = True


def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


def _attend_within_frames(
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Optional[Any],
    scaling: Optional[float],
    dropout: float,
    cu_seq_lens_q: Optional[Any],
    max_length_q: Optional[int],
) -> Tuple[Any, None]:
    """frames_attention's computation (its arguments in its order, the module left out)."""
    if attention_mask is not None or cu_seq_lens_q is None:
        raise ValueError(f"{NAME} is Qwen2-VL's vision attention: frame boundaries, no mask")
    _, heads, total, dim = query.shape
    frames = cu_seq_lens_q.shape[0] - 1
    if max_length_q is not None and frames * max_length_q == total:  # every frame has the longest length
        q, k, v = (t[0].unflatten(1, (frames, max_length_q)).transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)  # [n, heads, L, dim]
        return out.transpose(1, 2).reshape(1, total, heads, dim), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    outs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None


def _vision_config(model: Any) -> Any:
    return getattr(getattr(model, "config", None), "vision_config", None)


def batch_frames(model: Any) -> bool:
    """Switch a Qwen2-VL model's vision encoder (SDPA) to frames_attention, in place; True if it
    was switched. Other models and other attention implementations are left as they are."""
    AttentionInterface.register(NAME, frames_attention)  # idempotent: the same function under the same name
    return switch_implementation(_vision_config(model), _SWITCHED_FROM, NAME)


@contextlib.contextmanager
def plain_config(model: Any) -> Iterator[Any]:
    """Within the block, the model's config names SDPA for the vision encoder and the language
    model again, for building another model from it: transformers takes any implementation whose
    name contains "flash" for a flash-attn kernel to import, and would refuse this one; and the
    copy should not depend on this process's registrations (saved configs never carry either)."""
    frames, grouped = unbatch_frames(model), ungroup_decode(model)
    try:
        yield model.config
    finally:
        if frames:
            batch_frames(model)
        if grouped:
            group_decode(model)


def unbatch_frames(model: Any) -> bool:
    """Undo batch_frames: one SDPA call per frame again (benchmarks' naive paths); True if undone."""
    return switch_implementation(_vision_config(model), NAME, _SWITCHED_FROM)
