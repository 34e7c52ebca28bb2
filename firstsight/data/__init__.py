"""Data: egocentric QA samples and their batching."""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from firstsight.data.synthetic import SyntheticEgoQA


def load_split(data_cfg: Any, split: str, seed: int, processor: Any = None) -> Any:
    """The `split` ("train" | "validation") the `data` group describes: read from the files a
    file-based choice names (conversations, egoschema: firstsight/data/files.py), else synthetic.
    Either way a map-style dataset of QASamples with chance_accuracy(); file datasets also count
    the bad records they skipped in `skipped` (those longer than `data.max_length` too, measured
    with `processor`, by default the student's)."""
    from firstsight.data.files import (  # deferred: `import firstsight.data.synthetic` stays torch-free
        file_split,
        is_file_data,
    )

    if is_file_data(data_cfg):
        return file_split(data_cfg, split, processor)
    return synthetic_split(data_cfg, split, seed)


def synthetic_split(data_cfg: Any, split: str, seed: int) -> Any:
    """The `split` ("train" | "validation") of the synthetic data the `data` group describes."""
    size = data_cfg.train_size if split == "train" else data_cfg.validation_size
    return SyntheticEgoQA(
        split,
        size=size,
        seed=seed,
        image_size=data_cfg.image_size,
        num_frames=data_cfg.num_frames,
        kinds=list(data_cfg.kinds),
    )


BLIND_GREY = (128, 128, 128)


class Blinded:
    """`dataset` with every frame replaced by a plain grey frame of the same size: the "is it
    looking?" check. A model that answers as well blind as with the frames is not using them
    (a teacher that never receives the frames, a student trained blind)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        frames = tuple(Image.new("RGB", image.size, BLIND_GREY) for image in sample.images)
        return dataclasses.replace(sample, images=frames)

    def chance_accuracy(self) -> float:
        return self.dataset.chance_accuracy()
