"""The conventions every part of the project shares.

Time runs from data to noise: ``t = 0`` is data ``x``, ``t = 1`` is noise ``e ~ N(0, I)``, and the
path is linear (Eq. 1)::

    z_t = (1 - t) x + t e,        v = dz_t / dt = e - x.

A model predicts the *average velocity* over ``[r, t]`` with ``r <= t`` (Eq. 2)::

    u(z_t, r, t) = (z_t - z_r) / (t - r),

so one step from ``t`` down to ``r`` is ``z_r = z_t - (t - r) u(z_t, r, t)`` (Eq. 3).

Every model in this project is called as ``model(z, r, t, conditions)``:

- ``z``: (B, ...) the noisy state ``z_t``;
- ``r``, ``t``: (B,) the two times, in [0, 1];
- ``conditions``: a :class:`meanflow.conditions.Conditions` record (class labels, and room for a
  guidance scale, an interval, text), a bare (B,) int64 label tensor as shorthand, or ``None``
  for an unconditional model. The null class (the label a class-conditional model receives when
  the class is dropped for guidance) is ``num_classes``; see :func:`null_class_id`.

and returns the average velocity with ``z``'s shape, or a
:class:`meanflow.conditions.ModelOutput` naming it ``u`` beside optional further outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Union

import torch
from torch import Tensor

from .conditions import ConditionsLike, ModelOutput


class AverageVelocityModel(Protocol):
    """The call signature of every model: ``u = model(z, r, t, conditions)``, ``u.shape == z.shape``."""

    def __call__(self, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike = None) -> Union[Tensor, ModelOutput]: ...


@dataclass(frozen=True)
class Batch:
    """One training batch: data ``x`` (B, ...) in the model's space and its labels (B,) int64 or None."""

    x: Tensor
    labels: Optional[Tensor] = None


def as_batch(batch: Union[Batch, Tensor], labels: Optional[Tensor] = None) -> Batch:
    """A :class:`Batch` from a record, or from data ``x`` and optional labels."""
    if isinstance(batch, Batch):
        if labels is not None:
            raise ValueError("labels were given twice: in the Batch and as an argument")
        return batch
    if isinstance(batch, Tensor):
        return Batch(batch, labels)
    raise TypeError(f"a batch must be a Batch record or a data tensor; got {type(batch).__name__}")


def null_class_id(num_classes: int) -> int:
    """The label id of the null (unconditional) class: one past the last real class."""
    return num_classes


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``z_t = (1 - t) x + t e`` (Eq. 1). ``x``, ``noise``: (B, ...); ``t``: (B,)."""
    t = broadcast_like(t, x)
    return (1 - t) * x + t * noise


def broadcast_like(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample values (B,) to (B, 1, ..., 1) so they broadcast against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def check_times(r: Tensor, t: Tensor, batch_size: int) -> None:
    """Raise a ValueError unless ``r`` and ``t`` are (B,) with ``0 <= r <= t <= 1``."""
    for name, value in (("r", r), ("t", t)):
        if value.shape != (batch_size,):
            raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(value.shape)}")
    if not bool(torch.isfinite(r).all() and torch.isfinite(t).all()):
        raise ValueError("times must be finite numbers in [0, 1]; got NaN or infinity")
    if bool((r > t).any()):
        raise ValueError("times must satisfy r <= t for every sample (time runs from data at 0 to noise at 1)")
    if bool((r < 0).any()) or bool((t > 1).any()):
        raise ValueError("times must lie in [0, 1]")


def as_time(value: float | Tensor, batch_size: int, like: Tensor) -> Tensor:
    """A scalar or (B,) time as a (B,) tensor with ``like``'s dtype and device."""
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device).expand(batch_size).contiguous() if value.dim() == 0 \
            else value.to(dtype=like.dtype, device=like.device)
    return torch.full((batch_size,), float(value), dtype=like.dtype, device=like.device)


def at_least_fp32(tensor: Tensor) -> Tensor:
    """Promote half-precision tensors to fp32; fp32 and fp64 pass through unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def autocast_off(like: Tensor):
    """A context with autocast off on ``like``'s device: targets, derivatives and the guidance
    forwards inside it stay in their inputs' precision (fp32 or wider, spec section 8)."""
    return torch.autocast(device_type=like.device.type, enabled=False)
