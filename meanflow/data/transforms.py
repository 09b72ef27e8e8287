"""Pixel transforms: uint8 images to the model's range [-1, 1], resizing, Pillow images to tensors.

Images are uint8 (N, C, H, W) until :func:`to_model_range` maps them to [-1, 1]; every image
path of the library (array data sets, image folders, the latent cache's encoder) goes through
it, so 0 -> -1 and 255 -> 1 exactly everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_integer

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

# Converting images in chunks bounds the float32 working memory of resizing a large array.
_RESIZE_CHUNK = 2048


def to_model_range(images: Tensor) -> Tensor:
    """Map uint8 pixels to the model's range: ``x / 127.5 - 1``, so 0 -> -1 and 255 -> 1 exactly.

    Computed as ``(2x - 255) / 255``: the numerator is an exact integer in float32, so the one
    division rounds once and every level is the correctly rounded value of ``x / 127.5 - 1``,
    with ``to_model_range(255 - x) == -to_model_range(x)`` exactly.

    Args:
        images: (N, C, H, W) (or any shape) uint8.

    Returns:
        The same shape, float32 in [-1, 1].
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8 pixels, got {images.dtype}")
    return images.to(torch.float32).mul_(2.0).sub_(255.0).div_(255.0)


def prepare_images(images: Tensor, resolution: Optional[int] = None) -> Tensor:
    """uint8 images -> float32 model inputs in [-1, 1], optionally resized to R x R.

    Resizing is bilinear (``align_corners=False``), with antialiasing when an axis shrinks so
    that downsampling averages rather than aliases. Bilinear and antialiased weights are
    non-negative and sum to 1, so the values stay in [-1, 1] (a final clamp absorbs rounding)
    and a constant image stays constant up to float32 rounding (about 1e-7).
    A non-square input is stretched to R x R (crop it first to keep its aspect ratio).

    Args:
        images: (N, C, H, W) uint8.
        resolution: R, or None to keep (H, W).

    Returns:
        (N, C, R, R) float32 in [-1, 1] ((N, C, H, W) when ``resolution`` is None).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"prepare_images expects uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if resolution is not None:
        check_integer("resolution", resolution)
    if resolution is None or tuple(images.shape[-2:]) == (resolution, resolution):
        return to_model_range(images).contiguous()
    height, width = images.shape[-2:]
    antialias = resolution < height or resolution < width
    out = torch.empty(images.shape[0], images.shape[1], resolution, resolution, dtype=torch.float32)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = to_model_range(images[start:start + _RESIZE_CHUNK])  # (b, C, H, W)
        out[start:start + _RESIZE_CHUNK] = F.interpolate(
            chunk, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=antialias
        )  # (b, C, R, R)
    return out.clamp_(-1.0, 1.0)


def pil_to_tensor(image: "PILImage.Image") -> Tensor:
    """An RGB Pillow image (W x H) -> a (3, H, W) uint8 tensor."""
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)


__all__ = ["pil_to_tensor", "prepare_images", "to_model_range"]
