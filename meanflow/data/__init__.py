"""Data sets and the batch sources the training loop draws from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..encoders import Encoder, LatentEncoder, PixelEncoder, PointEncoder
from .latent_source import LATENT_NORMALISATIONS, LatentNormalisation
from .sources import BatchSource, TensorBatches, ToyStream

# digits: embedded (scikit-learn); toy: 2-D exact samplers; mnist / fashion-mnist / cifar10:
# torchvision download or a local .npz / folder (data.path); folder: an ImageFolder tree held in
# memory (small data sets); latents: a cache written by `meanflow encode` (data.path), drawing a
# fresh posterior sample every step; memory: samples passed to meanflow.train.train(data=...);
# npz: an .npz of samples x (N, ...) and optional labels (N,) at data.path (see .memory).
DATASETS = ("digits", "toy", "mnist", "fashion-mnist", "cifar10", "folder", "latents", "memory", "npz")


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know about the data: the classes, and the encoder of the space the
    samples live in (pixels, VAE latents or points), which knows one sample's shape."""

    num_classes: Optional[int]
    encoder: Encoder

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.encoder.sample_shape)


def load_images(config):
    """(images float32 (N, C, H, W) in [-1, 1], labels int64 (N,)) for an image DataConfig."""
    if config.name == "digits":
        from .digits import DIGITS_NATIVE_RESOLUTION, load_digits_tensors

        return load_digits_tensors(config.resolution or DIGITS_NATIVE_RESOLUTION)
    from .arrays import load_array_dataset
    from .folders import load_image_folder
    from .transforms import prepare_images

    if config.name == "folder":
        if not config.path:
            raise ValueError("data.name=folder needs data.path: the root of an ImageFolder tree "
                             "(root/<class_name>/<images>); add --set data.path=ROOT")
        images, labels, _ = load_image_folder(config.path, config.resolution or 256, config.skip_corrupt)
        return prepare_images(images), labels
    images, labels = load_array_dataset(config.name, config.path)
    return prepare_images(images, config.resolution), labels


def build_source(config, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_classes: Optional[int] = None) -> tuple[BatchSource, DataInfo]:
    """A batch source of ``batch_size`` samples per process for a :class:`meanflow.config.DataConfig`.

    ``num_classes``, when known (the model's), bounds the labels of a user's ``.npz`` (``data.name
    = npz``), so that a label out of range is refused before training with the file's name.
    """
    if config.name == "toy":
        return ToyStream(config.toy, batch_size, seed, rank), DataInfo(None, PointEncoder((2,), reference=config.toy))
    if config.name == "latents":
        if not config.path:
            raise ValueError("data.name=latents needs data.path: a latent cache folder written by "
                             "`meanflow encode --images ROOT --output CACHE`; add --set "
                             "data.path=CACHE")
        from .latent_dataset import LatentDataset
        from .latent_source import LatentBatches

        cache = LatentDataset(config.path)
        normalisation = LatentNormalisation(config.latent_normalisation)
        source = LatentBatches(config.path, batch_size, seed, rank, world_size, flip=config.horizontal_flip,
                               class_conditional=config.class_conditional, normalisation=normalisation)
        num_classes = len(cache.class_names) if config.class_conditional else None
        shape = tuple(cache.latent_shape)
        # The encoder undoes the same normalisation, so grids and evaluation decode what was trained on.
        mean, std = normalisation.channel_statistics() or (None, None)
        encoder = LatentEncoder(shape, vae=config.vae or cache.manifest["vae"],
                                downsampling=int(cache.manifest["resolution"]) // shape[-1],
                                latent_mean=mean, latent_std=std)
        return source, DataInfo(num_classes, encoder)
    if config.name in ("memory", "npz"):
        from .memory import source_from_config

        return source_from_config(config, batch_size, seed, rank, world_size, num_classes=num_classes)
    images, labels = load_images(config)
    num_classes = int(labels.max()) + 1 if config.class_conditional else None
    source = TensorBatches(images, labels if config.class_conditional else None, batch_size, seed,
                           config.horizontal_flip, rank, world_size)
    return source, DataInfo(num_classes, PixelEncoder(tuple(images.shape[1:])))


__all__ = ["DATASETS", "LATENT_NORMALISATIONS", "BatchSource", "DataInfo", "LatentNormalisation", "TensorBatches",
           "ToyStream", "build_source", "load_images"]
