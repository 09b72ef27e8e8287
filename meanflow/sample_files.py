"""The one sample file format, written by ``meanflow sample`` and ``meanflow eval --save-samples``.

An ``.npz`` in the layout of ADM's sample batches (what the reference FID tooling reads):

- ``arr_0``: images as uint8 (N, H, W, C), quantised by the project's one rounding rule
  (:func:`meanflow.pixels.to_uint8`); for data that are not images (2-D points), the float32
  samples (N, D) themselves;
- ``arr_1``: the class labels (N,) int64, when the model is class-conditional.

Written atomically (a temporary file, fsync'ed, renamed): a reader never sees half a file.
Read back with :func:`read_sample_file`, which never unpickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from torch import Tensor

from .io import atomic_writer


def image_rows(images: Tensor) -> np.ndarray:
    """uint8 images (N, C, H, W) -> the file's (N, H, W, C) layout."""
    return images.permute(0, 2, 3, 1).cpu().numpy()


def write_sample_file(path: Path, samples: np.ndarray, labels: Optional[np.ndarray] = None) -> Path:
    """Write ``arr_0`` (and ``arr_1``) to ``path`` atomically; ``samples`` may be a memory map."""
    arrays = {"arr_0": samples}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    with atomic_writer(path) as handle:
        np.savez(handle, **arrays)
    return Path(path)


def read_sample_file(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(arr_0, arr_1 or None) of a sample file; object arrays (pickles) are refused."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{path} is not a sample file: it holds {sorted(data.files)}, not arr_0")
            return data["arr_0"], (data["arr_1"] if "arr_1" in data.files else None)
    except ValueError as error:
        if "pickle" in str(error):
            raise ValueError(f"{path} holds object arrays (pickled data), which are never loaded") from None
        raise
