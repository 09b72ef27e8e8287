"""Build an objective from its configuration section."""

from __future__ import annotations

from typing import Optional

from ..objectives import AdaptiveWeighting, FlowMatching, MeanFlow, TimeSampler, TrainingGuidance
from ..objectives.base import Objective


def build_objective(config, num_classes: Optional[int]) -> Objective:
    """A :class:`MeanFlow` or :class:`FlowMatching` from a :class:`meanflow.config.ObjectiveConfig`."""
    sampler = TimeSampler(
        distribution=config.time_distribution,
        mu=config.mu,
        sigma=config.sigma,
        fraction_r_neq_t=config.fraction_r_neq_t,
        mask_mode=config.mask_mode,
        r_mu=config.r_mu,
        r_sigma=config.r_sigma,
    )
    weighting = AdaptiveWeighting(p=config.p, c=config.c)
    if config.method == "flow_matching":
        return FlowMatching(sampler, weighting, num_classes, config.class_dropout)
    guidance = None
    if num_classes is not None:
        guidance = TrainingGuidance(omega=config.omega, kappa=config.kappa, t_min=config.t_min, t_max=config.t_max,
                                    class_dropout=config.class_dropout)
    return MeanFlow(sampler, weighting, num_classes, guidance, config.derivative, config.finite_difference_step)
