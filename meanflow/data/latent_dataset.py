"""Reading a finished latent cache: posterior moments and labels by image index, memory-mapped.

The shards of :mod:`meanflow.data.latent_format` are opened with ``np.load(mmap_mode="r")``, so
opening a cache of any size is instant and a batch reads only its own rows from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..vae import SD_VAE_SCALE_FACTOR
from ..validation import PathLike
from .latent_format import MANIFEST_NAME, read_manifest, shard_file_names


def _read_shard_array(path: Path, mmap_mode: Optional[str] = None) -> np.ndarray:
    """One .npy of a shard, never unpickled; numpy's advice to unpickle what it cannot read is not relayed."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as error:
        reason = "no numpy array; pickled data is never loaded" if "pickle" in str(error) else error
        raise ValueError(f"{path} is not a numeric .npy array ({reason}); re-run `meanflow encode` to repair "
                         "the cache") from None


class LatentDataset:
    """A finished latent cache, memory-mapped: posterior moments and labels by image index.

    Args:
        cache_dir: a folder written by :func:`~meanflow.data.latent_writer.encode_image_folder`.

    Attributes:
        manifest: the parsed manifest.json.
        labels: (N,) int64 class ids.
        latent_shape: (C, h, w).
        class_names: the K class folder names; ``class_names[label]`` names a label.
        has_flips: whether the moments of mirrored images are cached too.

    Item:
        ``(moments, label)``: moments (M, C, h, w) float32 with M = 4 (mean, std, flip mean,
        flip std) or 2, and an int label.
    """

    def __init__(self, cache_dir: PathLike):
        self.cache_dir = Path(cache_dir).expanduser()
        if not (self.cache_dir / MANIFEST_NAME).is_file():
            raise FileNotFoundError(
                f"{self.cache_dir} holds no {MANIFEST_NAME}: not a latent cache; write one with "
                f"`meanflow encode --images ROOT --output {self.cache_dir}`"
            )
        manifest = read_manifest(self.cache_dir)
        if not manifest["complete"]:
            raise ValueError(
                f"the latent cache {self.cache_dir} is unfinished ({len(manifest['shards'])} of "
                f"{manifest['num_shards']} shards); re-run the same `meanflow encode` command to finish it"
            )
        if manifest["scale_factor"] != SD_VAE_SCALE_FACTOR:
            raise ValueError(
                f"the latent cache {self.cache_dir} records the scale factor {manifest['scale_factor']}, "
                f"this library uses {SD_VAE_SCALE_FACTOR}"
            )
        self.manifest = manifest
        self.class_names: list[str] = list(manifest["class_names"])
        self.latent_shape: tuple[int, int, int] = tuple(manifest["latent_shape"])
        self.has_flips: bool = bool(manifest["flip"])
        self._moments: list[np.ndarray] = []
        labels = []
        for entry in manifest["shards"]:
            moments_name, labels_name = shard_file_names(entry["index"])
            moments = _read_shard_array(self.cache_dir / moments_name, mmap_mode="r")
            expected = (entry["count"], len(manifest["moments"]), *self.latent_shape)
            if moments.shape != expected:
                raise ValueError(f"{self.cache_dir / moments_name} has shape {moments.shape}, the manifest "
                                 f"promises {expected}; re-run `meanflow encode` to repair the cache")
            self._moments.append(moments)
            labels.append(_read_shard_array(self.cache_dir / labels_name))
        self._starts = np.array([entry["start"] for entry in manifest["shards"]], dtype=np.int64)
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        if len(self.labels) != manifest["num_images"]:
            raise ValueError(f"the latent cache {self.cache_dir} holds {len(self.labels)} images, the manifest "
                             f"promises {manifest['num_images']}")

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a cache of {len(self)} images")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        moments = np.array(self._moments[shard][index - self._starts[shard]], dtype=np.float32)  # a writable copy
        return torch.from_numpy(moments), int(self.labels[index])

    def moments(self, indices: Tensor, flipped: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The posterior of a set of images, reading only the orientation each one needs.

        Args:
            indices: (B,) image indices.
            flipped: (B,) bool, take the mirrored image's moments; None takes the originals.

        Returns:
            mean, std: each (B, C, h, w) float32.
        """
        indices = np.asarray(indices, dtype=np.int64)
        orientation = np.zeros(len(indices), dtype=np.int64) if flipped is None else np.asarray(flipped, dtype=np.int64)
        if orientation.any() and not self.has_flips:
            raise ValueError(f"the latent cache {self.cache_dir} was encoded without flips")
        out = np.empty((len(indices), 2, *self.latent_shape), dtype=np.float32)
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shards):
            for side in np.unique(orientation):
                rows = np.flatnonzero((shards == shard) & (orientation == side))
                if len(rows):
                    local = indices[rows] - self._starts[shard]
                    # Fancy indexing a memmap reads just these rows' 2 moments from disk.
                    out[rows] = self._moments[shard][local, 2 * side:2 * side + 2]
        moments = torch.from_numpy(out)
        return moments[:, 0], moments[:, 1]


__all__ = ["LatentDataset"]
