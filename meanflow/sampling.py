"""Samplers: pure functions of (model, noise, conditions, times) (spec section 6).

All of them integrate from noise at t = 1 down to data at t = 0. ``conditions`` is a
:class:`meanflow.conditions.Conditions` record, a (B,) label tensor or None.
"""

from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .conditions import ConditionsLike, as_conditions, average_velocity
from .conventions import as_time, broadcast_like
from .validation import check_number, parse_enum


class OdeMethod(str, enum.Enum):
    """Integrators for the flow-matching baseline (a velocity field, r = t)."""

    EULER = "euler"
    HEUN = "heun"


def time_grid(num_steps: int, intermediate: Optional[float] = None, device=None, dtype=torch.float32) -> Tensor:
    """A decreasing grid ``1 = t_0 > t_1 > ... > t_k = 0`` with ``k = num_steps`` intervals.

    Uniform by default. ``intermediate`` sets the middle time of a 2-step grid (0.5 is uniform).
    Returns (num_steps + 1,).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if intermediate is not None:
        if num_steps != 2:
            raise ValueError(f"an intermediate time applies to 2-step sampling only, got num_steps={num_steps}")
        if not 0.0 < intermediate < 1.0:
            raise ValueError(f"the intermediate time must lie in (0, 1), got {intermediate}")
        return torch.tensor([1.0, intermediate, 0.0], device=device, dtype=dtype)
    return torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=dtype)


def check_time_grid(times: Tensor) -> None:
    """Raise unless ``times`` is 1-D, strictly decreasing and within [0, 1]."""
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(f"a time grid needs at least two times in a 1-D tensor, got shape {tuple(times.shape)}")
    if bool((times[1:] >= times[:-1]).any()):
        raise ValueError(f"a time grid must be strictly decreasing (noise at 1 -> data at 0), got {times.tolist()}")
    if bool((times < 0).any()) or bool((times > 1).any()):
        raise ValueError(f"a time grid must lie in [0, 1], got {times.tolist()}")


def guided_prediction(
    model: nn.Module,
    z: Tensor,
    r: Tensor,
    t: Tensor,
    conditions: ConditionsLike,
    guidance_scale: float = 1.0,
    null_label: Optional[int] = None,
) -> Tensor:
    """``u`` of ``model(z, r, t, conditions)``, or with inference-time CFG when ``guidance_scale != 1``::

        u = u(. | null) + w (u(. | y) - u(. | null))

    This doubles the NFE; a model trained with guidance in its target needs none (scale 1).
    """
    check_number("guidance_scale", guidance_scale)
    if guidance_scale == 1.0:
        return average_velocity(model(z, r, t, conditions))
    record = as_conditions(conditions)
    labels = record.labels
    if labels is None or null_label is None:
        raise ValueError("inference-time guidance needs class labels and the null label id")
    both_conditions = record.with_labels(torch.full_like(labels, null_label)).cat(record)
    if isinstance(conditions, Tensor):  # the caller passes bare labels: so does the doubled call
        both_conditions = both_conditions.labels
    both = average_velocity(model(torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]), both_conditions))
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: Tensor,
    conditions: ConditionsLike = None,
    num_steps: int = 1,
    times: Optional[Sequence[float] | Tensor] = None,
    intermediate: Optional[float] = None,
    guidance_scale: float = 1.0,
    null_label: Optional[int] = None,
) -> Tensor:
    """Average-velocity sampling: ``z_r = z_t - (t - r) u(z_t, r, t)`` per interval (Eq. 3).

    Args:
        model: ``u(z, r, t, conditions)``.
        noise: (B, ...) ``e ~ N(0, I)``, the state at t = 1.
        conditions: (B,) class labels, a Conditions record, or None.
        num_steps: number of network evaluations (NFE) on a uniform grid, ignored if ``times``.
        times: an explicit decreasing grid from 1 to 0 (any spacing).
        intermediate: the middle time for 2-step sampling.
        guidance_scale, null_label: optional inference-time CFG (doubles the NFE).
    Returns:
        (B, ...) samples at t = 0. With one step: ``x = e - u(e, 0, 1)``.
    """
    grid = _grid(noise, num_steps, times, intermediate)
    z = noise
    for t_value, r_value in zip(grid[:-1], grid[1:]):
        t = as_time(t_value, z.shape[0], z)
        r = as_time(r_value, z.shape[0], z)
        u = guided_prediction(model, z, r, t, conditions, guidance_scale, null_label)
        z = z - broadcast_like(t - r, z) * u.to(z.dtype)  # Eq. 3
    return z


def sample_one_step(model: nn.Module, noise: Tensor, conditions: ConditionsLike = None) -> Tensor:
    """1-NFE generation ``x = e - u(e, 0, 1)``. noise: (B, ...) -> (B, ...)."""
    return sample(model, noise, conditions, num_steps=1)


@torch.no_grad()
def sample_ode(
    model: nn.Module,
    noise: Tensor,
    conditions: ConditionsLike = None,
    num_steps: int = 50,
    method: OdeMethod | str = OdeMethod.EULER,
    times: Optional[Sequence[float] | Tensor] = None,
    guidance_scale: float = 1.0,
    null_label: Optional[int] = None,
) -> Tensor:
    """Integrate the instantaneous velocity ``v(z, t) = u(z, t, t)`` from t = 1 to 0.

    The flow-matching baseline: Euler (1 NFE per step) or Heun (2 NFE per step, Euler on the
    last step where it would evaluate at t = 0 only to average). noise: (B, ...) -> (B, ...).
    """
    method = parse_enum(OdeMethod, method, "method")
    grid = _grid(noise, num_steps, times, None)
    z = noise

    def velocity(state: Tensor, time: Tensor) -> Tensor:
        return guided_prediction(model, state, time, time, conditions, guidance_scale, null_label).to(state.dtype)

    for t_value, r_value in zip(grid[:-1], grid[1:]):
        t = as_time(t_value, z.shape[0], z)
        r = as_time(r_value, z.shape[0], z)
        step = broadcast_like(t - r, z)
        v_t = velocity(z, t)
        z_euler = z - step * v_t
        if method is OdeMethod.HEUN and float(r_value) > 0.0:
            z = z - step * 0.5 * (v_t + velocity(z_euler, r))
        else:
            z = z_euler
    return z


def _grid(noise: Tensor, num_steps: int, times, intermediate) -> Tensor:
    if times is None:
        return time_grid(num_steps, intermediate, device=noise.device, dtype=torch.float64)
    grid = torch.as_tensor(times, dtype=torch.float64, device=noise.device)
    check_time_grid(grid)
    if float(grid[0]) != 1.0 or float(grid[-1]) != 0.0:
        raise ValueError(f"a sampling grid must start at 1 (noise) and end at 0 (data), got {grid.tolist()}")
    return grid
