"""What every network of the project shares: the conditions it declares and how it reads them."""

from __future__ import annotations

from typing import ClassVar, Optional

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
