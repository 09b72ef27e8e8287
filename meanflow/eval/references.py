"""The reference side of a score: which real images, their feature statistics (cached), and
their features for precision / recall.

A reference is either a statistics file (``.npz`` with ``mu`` and ``sigma``: ours or ADM's) or
a built-in data set named ``name[:split]`` (:func:`parse_reference`). The statistics of a data
set are cached as ``<cache>/<key>.npz`` (ADM's format), the key naming the data set, split,
side length, preprocessing and feature extractor (its weights' fingerprint), so a different
network or preprocessing never reuses stale statistics. The key is known *before* any image is
read (each built-in data set has a known native side, :data:`NATIVE_RESOLUTIONS`), so a cache
hit never touches the data set: evaluation works offline once the statistics exist. The cache
is ``~/.cache/meanflow/stats`` unless ``cache_dir`` or ``$MEANFLOW_STATS_CACHE`` says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..data.digits import DIGITS_NATIVE_RESOLUTION
from ..distributed import all_true, shard_range
from ..pixels import to_uint8
from .features import FeatureExtractor, PathLike
from .frechet import FeatureStatistics, load_statistics_with_info, save_statistics

if TYPE_CHECKING:
    from .settings import EvalSettings

# Data sets a reference can name (the names of ``data.name``), and their splits. ``digits`` has no
# split: training used all 1797 images.
REFERENCE_DATASETS = {"digits": ("all",), "mnist": ("train", "test"), "fashion-mnist": ("train", "test"),
                      "cifar10": ("train", "test")}
# The side of each data set's images as published, the side of its statistics unless a
# resolution is given: what lets the cache key be computed without loading the images.
NATIVE_RESOLUTIONS = {"digits": DIGITS_NATIVE_RESOLUTION, "mnist": 28, "fashion-mnist": 28, "cifar10": 32}
PREPROCESSING = "uint8"  # images are quantised to 0..255 before features (what a PNG holds)


@dataclass(frozen=True)
class ReferenceSpec:
    """Reference images named by data set, split and side length (None: the native side)."""

    dataset: str
    split: str
    resolution: Optional[int] = None

    @property
    def side(self) -> int:
        """The side length of the reference images, H = W."""
        return self.resolution or NATIVE_RESOLUTIONS[self.dataset]

    def key(self, extractor_name: str) -> str:
        """The cache key of these images' statistics in the features of ``extractor_name``."""
        return f"{self.dataset}-{self.split}-{self.side}px-{PREPROCESSING}-{extractor_name}"

    def __str__(self) -> str:
        return f"{self.dataset}:{self.split}"


def parse_reference(text: Union[str, PathLike], resolution: Optional[int] = None) -> Union[ReferenceSpec, Path]:
    """``"mnist:test"`` / ``"cifar10"`` (split ``train``) / ``"digits"`` -> a :class:`ReferenceSpec`;
    a path ending in ``.npz`` -> that statistics file."""
    text = str(text)
    if text.endswith(".npz"):
        return Path(text)
    dataset, _, split = text.partition(":")
    dataset = dataset.strip().lower().replace("_", "-")
    if dataset not in REFERENCE_DATASETS:
        raise ValueError(f"unknown reference {text!r}: give a statistics .npz file or one of "
                         f"{sorted(REFERENCE_DATASETS)} with an optional ':split'")
    splits = REFERENCE_DATASETS[dataset]
    split = split.strip() or ("all" if dataset == "digits" else "train")
    if dataset == "digits" and split == "train":
        split = "all"  # the digits have no split; training used all of them
    if split not in splits:
        raise ValueError(f"data set {dataset!r} has the splits {list(splits)}, not {split!r}")
    return ReferenceSpec(dataset, split, resolution)


def load_reference_images(spec: ReferenceSpec, data_path: Optional[PathLike] = None) -> tuple[Tensor, Tensor]:
    """The reference images as uint8 (N, C, side, side) and their labels (N,), prepared as for training.

    ``digits`` come from scikit-learn (:func:`meanflow.data.digits.load_digits_tensors`, resized
    as training does). The array data sets are read by :func:`meanflow.data.arrays.load_array_dataset`
    from ``data_path`` (a local ``.npz`` or torchvision folder, as ``data.path``) or downloaded by
    torchvision when it is None, and resized by :func:`meanflow.data.transforms.prepare_images`
    when their side is not ``spec.side`` (so the images always match the cache key). Resized
    images are quantised back to uint8 by the one rounding rule, as generated samples are.
    """
    if spec.dataset == "digits":
        from ..data.digits import load_digits_tensors

        images, labels = load_digits_tensors(spec.side)
        return to_uint8(images), labels
    from ..data.arrays import load_array_dataset
    from ..data.transforms import prepare_images

    images, labels = load_array_dataset(spec.dataset, data_path, spec.split)  # uint8 (N, C, H, W)
    if tuple(images.shape[-2:]) != (spec.side, spec.side):
        images = to_uint8(prepare_images(images, spec.side))
    return images, labels


def default_cache_dir() -> Path:
    """``$MEANFLOW_STATS_CACHE`` or ``~/.cache/meanflow/stats``."""
    return Path(os.environ.get("MEANFLOW_STATS_CACHE") or Path.home() / ".cache" / "meanflow" / "stats")


def reference_statistics(
    spec: ReferenceSpec,
    extractor: FeatureExtractor,
    batch_size: int = 250,
    cache_dir: Optional[PathLike] = None,
    data_path: Optional[PathLike] = None,
    rank: int = 0,
    world_size: int = 1,
    device: Union[str, torch.device] = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mu (D,), sigma (D, D), info) of a reference data set: read from the cache, or computed
    (each process featurising its shard, statistics summed) and cached by rank 0.

    The data set is loaded only on a cache miss. ``info`` records the key, the file, whether it
    was cached, the side length and the number of images.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = spec.key(extractor.name)
    path = (cache / f"{key}.npz").absolute()
    if all_true(path.is_file(), world_size, device):  # every process must agree to skip the collective
        mu, sigma, info = load_statistics_with_info(path)
        return mu, sigma, {"resolution": spec.side, **(info or {}), "key": key, "path": str(path), "cached": True}
    images, _ = load_reference_images(spec, data_path)
    statistics = FeatureStatistics(extractor.dim, device)
    start, end = shard_range(len(images), rank, world_size)
    for first in range(start, end, batch_size):
        features, _ = extractor.features_and_logits(images[first:min(first + batch_size, end)])
        statistics.update(features)
    if world_size > 1:
        statistics.all_reduce()
    mu, sigma = statistics.mean_and_covariance()
    info = {"reference": str(spec), "dataset": spec.dataset, "split": spec.split, "resolution": spec.side,
            "preprocessing": PREPROCESSING, "feature_extractor": extractor.name, "num_images": statistics.count}
    if rank == 0:
        save_statistics(path, mu, sigma, info)
    return mu, sigma, dict(info, key=key, path=str(path), cached=False)


def reference_features(
    reference: Union[ReferenceSpec, Path],
    extractor: FeatureExtractor,
    count: int,
    seed: int = 0,
    batch_size: int = 250,
    data_path: Optional[PathLike] = None,
) -> Tensor:
    """Features (M, D) of M = ``count`` reference images for precision / recall, on the CPU.

    A data set gives a subset of M images chosen by a permutation seeded by ``seed`` (all of
    them when it has fewer); a statistics ``.npz`` must hold the images themselves as ``arr_0``
    (N, H, W, C) uint8, as ADM's reference batches do, of which the first M are used.
    """
    if isinstance(reference, Path):
        with np.load(reference, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"precision / recall needs reference images, but {reference} holds only "
                                 f"{sorted(data.files)}; give a data set as the reference, or an ADM reference "
                                 "batch (which stores its images as arr_0)")
            images = torch.from_numpy(np.ascontiguousarray(data["arr_0"][:count])).permute(0, 3, 1, 2)
    else:
        images, _ = load_reference_images(reference, data_path)
        if len(images) > count:
            images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]]
    features = [extractor.features_and_logits(images[first:first + batch_size])[0].detach().float().cpu()
                for first in range(0, len(images), batch_size)]
    return torch.cat(features)


@dataclass(frozen=True)
class Reference:
    """The reference of one evaluation: its statistics, what the report says of it, and (rank 0,
    when precision / recall is asked for) the features (M, D) of M reference images."""

    mu: np.ndarray
    sigma: np.ndarray
    report: dict[str, Any]
    real_features: Optional[Tensor] = None


def resolve_reference(settings: "EvalSettings", run_data: dict[str, Any], image_side: int,
                      extractor: FeatureExtractor) -> Reference:
    """The reference named by ``settings.reference`` (default: the data set the run trained on,
    its training split, at the side ``image_side`` of the generated images), read or computed.

    ``run_data`` is the run's ``data`` config section: its name picks the default reference and
    its ``path`` is where that data set is read from unless ``settings.data_path`` says otherwise.
    """
    text = settings.reference
    if text is None:
        text = run_data.get("name", "")
        if text not in REFERENCE_DATASETS:
            raise ValueError(f"this checkpoint was trained on {text!r}, which has no built-in reference; "
                             "give reference (--reference) as a statistics .npz or a data set name")
    parsed = parse_reference(text, resolution=image_side)
    data_path = settings.data_path
    if data_path is None and isinstance(parsed, ReferenceSpec) and parsed.dataset == run_data.get("name"):
        data_path = run_data.get("path")
    if isinstance(parsed, Path):
        mu, sigma, report = _statistics_file(parsed, extractor)
    else:
        mu, sigma, info = reference_statistics(parsed, extractor, settings.batch_size, settings.cache_dir, data_path,
                                               settings.rank, settings.world_size, settings.device)
        report = {"source": str(parsed), "statistics": info["path"], "key": info["key"], "cached": info["cached"],
                  "num_images": info.get("num_images"), "resolution": info["resolution"]}
    if mu.shape != (extractor.dim,):
        raise ValueError(f"the reference statistics have dimension {mu.shape[0]}, but the {settings.metric.value} "
                         f"features have {extractor.dim}: they come from another feature network")
    real_features = None
    if settings.precision_recall_samples is not None and settings.rank == 0:
        real_features = reference_features(parsed, extractor, settings.precision_recall_samples, settings.seed,
                                           settings.batch_size, data_path)
        report["precision_recall_images"] = len(real_features)
    return Reference(mu, sigma, report, real_features)


def _statistics_file(path: Path, extractor: FeatureExtractor) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A statistics file as the reference, refused when it names another feature network."""
    mu, sigma, info = load_statistics_with_info(path)
    stored_extractor = (info or {}).get("feature_extractor")
    if stored_extractor is not None and stored_extractor != extractor.name:
        raise ValueError(f"{path} holds statistics of {stored_extractor}, not of {extractor.name}")
    return mu, sigma, {"source": str(path), "statistics": str(path.resolve()),
                       "num_images": (info or {}).get("num_images")}


__all__ = [
    "NATIVE_RESOLUTIONS",
    "PREPROCESSING",
    "REFERENCE_DATASETS",
    "Reference",
    "ReferenceSpec",
    "default_cache_dir",
    "load_reference_images",
    "parse_reference",
    "reference_features",
    "reference_statistics",
    "resolve_reference",
]
