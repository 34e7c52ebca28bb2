"""Data: egocentric QA samples and their batching."""

from __future__ import annotations

from typing import Any


def load_split(data_cfg: Any, split: str, seed: int, processor: Any = None) -> Any:
    """The `split` ("train" | "validation") the `data` group describes: read from the files a
    file-based choice names (conversations, egoschema: firstsight/data/files.py), else synthetic.
    Either way a map-style dataset of QASamples with chance_accuracy(); file datasets also count
    the bad records they skipped in `skipped` (those longer than `data.max_length` too, measured
    with `processor`, by default the student's)."""
    from firstsight.data.files import file_split, is_file_data

    if is_file_data(data_cfg):
        return file_split(data_cfg, split, processor)
    return synthetic_split(data_cfg, split, seed)


def synthetic_split(data_cfg: Any, split: str, seed: int) -> Any:
    """The `split` ("train" | "validation") of the synthetic data the `data` group describes."""
    from firstsight.data.synthetic import SyntheticEgoQA

    size = data_cfg.train_size if split == "train" else data_cfg.validation_size
    return SyntheticEgoQA(
        split, size=size, seed=seed, image_size=data_cfg.image_size,
        num_frames=data_cfg.num_frames, kinds=list(data_cfg.kinds),
    )
