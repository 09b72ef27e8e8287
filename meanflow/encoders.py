"""What the network's space is, as objects: pixels, VAE latents, or points.

A network generates samples in *its* space: images in [-1, 1], latents of a VAE, or 2-D points.
An :class:`Encoder` knows that space: the shape of one sample, how to decode samples to
something to look at and to score (images in [-1, 1], or the points themselves), how to turn
them into uint8 pixels by the project's one rounding rule (:func:`meanflow.pixels.to_uint8`),
and how to draw them (an image grid, or a scatter plot). Code that handles samples asks the
run's encoder instead of branching on the kind of data.

Encoders are data: ``to_dict`` / :func:`encoder_from_dict` round-trip through the run record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor

from .pixels import to_uint8
from .validation import check_known_keys

MIN_GRID_PIXELS = 512  # small images are upscaled (nearest) so a grid is at least this wide


class Encoder:
    """Base of the encoders (see the module docstring)."""

    name: ClassVar[str]
    is_image: ClassVar[bool]
    sample_shape: tuple

    def decode(self, samples: Tensor) -> Tensor:
        """Samples (B, *sample_shape) -> what they show: images (B, C, H, W) in [-1, 1], or points."""
        return samples

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a decoded image; an error for data that are not images."""
        raise ValueError(f"{self.name} samples are not images: they have no pixels to score or save as images")

    def quantize(self, samples: Tensor) -> Tensor:
        """Samples -> decoded images as uint8 (B, C, H, W), by the one rounding rule."""
        self.image_shape()  # refuses non-image data with a clear message
        return to_uint8(self.decode(samples))

    def file_rows(self, samples: Tensor) -> np.ndarray:
        """Samples as rows of the sample file (:mod:`meanflow.sample_files`): uint8 (B, H, W, C)."""
        return self.quantize(samples).permute(0, 2, 3, 1).cpu().numpy()

    def write_grid(self, samples: Tensor, path: Path, *, nrow: Optional[int] = None,
                   title: Optional[str] = None) -> Path:
        """Draw samples (B, *sample_shape) into a PNG file; returns its path."""
        from .grids import save_image_grid

        images = self.decode(samples).float().cpu()
        return save_image_grid(upscale_for_grid(images, nrow), path, nrow=nrow)

    @property
    def can_draw(self) -> bool:
        """Whether :meth:`write_grid` can picture these samples (1- or 3-channel images, 2-D points)."""
        return True

    def grid_samples(self, requested: int) -> int:
        """How many samples a grid of ``requested`` should draw (a scatter plot needs more)."""
        return requested

    def with_vae(self, vae: Optional[str]) -> "Encoder":
        """This encoder decoding with another VAE (``--vae``); only latents have one."""
        if vae is None:
            return self
        raise ValueError(f"vae (--vae) decodes latents, but this run's samples are {self.name}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sample_shape": list(self.sample_shape)}


@dataclass(frozen=True)
class PixelEncoder(Encoder):
    """Images in pixel space: samples are (C, H, W) in [-1, 1] already."""

    sample_shape: tuple
    name: ClassVar[str] = "pixels"
    is_image: ClassVar[bool] = True

    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.sample_shape)

    @property
    def can_draw(self) -> bool:
        return len(self.sample_shape) == 3 and self.sample_shape[0] in (1, 3)


@dataclass(frozen=True)
class LatentEncoder(Encoder):
    """Latents of a diffusers AutoencoderKL (``vae``: a hub name or local folder), decoded to
    images ``downsampling`` times larger. The VAE is loaded once per process and device
    (:func:`meanflow.vae.load_vae` caches it).

    Two normalisations of the VAE's raw latent ``z``: the SD scale factor (the default; samples
    are ``0.18215 z``, as the latent cache stores them), or, with ``latent_mean`` and
    ``latent_std`` (one number per channel), ``(z - mean) / std`` (what Improved MeanFlow's
    official models generate).
    """

    sample_shape: tuple
    vae: str
    downsampling: int = 8
    image_channels: int = 3
    decode_batch_size: int = 32
    latent_mean: Optional[tuple] = None
    latent_std: Optional[tuple] = None
    name: ClassVar[str] = "latents"
    is_image: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (self.latent_mean is None) != (self.latent_std is None):
            raise ValueError("latent_mean and latent_std are given together (per-channel normalisation) or not at all")
        if self.latent_mean is not None:
            channels = self.sample_shape[0]
            for name in ("latent_mean", "latent_std"):
                values = tuple(float(v) for v in getattr(self, name))
                if len(values) != channels:
                    raise ValueError(f"{name} needs one number per latent channel ({channels}), got {len(values)}")
                object.__setattr__(self, name, values)
            if min(self.latent_std) <= 0:
                raise ValueError(f"latent_std must be > 0 in every channel, got {self.latent_std}")

    def decode(self, samples: Tensor) -> Tensor:
        from .vae import SD_VAE_SCALE_FACTOR, decode_latents, load_vae

        if self.latent_mean is not None:  # (z - mean) / std -> the scale-factor form decode_latents takes
            mean = samples.new_tensor(self.latent_mean).view(1, -1, 1, 1)
            std = samples.new_tensor(self.latent_std).view(1, -1, 1, 1)
            samples = (samples * std + mean) * SD_VAE_SCALE_FACTOR
        vae = load_vae(self.vae, device=samples.device)
        return decode_latents(vae, samples, batch_size=self.decode_batch_size)  # (B, 3, H, W) in [-1, 1]

    def image_shape(self) -> tuple[int, int, int]:
        _, height, width = self.sample_shape
        return self.image_channels, height * self.downsampling, width * self.downsampling

    def with_vae(self, vae: Optional[str]) -> "LatentEncoder":
        return self if vae is None else replace(self, vae=vae)

    def to_dict(self) -> dict[str, Any]:
        normalisation = {} if self.latent_mean is None else {"latent_mean": list(self.latent_mean),
                                                              "latent_std": list(self.latent_std)}
        return {**super().to_dict(), "vae": self.vae, "downsampling": self.downsampling,
                "image_channels": self.image_channels, **normalisation}


@dataclass(frozen=True)
class PointEncoder(Encoder):
    """Flat samples (D,) (the 2-D toys, or a user's vectors): decoding is the identity; for 2-D
    points a grid is a scatter plot (over the named toy distribution's own samples when
    ``reference`` names one)."""

    sample_shape: tuple
    reference: Optional[str] = None
    name: ClassVar[str] = "points"
    is_image: ClassVar[bool] = False

    @property
    def can_draw(self) -> bool:
        return tuple(self.sample_shape) == (2,)  # a scatter plot shows the plane

    def grid_samples(self, requested: int) -> int:
        return max(requested, 2000)

    def file_rows(self, samples: Tensor) -> np.ndarray:
        """Points have no pixels: the file holds them as float32 (B, D)."""
        return samples.detach().float().cpu().numpy()

    def write_grid(self, samples, path, *, nrow=None, title=None) -> Path:
        from .grids import save_scatter

        reference = None
        if self.reference is not None:
            from .toys import sample_toy

            reference = sample_toy(self.reference, max(len(samples), 2000), torch.Generator().manual_seed(1))
        return save_scatter(samples.float().cpu(), path, reference=reference, title=title)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reference": self.reference}


ENCODERS: dict[str, type[Encoder]] = {
    PixelEncoder.name: PixelEncoder,
    LatentEncoder.name: LatentEncoder,
    PointEncoder.name: PointEncoder,
}


def encoder_from_dict(data: Any) -> Encoder:
    """The encoder a run record stores (``{"name": ..., "sample_shape": [...], ...}``)."""
    if not isinstance(data, dict) or data.get("name") not in ENCODERS:
        raise ValueError(f"unknown encoder {data!r}; valid encoder names are {sorted(ENCODERS)}")
    kind = ENCODERS[data["name"]]
    values = {key: value for key, value in data.items() if key != "name"}
    check_known_keys(f"fields of encoder {data['name']!r}", values, kind.__dataclass_fields__)
    values["sample_shape"] = tuple(int(size) for size in values.get("sample_shape", ()))
    return kind(**values)


def upscale_for_grid(images: Tensor, nrow: Optional[int] = None, min_pixels: int = MIN_GRID_PIXELS) -> Tensor:
    """Images (N, C, H, W) enlarged by an integer factor (nearest neighbour, so every pixel stays
    a crisp square) so that a grid of ``nrow`` per row (default ``ceil(sqrt(N))``) is at least
    ``min_pixels`` wide."""
    count, _, _, width = images.shape
    columns = min(count, nrow) if nrow else max(1, math.ceil(math.sqrt(count)))
    factor = max(1, math.ceil(min_pixels / (columns * width)))
    if factor == 1:
        return images
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
