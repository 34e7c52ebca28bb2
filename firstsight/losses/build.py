"""A loss from its config section: the KD loss class `distill_loss._target_` names, with its settings."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_loss(section: DictConfig) -> Any:
    """The KD loss of the `distill_loss` section (its `_target_` class, instantiated by Hydra)."""
    loss_cfg = OmegaConf.to_container(section, resolve=True)
    loss_cfg.pop("name")
    for key in HIDDEN_KEYS:  # the hidden-state term is built apart (build_hidden_loss)
        loss_cfg.pop(key, None)
    return instantiate(loss_cfg)


HIDDEN_KEYS = ("hidden_weight", "hidden_loss", "hidden_layers")
