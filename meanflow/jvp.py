"""The ways to compute the total derivative d/dt u(z_t, r, t) along the flow (Eq. 5).

    d/dt u = v . grad_z u + d_t u,

one Jacobian-vector product of the network with tangent (dz, dr, dt) = (v, 0, 1). ``r`` is held
fixed: its tangent is zero, and ``t - r`` (computed inside the network) moves with ``t``.

Three methods, chosen by :class:`Derivative`:

- ``JVP``: ``torch.func.jvp`` in one pass. Its primal output is the prediction the gradient flows
  through, so the prediction and the derivative share one forward (and one dropout mask). It
  cannot run through a ``DistributedDataParallel`` wrapper.
- ``TWO_PASS``: the derivative without gradient, and the gradient forward through whatever
  wrapper the caller holds (so DDP synchronises gradients). A model that declares an explicit
  tangent (``explicit_tangent``: called with ``tangent=Tangent(dz, dr, dt)`` for its leading M
  rows it returns ``ModelOutput(u, du=...)``; all four networks do) does both in ONE
  call (:func:`one_pass_tangent`; the objective puts the r != t rows first): every layer computes
  its ordinary output over the batch, recorded by autograd, and from its intermediate values the
  no-grad tangent of those rows, so the derivative costs a tangent, not a second primal. Under
  FSDP2 for the MLP and imfDiT (which read block weights directly; the DiT and U-Net do not) and
  under autocast (the tangent must not differentiate at a bf16 primal, spec section 8) the
  tangent runs apart: on the bare module in fp32, the explicit tangent where declared, else
  ``torch.func.jvp``.
  Dropout: apart, the derivative pass runs first and draws its own dropout masks, and the
  gradient forward fresh ones: the target is the tangent of an independently dropped network
  (unbiased over masks, noisier than one shared mask); ``JVP`` and the one pass share one
  mask; without dropout they are the same
  (tests/test_objective.py::test_two_pass_draws_its_own_dropout_masks_and_jvp_shares_one).
- ``FINITE_DIFFERENCE``: a central difference, the paper's ablation; approximate.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn

from .conditions import (ConditionsLike, ModelOutput, Tangent, as_output, average_velocity, select_rows,
                         supports_explicit_tangent)
from .conventions import broadcast_like
from .wrappers import unwrap


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


def one_pass_tangent(model: nn.Module) -> bool:
    """True if ``model`` (or the network under its DDP / compile wrapper) declares an explicit
    tangent, and, when FSDP2 shards it, passes that tangent through its blocks' own module calls
    (``shard_safe_tangent``: the DiT and the U-Net), so FSDP2's hooks gather the parameters for
    it: then one call gives u over the batch with gradient and the tangent of its leading rows
    without (:class:`~meanflow.conditions.Tangent`)."""
    bare = unwrap(model)
    return supports_explicit_tangent(model) and (not _is_sharded(bare) or getattr(bare, "shard_safe_tangent", False))


def one_pass_along_flow(
    model: nn.Module, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike, velocity: Tensor, moving: Tensor
) -> tuple[ModelOutput, Tensor]:
    """The gradient forward over the batch and du/dt of the ``moving`` rows, from ONE call of
    ``model`` (through its DDP / compile wrapper; :func:`one_pass_tangent` must hold).

    The rows are reordered so the moving ones lead, the call carries the tangent
    (velocity, 0, 1) of those rows (Eq. 5), and the outputs are put back in batch order.

    Args:
        z: (B, ...); r, t: (B,); conditions: labels (B,), a Conditions record or None.
        velocity: (M, ...) the tangent's direction on the moving rows; moving: (M,) their indices.
    Returns:
        The call's ModelOutput in batch order (``u``, and ``v`` where the network has one, with
        gradient) and du/dt (M, ...) of the moving rows, without gradient.
    """
    # No branch on the number of moving rows (zero included: the tangent then has no rows), so
    # torch.compile traces one graph whatever the batch draws.
    rest = torch.ones(z.shape[0], dtype=torch.int32, device=z.device)
    rest[moving] = 0  # the moving rows (ascending, as nonzero gives them) sort first
    # The moving rows first, each part in batch order. A stable sort keeps the batch's size a
    # constant under torch.compile (a concatenation of two index sets would make it a symbol).
    order = torch.argsort(rest, stable=True)
    rows = moving.numel()
    tangent = Tangent(velocity, velocity.new_zeros(rows), velocity.new_ones(rows))
    out = as_output(model(z[order], r[order], t[order], select_rows(conditions, order), tangent=tangent))
    back = order.argsort()
    return ModelOutput(u=out.u[back], v=None if out.v is None else out.v[back]), out.du


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
