"""Curricula: a value that moves from ``start`` to ``end`` as training progresses.

``progress`` in [0, 1] is the share of training done (the trainer passes it to
``objective.loss``). One record, :class:`Ramp`, describes every curriculum the objectives use:
alpha-Flow's alpha (FAMILY.md F2, F-3), Modular MeanFlow's gradient share lambda and the
schedules of the share and gaps of r != t (F6). Inside its window ``[begin, finish]`` the value
follows one of four shapes of the window's fraction ``s = (progress - begin) / (finish - begin)``::

    constant   start (the whole time; end is not used)
    linear     start + (end - start) s
    cosine     start + (end - start) (1 - cos(pi s)) / 2
    sigmoid    start + (end - start) sigmoid(steepness (s - 1/2))

before ``begin`` it is ``start``, after ``finish`` it is ``end``. The sigmoid is alpha-Flow's
(snap-research/alphaflow, ``src/training/loss.py``, ``AlphaFlowLoss.get_ratio``): centred on
the window's middle, it reaches ``start`` and ``end`` only up to ``sigmoid(-steepness / 2)``
(3.7e-6 at the official steepness 25), so it steps by that much at the window's edges.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ..validation import check_fraction, check_number, check_positive, parse_enum


class RampShape(str, enum.Enum):
    """How a :class:`Ramp` moves inside its window (see the module docstring)."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"
    SIGMOID = "sigmoid"


@dataclass(frozen=True, kw_only=True)
class Ramp:
    """A value over training progress: ``start`` before ``begin``, ``end`` after ``finish``, and
    ``shape`` in between (module docstring). ``steepness`` is used by the sigmoid only.

    ``Ramp(...)(progress)`` is the value at ``progress`` in [0, 1]. The record checks its own
    fields; what range the values may take is the caller's to check (:meth:`check_values`).
    """

    shape: RampShape = RampShape.CONSTANT
    start: float = 0.0
    end: float = 0.0
    begin: float = 0.0
    finish: float = 1.0
    steepness: float = 25.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", parse_enum(RampShape, self.shape, "ramp shape"))
        check_number("ramp start value", self.start)
        check_number("ramp end value", self.end)
        check_fraction("ramp begin (the progress where it starts moving)", self.begin)
        check_number("ramp finish (the progress where it stops moving)", self.finish, self.begin, 1.0)
        check_positive("ramp steepness", self.steepness)

    def __call__(self, progress: float) -> float:
        """The value at ``progress`` in [0, 1]."""
        check_number("progress", progress, 0.0, 1.0)
        if self.shape is RampShape.CONSTANT:
            return self.start
        if progress < self.begin:
            return self.start
        if progress > self.finish or self.finish == self.begin:
            return self.end
        fraction = (progress - self.begin) / (self.finish - self.begin)  # s in [0, 1]
        return self.start + (self.end - self.start) * self._moved(fraction)

    def _moved(self, fraction: float) -> float:
        """The share of the way from start to end at window fraction ``fraction``."""
        if self.shape is RampShape.LINEAR:
            return fraction
        if self.shape is RampShape.COSINE:
            return 0.5 * (1.0 - math.cos(math.pi * fraction))
        return _logistic(self.steepness * (fraction - 0.5))

    @property
    def is_constant(self) -> bool:
        """True when the value is the same at every progress."""
        return self.shape is RampShape.CONSTANT or self.start == self.end

    @property
    def bounds(self) -> tuple[float, float]:
        """(lowest, highest) value the ramp takes (every shape stays between start and end)."""
        if self.shape is RampShape.CONSTANT:
            return self.start, self.start
        return min(self.start, self.end), max(self.start, self.end)

    def check_values(self, field: str, low: float, high: float, low_open: bool = False) -> None:
        """Refuse a ramp whose values leave [low, high] (``(low, high]`` with ``low_open``)."""
        for value in self.bounds:
            check_number(f"{field} (each end of its schedule)", value, low, high, low_open=low_open)


def _logistic(value: float) -> float:
    """1 / (1 + exp(-value)) without overflow for large |value|."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exponential = math.exp(value)
    return exponential / (1.0 + exponential)
