"""What every network of the project shares: the conditions it declares and how it reads them."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..conditions import LABELS, ConditionsLike, as_conditions, check_accepted


class AverageVelocityNetwork(nn.Module):
    """Base of the networks ``u(z, r, t, conditions)``.

    A subclass holds its config as ``self.config`` (with a ``num_classes`` field); a
    class-conditional network accepts the ``labels`` condition, an unconditional one accepts none.
    ``explicit_tangent`` is True for networks whose ``forward`` takes ``tangent=`` and returns
    the exact derivative of ``u`` with it (see :func:`meanflow.conditions.supports_explicit_tangent`).
    """

    explicit_tangent: ClassVar[bool] = False
    tangent_compiles: ClassVar[bool] = True
    """False for networks whose one-pass tangent inductor cannot compile over a symbolic number of
    rows (the U-Net's convolutions); ``training.compile`` then compiles the module alone."""
    checkpointable: ClassVar[bool] = False
    """True for networks whose blocks run through :meth:`run_block` (activation checkpointing)."""
    activation_checkpointing: bool = False
    """Set by the trainer (``training.activation_checkpointing``): recompute each block in backward."""
    config: object

    def run_block(self, block: Callable, inputs: tuple, tangent: tuple) -> Any:
        """``block(*inputs, *tangent)``, under activation checkpointing when it is on and autograd
        records: the block keeps only its inputs and is recomputed in backward, and the recompute
        runs the primal alone (``tangent`` None), since the tangent is a no-grad constant already
        computed. The tangent's ops save nothing for backward, so the recompute saves exactly what
        the first run did (the check of non-reentrant checkpointing), and the preserved RNG state
        replays the same dropout masks.

        Args:
            block: a module (or a partial of one, or of its ``forward_with_tangent``) taking
                ``(*inputs, *tangent)``.
            inputs: the primal inputs (tensors recorded by autograd).
            tangent: the tangent inputs (None entries without a tangent).
        """
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return block(*inputs, *tangent)
        first = [True]

        def run(*primal):
            if first[0]:
                first[0] = False
                return block(*primal, *tangent)
            return block(*primal, *([None] * len(tangent)))  # the backward's recompute

        return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)

    @property
    def accepted_conditions(self) -> frozenset[str]:
        return frozenset({LABELS}) if getattr(self.config, "num_classes", None) else frozenset()

    def read_labels(self, conditions: ConditionsLike) -> Optional[Tensor]:
        """The labels of a call's conditions, after refusing any condition this network lacks."""
        conditions = as_conditions(conditions)
        check_accepted(conditions, self.accepted_conditions, type(self).__name__)
        return conditions.labels


class ConfigRecord:
    """``to_dict`` / ``from_dict`` of the networks' frozen config dataclasses: plain JSON data
    (tuples as lists), unknown keys refused with the valid ones named."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able data; :meth:`from_dict` inverts it."""
        return {field.name: list(value) if isinstance(value := getattr(self, field.name), tuple) else value
                for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build a config from :meth:`to_dict` output (or any subset of the fields)."""
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields are {valid}")
        return cls(**data)


def enable_activation_checkpointing(model: nn.Module, architecture: str) -> None:
    """Turn on ``training.activation_checkpointing`` for ``model``, or say which networks have it."""
    if not getattr(model, "checkpointable", False):
        raise ValueError(f"training.activation_checkpointing needs a network whose blocks can be recomputed (dit, "
                         f"imf_dit, unet); model.architecture is {architecture!r}: set it to false")
    model.activation_checkpointing = True
