"""What conditions a network beyond ``(z, r, t)``, and what a network returns.

A network is called as ``model(z, r, t, conditions)`` (see :mod:`meanflow.conventions`), where
``conditions`` is one :class:`Conditions` record: class labels today, with room for a guidance
scale and a guidance interval (Improved MeanFlow conditions its network on both) and later text
embeddings, so a method that adds a condition changes no signature. A bare ``(B,)`` label tensor
is accepted wherever a record is, as shorthand for ``Conditions(labels=...)``.

Every network declares the conditions it accepts (``accepted_conditions``); a record carrying
another one is refused (:func:`check_accepted`), and an objective checks at construction that
the network accepts what it will pass.

A network returns the average velocity ``u`` as a tensor, or a :class:`ModelOutput` with named
fields when it has more to say (an auxiliary instantaneous-velocity head, or the tangent of
``u`` when one was asked for); :func:`as_output` reads either the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Union

import torch
from torch import Tensor

from .wrappers import unwrap

LABELS = "labels"
GUIDANCE_SCALE = "guidance_scale"
GUIDANCE_INTERVAL = "guidance_interval"


@dataclass(frozen=True)
class Conditions:
    """Per-sample conditions of a network call; every field is optional.

    labels: (B,) int64 class labels; ``num_classes`` is the null (unconditional) class.
    guidance_scale: (B,) a guidance scale the network is conditioned on (iMF).
    guidance_interval: (B, 2) the ``[t_min, t_max]`` interval where guidance applies (iMF).
    """

    labels: Optional[Tensor] = None
    guidance_scale: Optional[Tensor] = None
    guidance_interval: Optional[Tensor] = None

    def present(self) -> frozenset[str]:
        """The names of the fields that are set."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def rows(self, index: Tensor) -> "Conditions":
        """The conditions of the selected rows (``index``: (M,) int64 or a (B,) bool mask)."""
        return Conditions(**{name: value[index] for name, value in self._items()})

    def cat(self, other: "Conditions") -> "Conditions":
        """This batch followed by ``other`` (the same fields must be set in both)."""
        if self.present() != other.present():
            raise ValueError(f"cannot join conditions with fields {sorted(self.present())} and "
                             f"{sorted(other.present())}")
        return Conditions(**{name: torch.cat([value, getattr(other, name)]) for name, value in self._items()})

    def with_labels(self, labels: Optional[Tensor]) -> "Conditions":
        """The same conditions with other labels (e.g. the null class for a CFG branch)."""
        return replace(self, labels=labels)

    def to(self, device: torch.device | str) -> "Conditions":
        return Conditions(**{name: value.to(device) for name, value in self._items()})

    def _items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]


ConditionsLike = Union[Conditions, Tensor, None]


def as_conditions(value: ConditionsLike) -> Conditions:
    """A :class:`Conditions` record from a record, a (B,) label tensor or None."""
    if value is None:
        return Conditions()
    if isinstance(value, Conditions):
        return value
    if isinstance(value, Tensor):
        return Conditions(labels=value)
    raise TypeError(f"conditions must be a Conditions record, a label tensor or None; got {type(value).__name__}")


def select_rows(conditions: ConditionsLike, index: Tensor) -> ConditionsLike:
    """The conditions of the rows ``index``: labels indexed, a record row by row, None kept."""
    if conditions is None:
        return None
    if isinstance(conditions, Conditions):
        return conditions.rows(index)
    return conditions[index]


def check_accepted(conditions: Conditions, accepted: frozenset[str], model_name: str) -> None:
    """Refuse conditions the network does not take, naming the ones it does."""
    extra = conditions.present() - accepted
    if extra == {LABELS}:
        raise ValueError(f"this {model_name} is unconditional (num_classes=None) but labels were given")
    if extra:
        raise ValueError(f"{model_name} does not accept the conditions {sorted(extra)}; it accepts "
                         f"{sorted(accepted) or 'none'}")


def accepted_conditions(model) -> frozenset[str]:
    """What a network (or the module under its DDP / compile wrappers) declares it accepts."""
    return frozenset(getattr(unwrap(model), "accepted_conditions", frozenset()))


@dataclass
class ModelOutput:
    """Named outputs of a network call.

    u: (B, ...) the average velocity over [r, t] (Eq. 2), z's shape.
    v: (B, ...) an auxiliary head's instantaneous velocity at t, or None.
    du: (B, ...) the derivative of ``u`` along the tangent passed to the call, or None.
    """

    u: Tensor
    v: Optional[Tensor] = None
    du: Optional[Tensor] = None


def as_output(value: Union[Tensor, ModelOutput]) -> ModelOutput:
    """A :class:`ModelOutput` from what a network returned (a plain tensor is ``u``)."""
    return value if isinstance(value, ModelOutput) else ModelOutput(u=value)


def average_velocity(value: Union[Tensor, ModelOutput]) -> Tensor:
    """The average velocity ``u`` from what a network returned."""
    return value.u if isinstance(value, ModelOutput) else value


@dataclass(frozen=True)
class Tangent:
    """A direction in the network's inputs for the leading rows of a batch: ``(dz, dr, dt)``,
    (M, ...), (M,), (M,) with M <= B, the batch size of the call.

    ``(v, 0, 1)`` gives the total derivative d/dt u along the flow (Eq. 5). A network with an
    explicit tangent returns ``du`` for the first M rows (M = B: the whole batch), computed in the
    same pass as ``u`` and without gradient.
    """

    dz: Tensor
    dr: Tensor
    dt: Tensor


def check_tangent_rows(z: Tensor, dz: Optional[Tensor], dr: Optional[Tensor], dt: Optional[Tensor]) -> None:
    """Refuse a tangent that is not (M, *z.shape[1:]), (M,), (M,) with M <= B, or only partly given."""
    given = [part is not None for part in (dz, dr, dt)]
    if not any(given) or torch.compiler.is_compiling():  # under compile the sizes are symbols
        return
    if not all(given):
        raise ValueError("a tangent needs all of dz, dr and dt (or none of them)")
    rows = dz.shape[0]
    if tuple(dz.shape[1:]) != tuple(z.shape[1:]) or rows > z.shape[0]:
        raise ValueError(f"dz must have shape (M, {', '.join(map(str, z.shape[1:]))}) with M <= {z.shape[0]} "
                         f"(the tangent of the leading rows), got {tuple(dz.shape)}")
    if tuple(dr.shape) != (rows,) or tuple(dt.shape) != (rows,):
        raise ValueError(f"dr and dt must have shape ({rows},) like dz's rows, got {tuple(dr.shape)} and "
                         f"{tuple(dt.shape)}")


def supports_explicit_tangent(model) -> bool:
    """True if the network declares an explicit tangent: called with ``tangent=Tangent(...)`` it
    returns a :class:`ModelOutput` whose ``du`` is the exact directional derivative of ``u``,
    computed together with the primal (no ``torch.func`` involved). The call goes through the
    module's ``__call__``, so DDP / FSDP2 / compile wrappers see it."""
    return bool(getattr(unwrap(model), "explicit_tangent", False))
