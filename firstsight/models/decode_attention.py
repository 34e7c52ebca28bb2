"""The language model's attention for one new token per row without copying the KV cache per head.

With a padding mask, transformers' SDPA path repeats every cached key and value once per query head
of its group (`repeat_kv`) before the call. For a single query position the `groups` query heads
that share a KV head are instead `groups` query rows of one SDPA call over that KV head
([B, H, 1, d] viewed as [B, H_kv, groups, d]): same kernels, no copy. Prompts (several positions)
and anything else go to transformers' SDPA path unchanged.

Registered with transformers under NAME, for the language model's config only
(`hardware.grouped_decode_attention`); its masks are SDPA's. Saved configs never carry it
(firstsight.models.vision_attention.plain_config undoes it while a config is copied).
Design notes: docs/design/decode_attention.md; measured:
docs/decisions/0005-grouped-decode-attention.md.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from firstsight.models.attention import switch_implementation

NAME = "firstsight_sdpa_grouped_decode"
_SWITCHED_FROM = "sdpa"  # the only implementation this one extends (the same kernels, no copy)


def grouped_decode_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Optional[Any],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> Tuple[Any, None]:
    """SDPA attention as transformers' `sdpa_attention_forward` computes it (query [B, H, q, d],
    key/value [B, H_kv, L, d]; returns [B, q, H, d] and no weights); for q == 1 with grouped KV
    heads, one SDPA call per KV head's group of query heads instead of a copy of the cache per
    query head."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    mask_ok = attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1
    )
    if (
        length != 1
        or groups == 1
        or heads != kv_heads * groups
        or dropout
        or not mask_ok
        or kwargs.get("sliding_window")
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions")
    ):
        return sdpa_attention.sdpa_attention_forward(  # a module attribute: tests patch it
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # query head h uses KV head h // groups (repeat_kv's order), so heads split as [kv_heads, groups]
    grouped = query.reshape(batch, kv_heads, groups, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) if config is not None else None


def group_decode(model: Any) -> bool:
    """Switch the language model of a Qwen2-VL model (SDPA) to grouped_decode_attention, in place;
    True if it was switched. Other models and other implementations are left as they are."""
    # idempotent: the same functions under the same name; SDPA's masks for SDPA's kernels
    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return switch_implementation(_text_config(model), _SWITCHED_FROM, NAME)


def ungroup_decode(model: Any) -> bool:
    """Undo group_decode (benchmarks' naive paths); True if undone."""
    return switch_implementation(_text_config(model), NAME, _SWITCHED_FROM)
