"""Build an objective from its configuration section."""

from __future__ import annotations

from typing import Optional

from ..objectives import AdaptiveWeighting, FlowMatching, MeanFlow, TimeSampler, TrainingGuidance
from ..objectives.base import Objective


def build_objective(config, num_classes: Optional[int], data_parallel: bool = False, sharded: bool = False) -> Objective:
    """A :class:`MeanFlow` or :class:`FlowMatching` from a :class:`meanflow.config.ObjectiveConfig`.

    Refuses the single-pass JVP under DDP at start rather than at the first step.
    """
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
    if data_parallel and config.derivative == "jvp" and not sharded:
        raise ValueError("objective.derivative='jvp' cannot run through DistributedDataParallel (the JVP would "
                         "bypass gradient synchronisation); use 'two_pass' (the default) or training.parallel=fsdp")
    return MeanFlow(sampler, weighting, num_classes, guidance, config.derivative, config.finite_difference_step)
