"""The one noise scheme: sample ``i`` of a seed always starts from the same noise.

``meanflow sample``, ``meanflow eval``, the training loop's sample grids and the Python API
(:func:`meanflow.inference.generate`) all draw their starting noise here, so the same seed gives
the same images whatever the command, the batch size, the device or the number of processes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

NOISE_SCHEME = "sample i: numpy.random.default_rng([seed, i]).standard_normal(shape, dtype=float32)"


def sample_noise(seed: int, indices: Tensor | Sequence[int], sample_shape: Sequence[int]) -> Tensor:
    """Noise (B, *sample_shape) float32 on the CPU where row j depends only on (seed, indices[j]).

    Each sample has its own generator, numpy's PCG64 seeded by the entropy pool ``[seed, i]``.
    (torch's CPU generator keeps only 32 bits of its seed: among 50,000 hashed per-sample seeds
    a repeated one would be likely, and plain ``seed + i`` schemes overlap between seeds.)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    indices = indices.tolist() if isinstance(indices, Tensor) else list(indices)
    shape = tuple(int(size) for size in sample_shape)
    rows = [np.random.default_rng([seed, int(index)]).standard_normal(shape, dtype=np.float32) for index in indices]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, *shape))
