"""The Stable Diffusion VAE: loading it (once per process), encoding images to moments, decoding latents.

The paper's ImageNet models (spec section 7) learn in the latent space of the SD-VAE "ft-mse":
a 256 x 256 image becomes a 4 x 32 x 32 latent ``z = sample * SD_VAE_SCALE_FACTOR``. This module
is the one place that knows how to build the ``diffusers.AutoencoderKL`` (hub name or local
folder, offline or not), what its scale factor is, and how to call it; the latent cache writer,
the sample grids and the evaluator all go through it.

diffusers is optional: it is imported when a VAE is first loaded by name.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor, nn

from .fingerprints import state_fingerprint
from .validation import PathLike, check_integer

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL

SD_VAE_SCALE_FACTOR = 0.18215
"""Multiplies SD-VAE posterior samples so that latents have roughly unit variance.

The one place this constant lives; a port that used 0.18125 trained on mis-scaled latents
(spec section 8).
"""

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
"""The Hugging Face hub name of the paper's VAE (spec section 7)."""

_VAE_FILES = "config.json and diffusion_pytorch_model.safetensors"

# The VAEs load_vae has read from disk, keyed by _cache_key; the lock makes two threads that ask
# for the same VAE read it once.
_loaded: dict[tuple, nn.Module] = {}
_loaded_lock = threading.Lock()


class VAEUnavailableError(FileNotFoundError):
    """The VAE weights are neither in a local folder nor in the hub cache, and cannot be downloaded."""


def load_vae(
    name_or_path: Union[str, PathLike, nn.Module] = DEFAULT_VAE,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> "AutoencoderKL":
    """A ``diffusers.AutoencoderKL`` in eval mode with gradients off, on ``device`` in ``dtype``.

    A VAE given by name is read from disk once per process: a later call for the same VAE, device
    and dtype returns the same module (so a training run does not reload it for every sample
    grid). The module is shared, so treat it as read-only. "The same VAE" is the same hub name,
    or the same local folder (by its resolved path) with unchanged files (by their sizes and
    modification times: weights saved again are read again). :func:`clear_vae_cache` forgets
    them all. A failed load is not remembered.

    Args:
        name_or_path: a hub name (default ``stabilityai/sd-vae-ft-mse``), a local folder with
            config.json and diffusion_pytorch_model.safetensors (as written by
            ``vae.save_pretrained(folder)``), or an already-built model, which is moved in place
            (and never cached).
        device: where the model runs.
        dtype: its parameter dtype.

    Raises:
        ImportError: diffusers is not installed.
        VAEUnavailableError: the weights cannot be found (offline with an empty cache, or a local
            folder that does not exist or misses files); the message says how to point at a copy.
    """
    if isinstance(name_or_path, nn.Module):
        return name_or_path.to(device=device, dtype=dtype).eval().requires_grad_(False)
    autoencoder_class = _import_autoencoder()
    name, folder = _resolve_vae_location(os.fspath(name_or_path))
    key = _cache_key(name, folder, device, dtype)
    with _loaded_lock:
        if key not in _loaded:
            _loaded[key] = _read_vae(autoencoder_class, name, folder is not None, device, dtype)
        return _loaded[key]


def clear_vae_cache() -> None:
    """Forget the VAEs :func:`load_vae` has read, so that the next call reads from disk again.

    For tests, and to free the memory of a VAE that is no longer needed (callers holding the
    module keep it alive).
    """
    with _loaded_lock:
        _loaded.clear()


def _import_autoencoder() -> type:
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError(
            "the SD-VAE latents need diffusers; install it with `pip install diffusers safetensors`"
        ) from error
    return AutoencoderKL


def _resolve_vae_location(name: str) -> tuple[str, Optional[Path]]:
    """(the name to give from_pretrained, the local folder or None for a hub name); raises for bad folders."""
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise VAEUnavailableError(
                f"the VAE folder {local} has no config.json; a local VAE is a folder with {_VAE_FILES}, "
                "as written by AutoencoderKL.save_pretrained(folder)"
            )
        return str(local), local
    if _looks_like_path(name):
        raise VAEUnavailableError(
            f"the VAE folder {local} does not exist; pass a folder with {_VAE_FILES} (written by "
            f"AutoencoderKL.save_pretrained(folder)) or a hub name such as {DEFAULT_VAE}"
        )
    return name, None


def _cache_key(name: str, folder: Optional[Path], device: Union[str, torch.device], dtype: torch.dtype) -> tuple:
    """What makes two loads the same: the weights' source, the device and the dtype.

    A folder is named by its resolved path (``./vae`` and ``/abs/vae`` are one VAE) and stamped
    with its files' names, sizes and modification times, so that overwritten weights miss.
    ``cuda`` is read as the current CUDA device, where the module would land.
    """
    if folder is None:
        source: tuple = ("hub", name)
    else:
        stamp = tuple(sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                             for entry in os.scandir(folder) if entry.is_file()))
        source = ("folder", str(folder.resolve()), stamp)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return source, device, dtype


def _read_vae(autoencoder_class: type, name: str, is_local: bool, device: Union[str, torch.device],
              dtype: torch.dtype) -> "AutoencoderKL":
    """``AutoencoderKL.from_pretrained(name)`` on ``device`` in eval mode, with gradients off."""
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
            vae = autoencoder_class.from_pretrained(name, **options)
    except (OSError, ValueError) as error:
        raise VAEUnavailableError(_vae_unavailable_message(name, is_local, error)) from error
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
        f"{_VAE_FILES}) and pass it as --vae FOLDER (meanflow encode / eval) or --set data.vae=FOLDER "
        "(meanflow train; Python: data.vae=FOLDER in the configuration); or copy the hub cache here and set "
        "HF_HUB_OFFLINE=1."
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
    check_integer("batch_size", batch_size)
    if latents.dim() != 4:
        raise ValueError(f"decode_latents expects latents (B, C, h, w), got shape {tuple(latents.shape)}")
    device, dtype = _module_placement(vae)
    images = []
    for chunk in latents.split(batch_size):
        z = chunk.to(device=device, dtype=dtype) / SD_VAE_SCALE_FACTOR  # (b, C, h, w), unscaled
        decoded = vae.decode(z).sample  # (b, 3, H, W)
        images.append(decoded.to(device=latents.device, dtype=torch.float32).clamp_(-1.0, 1.0))
    return torch.cat(images)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of the state dict: two VAEs share it only if their weights are bitwise equal."""
    return state_fingerprint(module.state_dict())


def recorded_vae_name(vae: nn.Module, given: Optional[str]) -> str:
    """The name a latent cache records for ``vae``: the one it was loaded by, else what diffusers kept."""
    if given is not None:
        return given
    recorded = getattr(getattr(vae, "config", None), "_name_or_path", None)
    return str(recorded) if recorded else f"<in-memory {type(vae).__name__}>"


__all__ = [
    "DEFAULT_VAE",
    "SD_VAE_SCALE_FACTOR",
    "VAEUnavailableError",
    "clear_vae_cache",
    "decode_latents",
    "encode_moments",
    "load_vae",
]
