"""``--save-samples``: one process's samples of one setting, streamed to disk batch by batch and
finished as the one sample file format (:mod:`meanflow.sample_files`, what ``meanflow sample``
writes), plus a grid of the first ones.

Rows go to a ``.npy`` memory map as they are generated (an evaluation of 50,000 samples never
holds them all); :meth:`StreamedSampleFile.finish` hands the map to
:func:`meanflow.sample_files.write_sample_file`, which writes the ``.npz`` atomically, and
removes the ``.npy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..encoders import PixelEncoder
from ..sample_files import write_sample_file

GRID_COUNT = 100  # samples drawn in each setting's grid


class StreamedSampleFile:
    """``count`` rows (n, *row_shape) of any dtype, written in order by :meth:`write`."""

    def __init__(self, target: Path, count: int):
        self.target, self.count, self.written = Path(target), count, 0
        self.partial = self.target.with_suffix(".npy")
        self.rows: Optional[np.memmap] = None
        self.head: list[np.ndarray] = []  # the first GRID_COUNT rows, for the grid

    def write(self, rows: np.ndarray) -> None:
        """Append rows; the first call opens the map, as it tells the row shape and dtype."""
        if self.rows is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.rows = np.lib.format.open_memmap(self.partial, mode="w+", dtype=rows.dtype,
                                                  shape=(self.count, *rows.shape[1:]))
        self.rows[self.written:self.written + len(rows)] = rows
        if self.written < GRID_COUNT:
            self.head.append(np.array(rows[:GRID_COUNT - self.written]))
        self.written += len(rows)

    def finish(self, labels: Optional[torch.Tensor]) -> Optional[Path]:
        """Write the sample file (``arr_1``: ``labels`` (n,) when conditional); None when this
        process had no samples."""
        if self.rows is None:
            return None
        if self.written != self.count:
            raise RuntimeError(f"{self.partial}: {self.written} of {self.count} rows written")
        self.rows.flush()
        write_sample_file(self.target, self.rows, None if labels is None else labels.cpu().numpy())
        self.rows = None  # closes the map before the file goes
        self.partial.unlink()
        return self.target

    def first_rows(self) -> np.ndarray:
        """The first (up to) GRID_COUNT rows written."""
        return np.concatenate(self.head)


def sample_file_for(folder: Path, name: str, count: int, rank: int, world_size: int) -> StreamedSampleFile:
    """``<folder>/samples_<name>[_rank<r>of<w>].npz``: one file per process under torchrun."""
    suffix = f"_rank{rank}of{world_size}" if world_size > 1 else ""
    return StreamedSampleFile(Path(folder) / f"samples_{name}{suffix}.npz", count)


def write_image_grid(rows: np.ndarray, path: Path, num_classes: Optional[int]) -> Path:
    """A grid of uint8 image rows (n, H, W, C), a row per class when the count allows, drawn as
    ``meanflow sample`` draws its grids (the pixel encoder of the decoded images)."""
    from ..data.transforms import to_model_range

    images = to_model_range(torch.from_numpy(rows).permute(0, 3, 1, 2))  # (n, C, H, W) in [-1, 1], exact
    return PixelEncoder(tuple(images.shape[1:])).write_grid(images, path, nrow=_grid_rows(len(images), num_classes))


def _grid_rows(count: int, num_classes: Optional[int]) -> Optional[int]:
    return num_classes if num_classes and count % num_classes == 0 else None


__all__ = ["GRID_COUNT", "StreamedSampleFile", "sample_file_for", "write_image_grid"]
