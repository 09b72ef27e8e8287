"""The adaptive loss weighting and the record an objective returns (spec section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..conventions import at_least_fp32
from ..validation import check_positive


@dataclass(frozen=True, kw_only=True)
class AdaptiveWeighting:
    """``loss_i = L_i / sg((L_i + c)^p)`` with ``L_i`` the per-sample squared error (Eq. 8).

    ``p = 0`` is the plain squared error. Defaults p = 1.0, c = 0.01 (ImageNet); the CIFAR
    recipe uses p = 0.75, c = 1e-3.
    """

    p: float = 1.0
    c: float = 0.01

    def __post_init__(self) -> None:
        check_positive("adaptive weighting power p", self.p, allow_zero=True)
        check_positive("adaptive weighting constant c", self.c)

    def __call__(self, squared_error: Tensor) -> Tensor:
        """(B,) per-sample ``L_i`` -> (B,) weighted loss. The weight carries no gradient."""
        if self.p == 0:
            return squared_error
        weight = 1.0 / (squared_error.detach() + self.c).pow(self.p)
        return squared_error * weight


@dataclass
class LossOutput:
    """What an objective returns for one batch.

    loss: () the scalar to back-propagate (batch mean of ``per_sample``).
    per_sample: (B,) the weighted per-sample losses.
    metrics: detached scalars for logging:
        ``loss``; ``unweighted_error`` (batch mean of ``L_i = ||u - u_tgt||^2``);
        ``velocity_error`` (batch mean of ``||u - v||^2``, v the conditional velocity);
        ``fraction_r_neq_t`` (share of samples with r != t).
    """

    loss: Tensor
    per_sample: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample sum over all non-batch dimensions of the squared difference. -> (B,)"""
    delta = at_least_fp32(prediction) - at_least_fp32(target)
    return delta.pow(2).flatten(1).sum(dim=1)


def loss_output(
    weighting: AdaptiveWeighting, u: Tensor, u_tgt: Tensor, v: Tensor, r: Tensor, t: Tensor
) -> LossOutput:
    """Eq. 7 and 8 in fp32, plus the monitoring metrics."""
    error = squared_error(u, u_tgt)  # (B,) L_i
    per_sample = weighting(error)  # (B,)
    loss = per_sample.mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "unweighted_error": error.detach().mean(),
            "velocity_error": squared_error(u.detach(), v).mean(),
            "fraction_r_neq_t": (r != t).float().mean(),
        }
    return LossOutput(loss=loss, per_sample=per_sample, metrics=metrics)
