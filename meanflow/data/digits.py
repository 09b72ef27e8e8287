"""scikit-learn's 8x8 handwritten digits: the project's small, embedded default image data set.

1797 grey-scale images of the digits 0-9 with integer intensities 0..16. The data ships inside
scikit-learn (no download), which makes it the image set every example and smoke test can rely
on offline. scikit-learn is an optional dependency, imported only when the data is loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIGITS_NATIVE_RESOLUTION = 8
DIGITS_MAX_INTENSITY = 16.0
DIGITS_NUM_CLASSES = 10


def load_digits_tensors(resolution: int = DIGITS_NATIVE_RESOLUTION) -> tuple[Tensor, Tensor]:
    """Load the digits as image and label tensors.

    Intensities ``v`` in 0..16 become ``v / 16 * 2 - 1``, so the images span exactly [-1, 1]
    (-1 is the background). With ``resolution != 8`` the images are resized with bilinear
    interpolation (``align_corners=False``, no antialiasing); bilinear weights are convex, so
    the values stay inside [-1, 1]. Any integer ``resolution >= 8`` is accepted; multiples of 8
    (16, 32) keep the upsampling grid regular and are the natural choices.

    Args:
        resolution: R, the side of the returned images, an integer >= 8.

    Returns:
        images: (1797, 1, R, R) float32 in [-1, 1].
        labels: (1797,) int64 class ids in 0..9.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``resolution`` is not an integer >= 8.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
    if resolution < DIGITS_NATIVE_RESOLUTION:
        raise ValueError(f"resolution must be >= {DIGITS_NATIVE_RESOLUTION}, got {resolution}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits data set needs scikit-learn; install it with `pip install scikit-learn` "
            "or `pip install meanflow[all]`"
        ) from error

    bunch = load_digits()
    side = DIGITS_NATIVE_RESOLUTION
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32)  # (N, 8, 8), values 0..16
    images = (pixels / DIGITS_MAX_INTENSITY * 2.0 - 1.0).reshape(-1, 1, side, side)  # (N, 1, 8, 8)
    if resolution != side:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        images = images.clamp_(-1.0, 1.0)  # guards against float rounding only
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)  # (N,)
    return images.contiguous(), labels
