"""What both halves of the config checks share: where a value came from, the one error shape
(`key=value (origin) is invalid: what is valid.`), reading a dotted key, and the model sides a task loads."""

from __future__ import annotations

from typing import Any, List

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from firstsight.core.errors import ConfigError


def origin(key: str) -> str:
    """Where a value came from: a command-line override, or the group's config file."""
    try:
        hydra_cfg = HydraConfig.get()
    except Exception:  # composed with the compose API or by hand: no Hydra context
        return ""
    for override in reversed(hydra_cfg.overrides.task):  # the last one given is the one Hydra applied
        if override.lstrip("+~").split("=", 1)[0] == key:
            return f" (command-line override '{override}')"
    group = key.split(".", 1)[0]
    choice = hydra_cfg.runtime.choices.get(group)
    if choice:
        return f" (from conf/{group}/{choice}.yaml)"
    return " (from conf/config.yaml)"


def check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}{origin(key)} is invalid: {valid}.")


def at_least(cfg: DictConfig, key: str, minimum: float) -> None:
    value = value_at(cfg, key)
    check(value >= minimum, key, value, f"it must be >= {minimum}")


def value_at(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def enum_value(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)


def roles_used(cfg: DictConfig) -> List[str]:
    """The model sides a task loads (profile: only its target; export and report: none)."""
    if cfg.task.name == "profile":
        return [enum_value(cfg.task.target)]
    if cfg.task.name in ("export", "report"):
        return []
    return ["teacher", "student"]
