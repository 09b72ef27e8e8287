"""SD-VAE latents: encode an ImageFolder tree once, then train on fresh posterior samples.

The paper's ImageNet models (spec section 7) learn in the latent space of the Stable Diffusion
VAE "ft-mse": a 256 x 256 image becomes a 4 x 32 x 32 latent. Each image is encoded once and
its Gaussian posterior ``N(mean, std^2)`` is cached, not a single sample of it; every training
step then draws a fresh ``z = (mean + std * eps) * SD_VAE_SCALE_FACTOR``, so the model never sees
the same latent twice (the posterior noise is a mild augmentation, as in the paper).

The pieces, in the order data flows:

* :func:`load_vae` builds the ``diffusers.AutoencoderKL`` (hub name or local folder);
* :func:`encode_image_folder` writes the cache (resumable, see below);
* :class:`LatentDataset` opens it with memory maps; :class:`LatentBatches` is the training
  loop's :class:`~meanflow.data.sources.BatchSource` over it;
* :func:`decode_latents` maps generated latents back to images.

Cache format (one folder, written by :func:`encode_image_folder`)::

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

Resuming: every file is written atomically (temporary file, fsync, rename) and a shard is added
to the manifest only after both its files are on disk, so after a crash or kill re-running the
same command keeps the finished shards and redoes the rest.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union, get_args

import numpy as np
import torch
from torch import Tensor, nn

from ..io import write_bytes_atomic, write_text_atomic
from .images import ImageFolderDataset, PathLike, _check_positive_int, to_model_range

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL

SD_VAE_SCALE_FACTOR = 0.18215
"""Multiplies SD-VAE posterior samples so that latents have roughly unit variance.

The one place this constant lives; a port that used 0.18125 trained on mis-scaled latents
(spec section 8).
"""

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
"""The Hugging Face hub name of the paper's VAE (spec section 7)."""

StorageDtype = Literal["float32", "float16"]
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)

CACHE_FORMAT = "meanflow-latent-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"

_MOMENT_NAMES = ("mean", "std")
_FLIP_MOMENT_NAMES = ("mean", "std", "flip_mean", "flip_std")
_VAE_FILES = "config.json and diffusion_pytorch_model.safetensors"


class VAEUnavailableError(FileNotFoundError):
    """The VAE weights are neither in a local folder nor in the hub cache, and cannot be downloaded."""


# ------------------------------------------------------------------------------------------------
# The VAE
# ------------------------------------------------------------------------------------------------


def load_vae(
    name_or_path: Union[str, PathLike, nn.Module] = DEFAULT_VAE,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> "AutoencoderKL":
    """A ``diffusers.AutoencoderKL`` in eval mode with gradients off, on ``device`` in ``dtype``.

    Args:
        name_or_path: a hub name (default ``stabilityai/sd-vae-ft-mse``), a local folder with
            config.json and diffusion_pytorch_model.safetensors (as written by
            ``vae.save_pretrained(folder)``), or an already-built model, which is moved in place.
        device: where the model runs.
        dtype: its parameter dtype.

    Raises:
        ImportError: diffusers is not installed.
        VAEUnavailableError: the weights cannot be found (offline with an empty cache, or a local
            folder that does not exist or misses files); the message says how to point at a copy.
    """
    if isinstance(name_or_path, nn.Module):
        return name_or_path.to(device=device, dtype=dtype).eval().requires_grad_(False)
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError(
            "the SD-VAE latents need diffusers; install it with `pip install diffusers safetensors`"
        ) from error
    name = os.fspath(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise VAEUnavailableError(
                f"the VAE folder {local} has no config.json; a local VAE is a folder with {_VAE_FILES}, "
                "as written by AutoencoderKL.save_pretrained(folder)"
            )
        name = str(local)
    elif _looks_like_path(name):
        raise VAEUnavailableError(
            f"the VAE folder {local} does not exist; pass a folder with {_VAE_FILES} (written by "
            f"AutoencoderKL.save_pretrained(folder)) or a hub name such as {DEFAULT_VAE}"
        )
    options: dict[str, Any] = {"torch_dtype": dtype}
    if _hub_offline():
        # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, when imported.
        options["local_files_only"] = True
    if _missing("accelerate"):
        options["low_cpu_mem_usage"] = False  # the default asks for accelerate and logs a warning
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument it deprecated; not the user's concern.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            vae = AutoencoderKL.from_pretrained(name, **options)
    except (OSError, ValueError) as error:
        raise VAEUnavailableError(_vae_unavailable_message(name, local.exists(), error)) from error
    return vae.to(device).eval().requires_grad_(False)


def _vae_unavailable_message(name: str, is_local: bool, error: Exception) -> str:
    if is_local:
        return (f"could not load the VAE from the folder {name} ({error}); it must hold {_VAE_FILES}, "
                "as written by AutoencoderKL.save_pretrained(folder)")
    offline = " (HF_HUB_OFFLINE is set, so only the local cache was searched)" if _hub_offline() else ""
    return (
        f"could not load the VAE weights '{name}' from the Hugging Face hub or its local cache{offline}: "
        f"{str(error).rstrip('.')}. On a machine with internet access, download them once into a folder "
        f"(`hf download {name} --local-dir FOLDER`, or "
        f"AutoencoderKL.from_pretrained('{name}').save_pretrained(FOLDER)), copy the folder here (it holds "
        f"{_VAE_FILES}) and pass it as `--vae FOLDER` on the command line or data.vae=FOLDER in the "
        "configuration; or copy the hub cache here and set HF_HUB_OFFLINE=1."
    )


def _looks_like_path(name: str) -> bool:
    """Hub names are ``owner/name``; anything else with a separator or a path prefix is a path."""
    return (name.startswith((".", "~", os.sep)) or name.count("/") > 1 or "\\" in name
            or (os.altsep is not None and name.startswith(os.altsep)))


def _hub_offline() -> bool:
    return any(os.environ.get(key, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _module_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


@torch.no_grad()
def encode_moments(vae: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE posterior of images in [-1, 1].

    Args:
        vae: an AutoencoderKL.
        images: (B, 3, H, W) float in [-1, 1].

    Returns:
        mean, std: each (B, C, H / f, W / f) float32 on the images' device (f = 8 for the SD-VAE),
        unscaled (multiply samples by :data:`SD_VAE_SCALE_FACTOR`).
    """
    device, dtype = _module_placement(vae)
    posterior = vae.encode(images.to(device=device, dtype=dtype)).latent_dist
    mean = posterior.mean.to(torch.float32)
    # From the clamped log-variance in float32, as diffusers computes std, without fp16 rounding.
    std = torch.exp(0.5 * posterior.logvar.to(torch.float32))
    return mean.to(images.device), std.to(images.device)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor, batch_size: int = 16) -> Tensor:
    """Scaled latents -> images: ``vae.decode(latents / SD_VAE_SCALE_FACTOR)``, clamped to [-1, 1].

    Args:
        vae: an AutoencoderKL.
        latents: (B, C, h, w), in the scaled space the model is trained in.
        batch_size: decode this many at a time (bounds the decoder's memory).

    Returns:
        (B, 3, H, W) float32 in [-1, 1] on the latents' device; H = h * f (f = 8 for the SD-VAE).
    """
    _check_positive_int("batch_size", batch_size)
    if latents.dim() != 4:
        raise ValueError(f"decode_latents expects latents (B, C, h, w), got shape {tuple(latents.shape)}")
    device, dtype = _module_placement(vae)
    images = []
    for chunk in latents.split(batch_size):
        z = chunk.to(device=device, dtype=dtype) / SD_VAE_SCALE_FACTOR  # (b, C, h, w), unscaled
        decoded = vae.decode(z).sample  # (b, 3, H, W)
        images.append(decoded.to(device=latents.device, dtype=torch.float32).clamp_(-1.0, 1.0))
    return torch.cat(images)


def _weights_fingerprint(module: nn.Module) -> str:
    """sha256 of the state dict: two VAEs share it only if their weights are bitwise equal."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _vae_name(vae: nn.Module, given: Optional[str]) -> str:
    if given is not None:
        return given
    recorded = getattr(getattr(vae, "config", None), "_name_or_path", None)
    return str(recorded) if recorded else f"<in-memory {type(vae).__name__}>"


# ------------------------------------------------------------------------------------------------
# Writing the cache
# ------------------------------------------------------------------------------------------------


def _shard_files(index: int) -> tuple[str, str]:
    return f"shard_{index:05d}.moments.npy", f"shard_{index:05d}.labels.npy"


def _dataset_fingerprint(dataset: ImageFolderDataset) -> str:
    """sha256 of the sorted (relative path, label, size in bytes) list and the class names."""
    digest = hashlib.sha256(json.dumps(list(dataset.class_names)).encode())
    for path, label in dataset.samples:
        relative = Path(path).relative_to(dataset.root).as_posix()
        digest.update(f"{relative}\0{label}\0{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())


def _write_manifest(output_dir: Path, manifest: dict) -> None:
    write_text_atomic(output_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def _read_manifest(cache_dir: Path) -> dict:
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


def _shard_on_disk(output_dir: Path, entry: dict, shape: tuple, dtype: str, labels: np.ndarray) -> bool:
    """Whether both files of a manifest entry exist with the expected shape, dtype and labels."""
    moments_name, labels_name = _shard_files(entry["index"])
    try:
        moments = np.load(output_dir / moments_name, mmap_mode="r", allow_pickle=False)
        stored_labels = np.load(output_dir / labels_name, allow_pickle=False)
    except (OSError, ValueError):
        return False
    return (moments.shape == (entry["count"], *shape) and moments.dtype == np.dtype(dtype)
            and stored_labels.dtype == np.int64 and np.array_equal(stored_labels, labels))


def _remove_stale_temporaries(output_dir: Path) -> None:
    # write_bytes_atomic names its temporary files ".<target>.<random>.tmp"; a killed run leaves them.
    for pattern in (".shard_*.npy.*.tmp", f".{MANIFEST_NAME}.*.tmp"):
        for stale in output_dir.glob(pattern):
            stale.unlink(missing_ok=True)


class _Progress:
    """tqdm over images when installed, otherwise a line per finished shard on stderr."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar, self.enabled, self.total = None, enabled, total
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, unit="img", desc="encode", dynamic_ncols=True)

    def images(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def shard(self, index: int, done: int) -> None:
        if self.enabled and self.bar is None:
            print(f"encode: shard {index} written, {done}/{self.total} images", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    """Encode an ImageFolder tree into a latent cache (format in the module docstring).

    Images are read in ImageFolder order with the ADM centre crop to ``resolution``, mapped to
    [-1, 1] and encoded; the posterior mean and std are stored (and with ``flip`` those of the
    mirrored image). Re-running the same call on a partly written folder keeps the finished
    shards and encodes the rest; a finished cache is left as it is. Running with different
    settings, images or VAE weights on an existing cache raises instead of mixing them.

    Args:
        root: the ImageFolder tree, ``root/<class_name>/<image files>``.
        output_dir: the cache folder (created; must be empty or hold a cache of the same settings).
        vae: an AutoencoderKL, or a hub name / local folder for :func:`load_vae`.
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
    for name, value in (("resolution", resolution), ("batch_size", batch_size), ("shard_size", shard_size)):
        _check_positive_int(name, value)
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    output_dir = Path(output_dir).expanduser()
    vae_name = None if isinstance(vae, nn.Module) else os.fspath(vae)
    if vae_name is not None:
        vae = load_vae(vae_name, device)
    vae.eval()
    dataset = ImageFolderDataset(root, resolution, skip_corrupt=skip_corrupt)
    labels = np.array([label for _, label in dataset.samples], dtype=np.int64)
    count = len(dataset)
    num_shards = -(-count // shard_size)

    settings = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "num_images": count,
        "num_shards": num_shards,
        "shard_size": shard_size,
        "resolution": resolution,
        "flip": bool(flip),
        "moments": list(_FLIP_MOMENT_NAMES if flip else _MOMENT_NAMES),
        "dtype": storage_dtype,
        "scale_factor": SD_VAE_SCALE_FACTOR,
        "vae": _vae_name(vae, vae_name),
        "vae_sha256": _weights_fingerprint(vae),
        "preprocessing": "ADM centre crop to resolution, RGB, x / 127.5 - 1",
        "class_names": list(dataset.class_names),
        "fingerprint": _dataset_fingerprint(dataset),
        "skipped": [Path(path).relative_to(dataset.root).as_posix() for path in dataset.skipped],
    }
    manifest = _start_or_resume(output_dir, settings, labels)
    # (M, C, h, w) of one image's moments; the latent shape is known once the VAE has run.
    shape = (len(settings["moments"]), *manifest["latent_shape"]) if manifest["latent_shape"] else None
    finished = {entry["index"] for entry in manifest["shards"]}
    pending = [index for index in range(num_shards) if index not in finished]
    done = sum(entry["count"] for entry in manifest["shards"])

    # Batches never straddle shards, so each shard is filled by consecutive batches of the loader.
    batches, owners = [], []
    for index in pending:
        start, stop = index * shard_size, min((index + 1) * shard_size, count)
        for first in range(start, stop, batch_size):
            batches.append(list(range(first, min(first + batch_size, stop))))
            owners.append(index)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    bar = _Progress(count, done, progress)
    current, buffer, filled = None, None, 0
    try:
        for (images, _), index in zip(loader, owners):
            moments = _encode_batch(vae, images, flip)  # (b, M, C, h, w)
            b = moments.shape[0]
            if shape is None:
                shape = tuple(moments.shape[1:])
                manifest["latent_shape"] = list(shape[1:])
            elif tuple(moments.shape[1:]) != shape:
                raise ValueError(f"the VAE returned moments of shape {tuple(moments.shape[1:])}, the cache "
                                 f"holds {shape}")
            if index != current:
                current, filled = index, 0
                rows = min((index + 1) * shard_size, count) - index * shard_size
                buffer = np.empty((rows, *shape), dtype=storage_dtype)
            buffer[filled:filled + b] = moments.numpy()
            filled += b
            bar.images(b)
            if filled == len(buffer):
                start = index * shard_size
                moments_name, labels_name = _shard_files(index)
                _save_npy_atomic(output_dir / moments_name, buffer)
                _save_npy_atomic(output_dir / labels_name, labels[start:start + filled])
                manifest["shards"].append({"index": index, "start": start, "count": filled})
                manifest["shards"].sort(key=lambda entry: entry["index"])
                done += filled
                manifest["complete"] = len(manifest["shards"]) == num_shards
                _write_manifest(output_dir, manifest)
                bar.shard(index, done)
    finally:
        bar.close()
    if not manifest["complete"]:
        raise RuntimeError(f"the encode of {output_dir} ended with {len(manifest['shards'])} of {num_shards} shards")
    return output_dir


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
        _write_manifest(output_dir, manifest)
        return manifest
    previous = _read_manifest(output_dir)
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
        _write_manifest(output_dir, manifest)
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------
# Reading the cache
# ------------------------------------------------------------------------------------------------


class LatentDataset:
    """A finished latent cache, memory-mapped: posterior moments and labels by image index.

    Args:
        cache_dir: a folder written by :func:`encode_image_folder`.

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
        manifest = _read_manifest(self.cache_dir)
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
            moments_name, labels_name = _shard_files(entry["index"])
            moments = np.load(self.cache_dir / moments_name, mmap_mode="r", allow_pickle=False)
            expected = (entry["count"], len(manifest["moments"]), *self.latent_shape)
            if moments.shape != expected:
                raise ValueError(f"{self.cache_dir / moments_name} has shape {moments.shape}, the manifest "
                                 f"promises {expected}; re-run `meanflow encode` to repair the cache")
            self._moments.append(moments)
            labels.append(np.load(self.cache_dir / labels_name, allow_pickle=False))
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


def _derived_seed(*values: int) -> int:
    """A 63-bit seed from integers, the same in every process and Python version."""
    digest = hashlib.sha256(b"meanflow.latents" + b"".join(int(v).to_bytes(16, "little", signed=True) for v in values))
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


class _Stream(enum.IntEnum):
    """The purposes that get independent random streams from one batch position."""

    PERMUTATION = 0
    FLIP = 1
    NOISE = 2


class LatentBatches:
    """Shuffled epochs over a latent cache; a fresh posterior sample every time a batch is drawn.

    Like :class:`~meanflow.data.sources.TensorBatches`: epoch ``e`` is a permutation drawn from
    (seed, e), a global batch of ``batch_size * world_size`` images is cut from it at ``offset``,
    process ``rank`` takes rows ``[rank * batch_size, (rank + 1) * batch_size)`` and the last
    incomplete global batch of an epoch is dropped. Each image then becomes::

        z = (mean + std * eps) * SD_VAE_SCALE_FACTOR,   eps ~ N(0, I)

    using the mirrored image's (mean, std) with probability 1/2 when ``flip`` is set. The flip
    decisions and eps of a global batch come from generators seeded by (seed, epoch, offset), and
    each rank takes its rows of them, so the position (epoch, offset) is the whole state: a
    resumed run draws bit-identical batches on every rank, even though the training loop saves
    the state of rank 0 only, and an image seen in two epochs gets two different samples.

    Args:
        cache_dir: a finished latent cache.
        batch_size: the per-process batch size.
        seed: the shuffling and sampling seed (the same on every process).
        rank, world_size: this process's slice of the global batch.
        flip: use mirrored images half the time (the cache must hold flips).
        class_conditional: return the labels; False returns None in their place.

    ``next_batch()`` returns latents (B, C, h, w) float32 and labels (B,) int64 (or None).
    """

    def __init__(
        self,
        cache_dir: PathLike,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = True,
        class_conditional: bool = True,
    ):
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.dataset = LatentDataset(cache_dir)
        if flip and not self.dataset.has_flips:
            raise ValueError(
                f"horizontal flips were asked for but the latent cache {self.dataset.cache_dir} was encoded "
                "with --no-flip; set data.horizontal_flip=false or re-encode without --no-flip"
            )
        global_batch = batch_size * world_size
        if len(self.dataset) < global_batch:
            raise ValueError(
                f"the latent cache has {len(self.dataset)} images, fewer than one global batch of {global_batch} "
                f"({batch_size} per process x {world_size} processes); lower training.batch_size"
            )
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.flip, self.class_conditional = flip, class_conditional
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w)."""
        return self.dataset.latent_shape

    def _generator(self, stream: int, *position: int) -> torch.Generator:
        return torch.Generator().manual_seed(_derived_seed(self.seed, stream, *position))

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.dataset), generator=self._generator(_Stream.PERMUTATION, epoch))

    def next_batch(self) -> tuple[Tensor, Optional[Tensor]]:
        global_batch = self.batch_size * self.world_size
        if self.offset + global_batch > len(self.dataset):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows = self._order[self.offset:self.offset + global_batch][mine]  # (B,)
        flipped = None
        if self.flip:
            coins = torch.rand(global_batch, generator=self._generator(_Stream.FLIP, self.epoch, self.offset))
            flipped = (coins < 0.5)[mine]  # (B,)
        mean, std = self.dataset.moments(rows, flipped)  # (B, C, h, w) each
        noise = self._generator(_Stream.NOISE, self.epoch, self.offset)
        eps = torch.randn((global_batch, *self.latent_shape), generator=noise)[mine]  # (B, C, h, w)
        z = (mean + std * eps) * SD_VAE_SCALE_FACTOR
        self.offset += global_batch
        return z, self.dataset.labels[rows] if self.class_conditional else None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_VAE",
    "SD_VAE_SCALE_FACTOR",
    "STORAGE_DTYPES",
    "LatentBatches",
    "LatentDataset",
    "StorageDtype",
    "VAEUnavailableError",
    "decode_latents",
    "encode_image_folder",
    "encode_moments",
    "load_vae",
]
