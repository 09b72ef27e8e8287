"""The one rounding rule between the model's pixel range [-1, 1] and uint8 pixels.

Everything that turns generated images into 0..255 (sample grids, sample files, FID / IS
features) goes through :func:`to_uint8`, so a grid, a saved sample and a scored sample of the
same image hold the very same bytes. (The way back, uint8 data to the model's range, is
:func:`meanflow.data.transforms.to_model_range`; this rule inverts it exactly.) Values are mapped in float64 and rounded half up:
``floor(255 (v - lo) / (hi - lo) + 0.5)``, clamped to [0, 255], NaN to 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(values: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Map ``[low, high]`` to 0..255 (``low -> 0``, ``high -> 255``), shape and device kept."""
    if not low < high:
        raise ValueError(f"the value range must be (low, high) with low < high, got ({low}, {high})")
    levels = torch.floor((values.detach().to(torch.float64) - low) / (high - low) * 255.0 + 0.5)
    return torch.nan_to_num(levels, nan=0.0).clamp(0.0, 255.0).to(torch.uint8)

