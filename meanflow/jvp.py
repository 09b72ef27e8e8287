"""The ways to compute the total derivative d/dt u(z_t, r, t) along the flow (Eq. 5).

    d/dt u = v . grad_z u + d_t u,

one Jacobian-vector product of the network with tangent (dz, dr, dt) = (v, 0, 1). ``r`` is held
fixed: its tangent is zero, and ``t - r`` (computed inside the network) moves with ``t``.

Three methods, chosen by :class:`Derivative`:

- ``JVP``: ``torch.func.jvp`` in one pass. Its primal output is the prediction the gradient flows
  through, so the prediction and the derivative share one forward (and one dropout mask). It
  cannot run through a ``DistributedDataParallel`` wrapper.
- ``TWO_PASS``: the JVP on the bare module without gradient, then an ordinary gradient forward
  through whatever wrapper the caller holds. Safe under data parallelism: the gradient forward
  goes through DDP, so gradients are synchronised. A model that declares an explicit tangent
  (``explicit_tangent``: called with ``tangent=Tangent(dz, dr, dt)`` it returns
  ``ModelOutput(u, du=...)``; the DiT, the imfDiT and the MLP do, primal and tangent through one
  GEMM per linear) is differentiated by that call, 1.7-2.7x faster than ``torch.func.jvp``
  (benchmarks/jvp_speed.py); other models (the U-Net) fall back
  to ``torch.func.jvp``. The call goes through the module's ``__call__``, the same entry that
  DDP / FSDP2 / torch.compile wrap.
  Dropout: the derivative pass runs first, in the module's own mode, so in training it draws
  dropout masks of its own and the gradient forward then draws fresh ones: the target is the
  tangent of an independently dropped network (unbiased over masks, noisier than one shared
  mask). A shared mask would need the two passes to see the same rows, which the subset JVP
  avoids. ``JVP`` shares one mask; without dropout the two are the same
  (tests/test_objective.py::test_two_pass_draws_its_own_dropout_masks_and_jvp_shares_one).
- ``FINITE_DIFFERENCE``: a central difference, the paper's ablation; approximate.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn

from .conditions import ConditionsLike, Tangent, average_velocity, supports_explicit_tangent
from .conventions import broadcast_like


class Derivative(str, enum.Enum):
    """How the objective computes d/dt u (see the module docstring)."""

    JVP = "jvp"
    TWO_PASS = "two_pass"
    FINITE_DIFFERENCE = "finite_difference"


def jvp_along_flow(
    model: nn.Module, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike, velocity: Tensor
) -> tuple[Tensor, Tensor]:
    """``(u, du/dt)`` from one ``torch.func.jvp`` with tangent (velocity, 0, 1) (Eq. 5).

    z, velocity: (B, ...); r, t: (B,); conditions: labels (B,), a Conditions record or None.
    Returns two tensors of z's shape. Gradients flow from ``u`` to the model's parameters unless
    the caller disables them.
    """

    def u_of(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return average_velocity(model(z_, r_, t_, conditions))

    return torch.func.jvp(u_of, (z, r, t), (velocity, torch.zeros_like(r), torch.ones_like(t)))


def tangent_along_flow(
    model: nn.Module, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike, velocity: Tensor
) -> Tensor:
    """du/dt along (velocity, 0, 1) without gradient: the model's explicit tangent when it
    declares one, else ``torch.func.jvp``. Returns z's shape."""
    with torch.no_grad():
        # FSDP2 gathers each sharded block's parameters in hooks around that block's __call__;
        # the explicit tangent reaches the blocks through their own methods, so sharded models
        # go through torch.func.jvp, which calls every module.
        if supports_explicit_tangent(model) and not _is_sharded(model):
            tangent = Tangent(velocity, torch.zeros_like(r), torch.ones_like(t))
            return model(z, r, t, conditions, tangent=tangent).du
        return jvp_along_flow(model, z, r, t, conditions, velocity)[1]


def _is_sharded(model: nn.Module) -> bool:
    """True if FSDP2 manages the module (``fully_shard`` swaps in an FSDPModule subclass)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def finite_difference_along_flow(
    model: nn.Module,
    z: Tensor,
    r: Tensor,
    t: Tensor,
    conditions: ConditionsLike,
    velocity: Tensor,
    step: float,
) -> Tensor:
    """Central difference ``[u(z + h v, r, t + h) - u(z - h v, r, t - h)] / 2h`` (Eq. 5), no gradient.

    ``t +- h`` may leave [0, 1] by ``h``; the network is evaluated there as a smooth function.
    """
    with torch.no_grad():
        shift = step * velocity
        forward = average_velocity(model(z + shift, r, t + step, conditions))
        backward = average_velocity(model(z - shift, r, t - step, conditions))
        return (forward - backward) / (2.0 * step)


def target_from_derivative(v_hat: Tensor, r: Tensor, t: Tensor, dudt: Tensor) -> Tensor:
    """``u_tgt = v_hat - (t - r) du/dt`` (Eq. 6), without the stop-gradient (callers detach)."""
    return v_hat - broadcast_like(t - r, v_hat) * dudt
