"""What a latent cache folder is: its file names, its manifest, its storage dtypes.

Each image of an ImageFolder tree is encoded once by the SD-VAE and its Gaussian posterior
``N(mean, std^2)`` is cached, not a single sample of it; training then draws a fresh sample
every step (:mod:`meanflow.data.latent_source`). The writer (:mod:`meanflow.data.latent_writer`)
and the reader (:mod:`meanflow.data.latent_dataset`) both go through this module, so the
format is defined once::

    manifest.json               settings, data-set fingerprint, and the list of finished shards
    shard_00000.moments.npy     (n, M, C, h, w) float32 (or float16), memory-mappable .npy
    shard_00000.labels.npy      (n,) int64 class ids
    shard_00001.moments.npy ...

Shard ``s`` holds images ``[s * shard_size, s * shard_size + n)`` of the ImageFolder order
(class, then path). Axis 1 holds the moments: ``[mean, std]``, or with flips
``[mean, std, flip_mean, flip_std]`` where the last two are the posterior of the left-right
mirrored image. ``std`` is stored rather than the log-variance so that drawing is one fused
multiply-add. float32 is the default: the SD-VAE posterior std is tiny next to the mean, and
float16 would round the mean by more than the std for large values. ImageNet (1.28M images, 4
moments of 4 x 32 x 32) takes about 84 GB in float32 and 42 GB in float16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

from ..io import write_text_atomic

StorageDtype = Literal["float32", "float16"]
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)

CACHE_FORMAT = "meanflow-latent-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"

MOMENT_NAMES = ("mean", "std")
"""Axis 1 of a shard's moments without flips."""
FLIP_MOMENT_NAMES = ("mean", "std", "flip_mean", "flip_std")
"""Axis 1 of a shard's moments with flips: the original's posterior, then the mirrored image's."""


def shard_file_names(index: int) -> tuple[str, str]:
    """The (moments, labels) file names of shard ``index`` inside the cache folder."""
    return f"shard_{index:05d}.moments.npy", f"shard_{index:05d}.labels.npy"


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    """Replace ``cache_dir/manifest.json`` atomically: a reader sees the old one or the new one."""
    write_text_atomic(cache_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def read_manifest(cache_dir: Path) -> dict:
    """The parsed manifest of ``cache_dir``; a ValueError when it is damaged or of another format."""
    path = cache_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the latent cache is damaged") from error
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise ValueError(
            f"{path} is not a {CACHE_FORMAT} manifest of version {CACHE_VERSION} (format "
            f"{manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    return manifest


__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "FLIP_MOMENT_NAMES",
    "MANIFEST_NAME",
    "MOMENT_NAMES",
    "STORAGE_DTYPES",
    "StorageDtype",
    "read_manifest",
    "shard_file_names",
    "write_manifest",
]
