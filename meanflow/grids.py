"""Pictures of samples: image grids and 2-D scatter plots, written as PNG files.

:func:`image_grid_array` is the pure part (tensor in, uint8 array out) that tests pin pixel by
pixel; :func:`save_image_grid` and :func:`save_scatter` write files. Pillow and matplotlib are
optional dependencies, imported only by the functions that need them. Files go through
:func:`meanflow.io.write_bytes_atomic` (a temporary file in the target folder, renamed over the
target), so a reader, or a run killed mid-write, never sees a half-written PNG.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .io import write_bytes_atomic
from .pixels import to_uint8
from .validation import PathLike


def image_grid_array(
    images: Tensor,
    nrow: Optional[int] = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 2,
    pad_value: int = 255,
) -> np.ndarray:
    """Tile a batch of images into one uint8 picture.

    Each value ``v`` becomes ``floor(255 (v - lo) / (hi - lo) + 0.5)`` clamped to [0, 255], with
    ``(lo, hi) = value_range``: ``lo -> 0``, ``hi -> 255``, the midpoint -> 128. NaN becomes 0.
    Images fill the grid row by row, ``nrow`` to a row; every image is surrounded by ``padding``
    pixels of ``pad_value``, and so are unused cells of the last row.

    Args:
        images: (N, C, H, W) with C in {1, 3}; any real dtype.
        nrow: images per row (the number of columns, as in torchvision); by default
            ``ceil(sqrt(N))``.
        value_range: (lo, hi), the values mapped to black and white; lo < hi.
        padding: pixels between and around images, >= 0.
        pad_value: grey level 0..255 of the padding.

    Returns:
        (rows * (H + padding) + padding, nrow * (W + padding) + padding, C) uint8 array, where
        ``rows = ceil(N / nrow)``.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")
    count, channels, height, width = images.shape
    if count == 0 or height == 0 or width == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
    if nrow is None:
        nrow = math.ceil(math.sqrt(count))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must lie in 0..255, got {pad_value}")
    low, high = float(value_range[0]), float(value_range[1])
    if not low < high:
        raise ValueError(f"value_range must be (lo, hi) with lo < hi, got {value_range}")

    levels = to_uint8(images.detach().cpu(), low, high)  # the project's one rounding rule
    tiles = levels.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)

    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        pad_value,
        dtype=np.uint8,
    )
    for index in range(count):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = tiles[index]
    return grid


def save_image_grid(
    images: Tensor,
    path: PathLike,
    nrow: Optional[int] = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 2,
) -> Path:
    """Write ``image_grid_array(images, nrow, value_range, padding)`` as a PNG file.

    Grey-scale images (C = 1) give an 8-bit grey PNG, colour images (C = 3) an RGB one. The
    parent folders are created; the file is always PNG whatever the suffix of ``path``.

    Args:
        images: (N, C, H, W) with C in {1, 3}.
        path: the file to write (replaced atomically if it exists).
        nrow, value_range, padding: as in :func:`image_grid_array`.

    Returns:
        The path written.
    """
    grid = image_grid_array(images, nrow=nrow, value_range=value_range, padding=padding)
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "save_image_grid needs Pillow; install it with `pip install pillow` or `pip install meanflow[all]`"
        ) from error
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    return _write_png(path, lambda handle: picture.save(handle, format="PNG"))


def save_scatter(
    points: Tensor,
    path: PathLike,
    reference: Optional[Tensor] = None,
    title: Optional[str] = None,
    limits: Optional[tuple[float, float]] = None,
) -> Path:
    """Write a scatter plot of 2-D points as a PNG file, optionally over reference samples.

    The figure is drawn with matplotlib's Agg renderer on a standalone ``Figure`` (pyplot is not
    used, so the caller's backend and open figures are untouched). Reference samples, if given,
    are drawn first in light grey so the generated points sit on top of them. Axes have equal
    aspect.

    Args:
        points: (N, 2) the samples to show.
        path: the file to write (replaced atomically if it exists); parent folders are created.
        reference: (M, 2) samples of the target distribution, or None.
        title: the figure title, or None.
        limits: (lo, hi) used for both axes, or None to fit the data.

    Returns:
        The path written.
    """
    points_array = _points_array("points", points)
    reference_array = None if reference is None else _points_array("reference", reference)
    if limits is not None and not float(limits[0]) < float(limits[1]):
        raise ValueError(f"limits must be (lo, hi) with lo < hi, got {limits}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "save_scatter needs matplotlib; install it with `pip install matplotlib` or `pip install meanflow[all]`"
        ) from error

    figure = Figure(figsize=(5.12, 5.12), dpi=100)  # 512 x 512 pixels, as large as the smallest image grid
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    # Small markers: a few thousand points should read as a density, not as blobs.
    if reference_array is not None:
        axes.scatter(reference_array[:, 0], reference_array[:, 1], s=1.0, c="0.8", linewidths=0, label="reference")
    axes.scatter(points_array[:, 0], points_array[:, 1], s=1.0, c="tab:blue", linewidths=0, label="samples")
    axes.set_aspect("equal")
    if limits is not None:
        axes.set_xlim(limits[0], limits[1])
        axes.set_ylim(limits[0], limits[1])
    if title is not None:
        axes.set_title(title)
    figure.tight_layout()
    return _write_png(path, lambda handle: figure.savefig(handle, format="png"))


def _points_array(name: str, points: Tensor) -> np.ndarray:
    if not isinstance(points, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {tuple(points.shape)}")
    return points.detach().to(device="cpu", dtype=torch.float64).numpy()


def _write_png(path: PathLike, render: Callable[[BinaryIO], None]) -> Path:
    """Render a PNG into memory, then hand it to the project's atomic file writer."""
    buffer = io.BytesIO()
    render(buffer)
    return write_bytes_atomic(Path(path), buffer.getvalue())
