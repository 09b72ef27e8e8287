"""Stop-gradient targets built from the network's own predictions (FAMILY.md F3, F4).

Shortcut models (F-4) and SplitMeanFlow (F-5) need no derivative: their target for the average
velocity over [r, t] composes two of the network's own predictions over the parts of a split
[r, s] and [s, t]. Both objectives evaluate those predictions here, the same way:

- without gradient, on the bare module (a DDP wrapper must not see a forward that takes no part
  in the backward; the one gradient forward goes through whatever wrapper the caller holds);
- with autocast off and the inputs promoted to fp32 (or kept at fp64): the target is computed
  in fp32 whatever precision the gradient forward uses (spec section 8);
- on the selected rows only; the caller scatters the result back into the batch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..conditions import ConditionsLike, average_velocity
from ..conventions import at_least_fp32, autocast_off, broadcast_like
from ..wrappers import unwrap

# u(z, r, t) without gradient for a fixed set of rows: (M, ...), (M,), (M,) -> (M, ...).
VelocityOfRows = Callable[[Tensor, Tensor, Tensor], Tensor]



def predict_without_grad(model: nn.Module, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike) -> Tensor:
    """``u(z, r, t | conditions)`` of the bare module, no gradient, autocast off, fp32 or wider.

    z: (M, ...); r, t: (M,); conditions: labels (M,), a Conditions record or None. -> (M, ...)
    """
    with torch.no_grad(), autocast_off(z):
        z, r, t = at_least_fp32(z), at_least_fp32(r), at_least_fp32(t)
        return at_least_fp32(average_velocity(unwrap(model)(z, r, t, conditions)))


def split_average_velocity(velocity: VelocityOfRows, z_t: Tensor, r: Tensor, s: Tensor, t: Tensor,
                           clip: Optional[float] = None) -> Tensor:
    """The average velocity over [r, t] composed from its two parts at r <= s <= t (F-4, F-5)::

        z_s = z_t - (t - s) u(z_t, s, t)
        u   = [(s - r) u(z_s, r, s) + (t - s) u(z_t, s, t)] / (t - r)

    ``velocity`` evaluates u on these rows without gradient (it may mix in guidance); the later
    part is evaluated first because its step gives z_s. ``clip`` bounds z_s to [-clip, clip]
    (Shortcut's official code does). z_t: (M, ...); r, s, t: (M,) with r < t. -> (M, ...)
    For the exact flow map the result is u(z_t, r, t) itself, whatever s (the semigroup property).
    """
    u_late = velocity(z_t, s, t)  # (M, ...) u(z_t, s, t)
    z_s = z_t - broadcast_like(t - s, z_t).to(u_late.dtype) * u_late  # (M, ...) one step from t to s
    if clip is not None:
        z_s = z_s.clamp(-clip, clip)
    u_early = velocity(z_s, r, s)  # (M, ...) u(z_s, r, s)
    early, late, whole = (broadcast_like(gap, z_t).to(u_late.dtype) for gap in (s - r, t - s, t - r))
    return (early * u_early + late * u_late) / whole
