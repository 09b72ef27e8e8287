"""What every network of the project shares: the conditions it declares and how it reads them."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

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
    config: object

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
