"""Per-step metrics summed on the device over a logging window, read once per window.

Reading a device scalar (``float(loss)``) waits for the device to finish all queued work; done
for every metric of every step it keeps a GPU idle between steps. The window adds each step's
metrics into one device tensor and converts to host floats only when the loop logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..distributed import Distributed


@dataclass(frozen=True)
class WindowMeans:
    """What one logging window measured: the mean of each metric over its steps (and ranks),
    how many steps it had, and its wall-clock seconds (taken after the device finished them)."""

    means: dict[str, float]
    steps: int
    seconds: float


class MetricWindow:
    """Sums of the metrics of the steps taken since the last :meth:`read`, on the device."""

    def __init__(self) -> None:
        self.keys: Optional[tuple[str, ...]] = None
        self.total: Optional[Tensor] = None  # (K,) float64, the sums in ``keys`` order
        self.count = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, Tensor]) -> None:
        """Fold in one step's metrics: 0-d tensors, the same names every step. No host read."""
        keys = tuple(sorted(metrics))
        if self.keys is None:
            self.keys = keys
        elif keys != self.keys:
            raise ValueError(f"the objective's metrics changed from {list(self.keys)} to {list(keys)} mid-run")
        values = torch.stack([metrics[key].detach().reshape(()).to(torch.float64) for key in keys])  # (K,)
        self.total = values if self.total is None else self.total + values
        self.count += 1

    def read(self, dist: Distributed) -> WindowMeans:
        """The window's mean of each metric, averaged over ranks (one all-reduce, one host read);
        then start a new window. Every rank must call it at the same step."""
        if self.total is None:
            return WindowMeans({}, 0, time.perf_counter() - self.started)
        means = dist.mean(self.total / self.count).tolist()  # the read: waits for the device
        reading = WindowMeans(dict(zip(self.keys, means)), self.count, time.perf_counter() - self.started)
        self.total, self.count, self.started = None, 0, time.perf_counter()
        return reading


__all__ = ["MetricWindow", "WindowMeans"]
