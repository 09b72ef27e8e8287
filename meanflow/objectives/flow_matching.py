"""Flow matching: the r = t special case of MeanFlow, and the multi-step baseline."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import average_velocity
from ..conventions import interpolate
from ..samplers import Sampler, VelocityOdeSampler
from ..validation import check_fraction
from .base import NoiseTimeObjective, check_num_classes, default_of
from .loss import AdaptiveWeighting
from .time_sampling import TimeSampler


@dataclass(frozen=True, kw_only=True)
class FlowMatchingSettings:
    """The knobs of :class:`FlowMatching` (``objective.flow_matching.*``).

    ``t`` is one draw of ``distribution`` (``mu``, ``sigma``); ``p``, ``c`` the adaptive weight
    (default p = 0: the plain squared error); ``class_dropout`` the share of null labels, so
    inference-time CFG is possible.
    """

    distribution: str = default_of(TimeSampler, "distribution").value
    mu: float = default_of(TimeSampler, "mu")
    sigma: float = default_of(TimeSampler, "sigma")
    p: float = 0.0
    c: float = default_of(AdaptiveWeighting, "c")
    class_dropout: float = 0.1

    def __post_init__(self) -> None:
        self.time_sampler(), self.weighting()  # each record validates its fields
        check_fraction("class_dropout", self.class_dropout)

    def time_sampler(self) -> TimeSampler:
        return TimeSampler(distribution=self.distribution, mu=self.mu, sigma=self.sigma)

    def weighting(self) -> AdaptiveWeighting:
        return AdaptiveWeighting(p=self.p, c=self.c)

    def to_dict(self) -> dict:
        return asdict(self)


class FlowMatching(NoiseTimeObjective):
    """Regress the network at r = t onto the conditional velocity ``v = e - x``.

    Args:
        time_sampler: t is ONE draw of its distribution (mu, sigma); r = t.
        weighting: per-sample weighting; the default p = 0 is the plain squared error.
        num_classes: None for unconditional data, else the number of classes.
        class_dropout: probability of the null label, so inference-time CFG is possible.

    Its network is an instantaneous velocity: it is sampled by integrating an ODE (Euler).
    """

    name = "flow_matching"
    whole_step_compile = True
    Settings = FlowMatchingSettings

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        *,
        weighting: AdaptiveWeighting | None = None,
        num_classes: Optional[int] = None,
        class_dropout: float = 0.1,
    ):
        self.time_sampler = time_sampler or TimeSampler()
        self.weighting = weighting or AdaptiveWeighting(p=0.0)
        check_num_classes(num_classes)
        check_fraction("class_dropout", class_dropout)
        self.num_classes = num_classes
        self.class_dropout = class_dropout if num_classes is not None else 0.0

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "FlowMatching":
        settings = cls.parse_settings(settings)
        return cls(settings.time_sampler(), weighting=settings.weighting(), num_classes=num_classes,
                   class_dropout=settings.class_dropout)

    @property
    def sampler(self) -> Sampler:
        """The network is a velocity field u(z, t, t): an Euler ODE (``--ode heun`` at sampling for Heun)."""
        return VelocityOdeSampler("euler")

    def sample_times(self, batch_size: int, like: Tensor, generator: torch.Generator | None,
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        sampler = self.time_sampler
        t = sampler.draw(batch_size, sampler.mu, sampler.sigma, like.device, like.dtype, generator)
        return t, t

    def check_inputs(self, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor]):
        labels = super().check_inputs(x, noise, r, t, labels)
        if not torch.equal(r, t):
            raise ValueError("flow matching trains at r = t; got r != t")
        return labels

    def compute(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, t, t), v)``; ``r`` equals ``t``."""
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        return average_velocity(model(z, t, t, labels)), (noise - x).detach()
