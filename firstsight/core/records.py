"""Configs as records: nested containers flattened to dotted keys (MLflow params, resume checks)."""

from __future__ import annotations

from typing import Any, Dict


def flatten_container(container: Dict[str, Any]) -> Dict[str, str]:
    """Nested dicts → `{"a.b": "value"}` with every leaf as a string (empty dicts are leaves)."""
    flat: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(container, "")
    return flat
