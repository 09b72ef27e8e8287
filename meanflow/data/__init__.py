"""Data sets and the batch sources the training loop draws from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .sources import BatchSource, TensorBatches, ToyStream

# digits: embedded (scikit-learn); toy: 2-D exact samplers; mnist / fashion-mnist / cifar10:
# torchvision download or a local .npz / folder (data.path); folder: an ImageFolder tree held in
# memory (small data sets); latents: a cache written by `meanflow encode` (data.path), drawing a
# fresh posterior sample every step.
DATASETS = ("digits", "toy", "mnist", "fashion-mnist", "cifar10", "folder", "latents")


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know about the data: one sample's shape and the classes."""

    sample_shape: tuple
    num_classes: Optional[int]
    kind: str  # "image" (C, H, W), "latent" (C, h, w) or "points" (D,)


def load_images(config):
    """(images float32 (N, C, H, W) in [-1, 1], labels int64 (N,)) for an image DataConfig."""
    if config.name == "digits":
        from .digits import DIGITS_NATIVE_RESOLUTION, load_digits_tensors

        return load_digits_tensors(config.resolution or DIGITS_NATIVE_RESOLUTION)
    from .images import load_array_dataset, load_image_folder, prepare_images

    if config.name == "folder":
        if not config.path:
            raise ValueError("data.name='folder' needs data.path: the root of an ImageFolder tree "
                             "(root/<class_name>/<images>)")
        images, labels, _ = load_image_folder(config.path, config.resolution or 256, config.skip_corrupt)
        return prepare_images(images), labels
    images, labels = load_array_dataset(config.name, config.path)
    return prepare_images(images, config.resolution), labels


def build_source(config, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> tuple[BatchSource, DataInfo]:
    """A batch source of ``batch_size`` samples per process for a :class:`meanflow.config.DataConfig`."""
    if config.name == "toy":
        return ToyStream(config.toy, batch_size, seed, rank), DataInfo((2,), None, "points")
    if config.name == "latents":
        if not config.path:
            raise ValueError("data.name='latents' needs data.path: a latent cache folder written by "
                             "`meanflow encode --images ROOT --output CACHE`")
        from .latents import LatentBatches, LatentDataset

        cache = LatentDataset(config.path)
        source = LatentBatches(config.path, batch_size, seed, rank, world_size, flip=config.horizontal_flip,
                               class_conditional=config.class_conditional)
        num_classes = len(cache.class_names) if config.class_conditional else None
        return source, DataInfo(tuple(cache.latent_shape), num_classes, "latent")
    images, labels = load_images(config)
    num_classes = int(labels.max()) + 1 if config.class_conditional else None
    source = TensorBatches(images, labels if config.class_conditional else None, batch_size, seed,
                           config.horizontal_flip, rank, world_size)
    return source, DataInfo(tuple(images.shape[1:]), num_classes, "image")


__all__ = ["DATASETS", "BatchSource", "DataInfo", "TensorBatches", "ToyStream", "build_source", "load_images"]
