"""Flow matching: the r = t special case of MeanFlow, and the multi-step baseline."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..conventions import interpolate
from .base import Objective
from .loss import AdaptiveWeighting
from .time_sampling import TimeSampler


class FlowMatching(Objective):
    """Regress the network at r = t onto the conditional velocity ``v = e - x``.

    Args:
        time_sampler: t is ONE draw of its distribution (mu, sigma); r = t.
        weighting: per-sample weighting; the default p = 0 is the plain squared error.
        num_classes: None for unconditional data, else the number of classes.
        class_dropout: probability of the null label, so inference-time CFG is possible.
    """

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        weighting: AdaptiveWeighting | None = None,
        num_classes: Optional[int] = None,
        class_dropout: float = 0.1,
    ):
        self.time_sampler = time_sampler or TimeSampler()
        self.weighting = weighting or AdaptiveWeighting(p=0.0)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must lie in [0, 1], got {class_dropout}")
        self.num_classes = num_classes
        self.class_dropout = class_dropout if num_classes is not None else 0.0

    def sample_times(self, batch_size: int, like: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        sampler = self.time_sampler
        t = sampler.draw(batch_size, sampler.mu, sampler.sigma, like.device, like.dtype, generator)
        return t, t

    def prediction_and_target(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, t, t), v)``; ``r`` must equal ``t``."""
        labels = self.check_inputs(x, noise, r, t, labels)
        if not torch.equal(r, t):
            raise ValueError("flow matching trains at r = t; got r != t")
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        return model(z, t, t, labels), (noise - x).detach()
