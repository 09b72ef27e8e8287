"""Data sets and the batch sources the training loop draws from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .sources import BatchSource, TensorBatches, ToyStream

DATASETS = ("digits", "toy")


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know about the data: one sample's shape and the classes."""

    sample_shape: tuple
    num_classes: Optional[int]
    kind: str  # "image" (C, H, W) or "points" (D,)


def build_source(config, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> tuple[BatchSource, DataInfo]:
    """A batch source for a :class:`meanflow.config.DataConfig`."""
    if config.name == "toy":
        return ToyStream(config.toy, batch_size, seed, rank), DataInfo((2,), None, "points")
    if config.name == "digits":
        from .digits import DIGITS_NATIVE_RESOLUTION, load_digits_tensors

        images, labels = load_digits_tensors(config.resolution or DIGITS_NATIVE_RESOLUTION)
    else:  # pragma: no cover - DataConfig validates the name first
        raise ValueError(f"unknown data set {config.name!r}; valid data sets are {list(DATASETS)}")
    num_classes = int(labels.max()) + 1 if config.class_conditional else None
    source = TensorBatches(images, labels if config.class_conditional else None, batch_size, seed,
                           config.horizontal_flip, rank, world_size)
    return source, DataInfo(tuple(images.shape[1:]), num_classes, "image")


__all__ = ["DATASETS", "BatchSource", "DataInfo", "TensorBatches", "ToyStream", "build_source"]
