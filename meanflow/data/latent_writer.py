"""Writing a latent cache: encode an ImageFolder tree once with the SD-VAE, resumably.

:func:`encode_image_folder` reads the tree in ImageFolder order with the ADM centre crop, encodes
each image (and its mirror) and stores the posterior moments shard by shard in the format of
:mod:`meanflow.data.latent_format`.

Resuming: every file is written atomically (temporary file, fsync, rename) and a shard is added
to the manifest only after both its files are on disk, so after a crash or kill re-running the
same command keeps the finished shards and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..io import atomic_writer
from ..progress import Progress
from ..vae import (
    DEFAULT_VAE,
    SD_VAE_SCALE_FACTOR,
    encode_moments,
    load_vae,
    recorded_vae_name,
    weights_fingerprint,
)
from ..validation import PathLike, check_integer
from .folders import ImageFolderDataset
from .latent_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    FLIP_MOMENT_NAMES,
    MANIFEST_NAME,
    MOMENT_NAMES,
    STORAGE_DTYPES,
    StorageDtype,
    read_manifest,
    shard_file_names,
    write_manifest,
)
from .transforms import to_model_range


def encode_image_folder(
    root: PathLike,
    output_dir: PathLike,
    vae: Union[str, PathLike, nn.Module] = DEFAULT_VAE,
    resolution: int = 256,
    batch_size: int = 32,
    flip: bool = True,
    shard_size: int = 1024,
    skip_corrupt: bool = False,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    storage_dtype: StorageDtype = "float32",
    num_workers: int = 0,
) -> Path:
    """Encode an ImageFolder tree into a latent cache (format in :mod:`meanflow.data.latent_format`).

    Images are read in ImageFolder order with the ADM centre crop to ``resolution``, mapped to
    [-1, 1] and encoded; the posterior mean and std are stored (and with ``flip`` those of the
    mirrored image). Re-running the same call on a partly written folder keeps the finished
    shards and encodes the rest; a finished cache is left as it is. Running with different
    settings, images or VAE weights on an existing cache raises instead of mixing them.

    Args:
        root: the ImageFolder tree, ``root/<class_name>/<image files>``.
        output_dir: the cache folder (created; must be empty or hold a cache of the same settings).
        vae: an AutoencoderKL, or a hub name / local folder for :func:`~meanflow.vae.load_vae`.
        resolution: R, the side of the centre-cropped images (a multiple of the VAE's factor).
        batch_size: images per VAE call (twice as many pass through it with flips).
        flip: also cache the posterior of each left-right mirrored image.
        shard_size: images per shard file (the unit of resuming).
        skip_corrupt: leave out unreadable image files (listed in the manifest) instead of raising.
        device: where a VAE loaded by name runs (a given module is used where it is).
        progress: show a progress bar.
        storage_dtype: "float32" (default) or "float16" for the moments.
        num_workers: image decoding processes (torch DataLoader workers; 0 decodes in-process).

    Returns:
        The cache folder.
    """
    _check_encode_arguments(resolution, batch_size, shard_size, storage_dtype, num_workers)
    output_dir = Path(output_dir).expanduser()
    dataset = ImageFolderDataset(root, resolution, skip_corrupt=skip_corrupt)  # the images before the VAE is read
    vae_name = None if isinstance(vae, nn.Module) else os.fspath(vae)
    if vae_name is not None:
        vae = load_vae(vae_name, device)
    vae.eval()
    labels = np.array([label for _, label in dataset.samples], dtype=np.int64)  # (N,)
    settings = _cache_settings(dataset, vae, vae_name, resolution, flip, shard_size, storage_dtype)
    manifest = _start_or_resume(output_dir, settings, labels)
    _encode_missing_shards(output_dir, manifest, dataset, labels, vae, batch_size, num_workers, progress)
    if not manifest["complete"]:
        raise RuntimeError(f"the encode of {output_dir} ended with {len(manifest['shards'])} of "
                           f"{manifest['num_shards']} shards")
    return output_dir


def _check_encode_arguments(resolution: int, batch_size: int, shard_size: int, storage_dtype: str,
                            num_workers: int) -> None:
    for name, value in (("resolution", resolution), ("batch_size", batch_size), ("shard_size", shard_size)):
        check_integer(name, value)
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")


def _cache_settings(dataset: ImageFolderDataset, vae: nn.Module, vae_name: Optional[str], resolution: int,
                    flip: bool, shard_size: int, storage_dtype: str) -> dict[str, Any]:
    """Everything that must match for an existing cache to be resumed: the manifest less its progress."""
    count = len(dataset)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "num_images": count,
        "num_shards": -(-count // shard_size),
        "shard_size": shard_size,
        "resolution": resolution,
        "flip": bool(flip),
        "moments": list(FLIP_MOMENT_NAMES if flip else MOMENT_NAMES),
        "dtype": storage_dtype,
        "scale_factor": SD_VAE_SCALE_FACTOR,
        "vae": recorded_vae_name(vae, vae_name),
        "vae_sha256": weights_fingerprint(vae),
        "preprocessing": "ADM centre crop to resolution, RGB, x / 127.5 - 1",
        "class_names": list(dataset.class_names),
        "fingerprint": _dataset_fingerprint(dataset),
        "skipped": [Path(path).relative_to(dataset.root).as_posix() for path in dataset.skipped],
    }


def _encode_missing_shards(output_dir: Path, manifest: dict, dataset: ImageFolderDataset, labels: np.ndarray,
                           vae: nn.Module, batch_size: int, num_workers: int, progress: bool) -> None:
    """Encode the shards the manifest does not list yet, writing each one as soon as it is full."""
    count, shard_size = manifest["num_images"], manifest["shard_size"]
    # (M, C, h, w) of one image's moments; the latent shape is known once the VAE has run.
    shape = (len(manifest["moments"]), *manifest["latent_shape"]) if manifest["latent_shape"] else None
    finished = {entry["index"] for entry in manifest["shards"]}
    pending = [index for index in range(manifest["num_shards"]) if index not in finished]
    batches, owners = _plan_batches(pending, shard_size, count, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    bar = Progress(count, sum(entry["count"] for entry in manifest["shards"]), enabled=progress, every=shard_size,
                   unit="img")
    current, buffer, filled = None, None, 0
    try:
        for (images, _), index in zip(loader, owners):
            moments = _encode_batch(vae, images, manifest["flip"])  # (b, M, C, h, w)
            shape = _checked_moment_shape(manifest, shape, moments)
            if index != current:
                current, filled = index, 0
                rows = min((index + 1) * shard_size, count) - index * shard_size
                buffer = np.empty((rows, *shape), dtype=manifest["dtype"])
            buffer[filled:filled + len(moments)] = moments.numpy()
            filled += len(moments)
            bar.update(len(moments))
            if filled == len(buffer):
                _write_shard(output_dir, manifest, index, buffer, labels)
    finally:
        bar.close()


def _plan_batches(pending: list[int], shard_size: int, count: int, batch_size: int) -> tuple[list, list]:
    """(image indices of each batch, the shard each batch belongs to) for the pending shards.

    Batches never straddle shards, so each shard is filled by consecutive batches of the loader.
    """
    batches, owners = [], []
    for index in pending:
        start, stop = index * shard_size, min((index + 1) * shard_size, count)
        for first in range(start, stop, batch_size):
            batches.append(list(range(first, min(first + batch_size, stop))))
            owners.append(index)
    return batches, owners


def _checked_moment_shape(manifest: dict, shape: Optional[tuple], moments: Tensor) -> tuple:
    """The (M, C, h, w) of the cache: taken from the first batch, then required of every batch."""
    if shape is None:
        shape = tuple(moments.shape[1:])
        manifest["latent_shape"] = list(shape[1:])
    elif tuple(moments.shape[1:]) != shape:
        raise ValueError(f"the VAE returned moments of shape {tuple(moments.shape[1:])}, the cache holds {shape}")
    return shape


def _write_shard(output_dir: Path, manifest: dict, index: int, moments: np.ndarray, labels: np.ndarray) -> int:
    """Write shard ``index`` (moments (n, M, C, h, w)) and then list it; returns the images now done.

    The manifest is rewritten only after both files are on disk: that order is what makes a
    killed encode resumable.
    """
    start = index * manifest["shard_size"]
    moments_name, labels_name = shard_file_names(index)
    _save_npy_atomic(output_dir / moments_name, moments)
    _save_npy_atomic(output_dir / labels_name, labels[start:start + len(moments)])
    manifest["shards"].append({"index": index, "start": start, "count": len(moments)})
    manifest["shards"].sort(key=lambda entry: entry["index"])
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    write_manifest(output_dir, manifest)
    return sum(entry["count"] for entry in manifest["shards"])


def _encode_batch(vae: nn.Module, images: Tensor, flip: bool) -> Tensor:
    """uint8 images (b, 3, R, R) -> their moments (b, M, C, h, w) float32 on the CPU, M = 4 or 2."""
    x = to_model_range(images)  # (b, 3, R, R) in [-1, 1]
    if not flip:
        mean, std = encode_moments(vae, x)  # (b, C, h, w) each
        return torch.stack([mean, std], dim=1).cpu()
    b = x.shape[0]
    mean, std = encode_moments(vae, torch.cat([x, x.flip(-1)]))  # one VAE call: (2b, C, h, w) each
    return torch.stack([mean[:b], std[:b], mean[b:], std[b:]], dim=1).cpu()


def _start_or_resume(output_dir: Path, settings: dict, labels: np.ndarray) -> dict:
    """The manifest to continue from: a fresh one, or the existing one with missing shards dropped."""
    manifest_path = output_dir / MANIFEST_NAME
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"the cache output {output_dir} is a file, not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output_dir)
    if not manifest_path.exists():
        leftovers = sorted(entry.name for entry in output_dir.iterdir())
        if leftovers:
            raise ValueError(
                f"the cache output {output_dir} is not empty and holds no {MANIFEST_NAME} (found "
                f"{leftovers[:5]}{' ...' if len(leftovers) > 5 else ''}); choose an empty or new folder"
            )
        manifest = dict(settings, latent_shape=None, shards=[], complete=False)
        write_manifest(output_dir, manifest)
        return manifest
    previous = read_manifest(output_dir)
    # The VAE is compared by its weights: a hub name and a local copy of it are the same VAE.
    changed = [key for key in settings if key != "vae" and previous.get(key) != settings[key]]
    if changed:
        details = "; ".join(f"{key}: cache {_short(previous.get(key))}, now {_short(settings[key])}" for key in changed)
        raise ValueError(
            f"{output_dir} holds a latent cache written with other settings, images or VAE weights ({details}); "
            "re-run with the same arguments to resume it, or write to a new folder"
        )
    shape = previous.get("latent_shape")
    kept = []
    if shape is not None:
        moment_shape = (len(settings["moments"]), *shape)
        for entry in previous.get("shards", []):
            start = entry["start"]
            if _shard_on_disk(output_dir, entry, moment_shape, settings["dtype"], labels[start:start + entry["count"]]):
                kept.append(entry)
    manifest = dict(settings, vae=previous["vae"], latent_shape=shape, shards=kept,
                    complete=len(kept) == settings["num_shards"])
    if kept != previous.get("shards") or manifest["complete"] != previous.get("complete"):
        write_manifest(output_dir, manifest)
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dataset_fingerprint(dataset: ImageFolderDataset) -> str:
    """sha256 of the sorted (relative path, label, size in bytes) list and the class names."""
    digest = hashlib.sha256(json.dumps(list(dataset.class_names)).encode())
    for path, label in dataset.samples:
        relative = Path(path).relative_to(dataset.root).as_posix()
        digest.update(f"{relative}\0{label}\0{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_writer(path) as handle:  # streamed: no second copy of the shard in memory
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _shard_on_disk(output_dir: Path, entry: dict, shape: tuple, dtype: str, labels: np.ndarray) -> bool:
    """Whether both files of a manifest entry exist with the expected shape, dtype and labels."""
    moments_name, labels_name = shard_file_names(entry["index"])
    try:
        moments = np.load(output_dir / moments_name, mmap_mode="r", allow_pickle=False)
        stored_labels = np.load(output_dir / labels_name, allow_pickle=False)
    except (OSError, ValueError):
        return False
    return (moments.shape == (entry["count"], *shape) and moments.dtype == np.dtype(dtype)
            and stored_labels.dtype == np.int64 and np.array_equal(stored_labels, labels))


def _remove_stale_temporaries(output_dir: Path) -> None:
    # atomic_writer names its temporary files ".<target>.<random>.tmp"; a killed run leaves them.
    for pattern in (".shard_*.npy.*.tmp", f".{MANIFEST_NAME}.*.tmp"):
        for stale in output_dir.glob(pattern):
            stale.unlink(missing_ok=True)


__all__ = ["encode_image_folder"]
