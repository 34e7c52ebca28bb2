"""The attention-implementation registry both attention patches (vision, decode) switch through."""

from __future__ import annotations

from typing import Any


def switch_implementation(config: Any, old: str, new: str) -> bool:
    """Set a (sub-)config's attention implementation from `old` to `new`; False (nothing changed)
    when there is no such config or it names another implementation."""
    if config is None or getattr(config, "_attn_implementation", None) != old:
        return False
    config._attn_implementation = new
    return True
