"""Data: egocentric QA samples and their batching."""

from __future__ import annotations

from typing import Any


def synthetic_split(data_cfg: Any, split: str, seed: int) -> Any:
    """The `split` ("train" | "validation") of the synthetic data the `data` group describes."""
    from firstsight.data.synthetic import SyntheticEgoQA

    size = data_cfg.train_size if split == "train" else data_cfg.validation_size
    return SyntheticEgoQA(
        split, size=size, seed=seed, image_size=data_cfg.image_size,
        num_frames=data_cfg.num_frames, kinds=list(data_cfg.kinds),
    )
