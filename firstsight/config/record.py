"""The config as a record: every value resolved, enums as their names, in plain dicts and lists.

The record is what a run is compared and remembered by — its MLflow params, the resume check, the
student's run record — so a task resolves it once and hands the same dict to each of them."""

from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf


def config_record(cfg: DictConfig) -> Dict[str, Any]:
    """The whole config resolved into plain containers (interpolations filled, enums by name)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
