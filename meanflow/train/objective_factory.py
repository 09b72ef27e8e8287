"""Build an objective from its configuration section."""

from __future__ import annotations

from typing import Optional

from ..objectives import FlowMatching, MeanFlow
from ..objectives.base import Objective


def build_objective(config, num_classes: Optional[int], data_parallel: bool = False, sharded: bool = False) -> Objective:
    """A :class:`MeanFlow` or :class:`FlowMatching` from a :class:`meanflow.config.ObjectiveConfig`.

    Refuses the single-pass JVP under DDP at start rather than at the first step.
    """
    if config.method == "flow_matching":
        return FlowMatching(config.time_sampler(), config.weighting(), num_classes, config.class_dropout)
    if data_parallel and config.derivative == "jvp" and not sharded:
        raise ValueError("objective.derivative='jvp' cannot run through DistributedDataParallel (the JVP would "
                         "bypass gradient synchronisation); use 'two_pass' (the default) or training.parallel=fsdp")
    guidance = config.guidance() if num_classes is not None else None
    return MeanFlow(config.time_sampler(), config.weighting(), num_classes, guidance, config.derivative,
                    config.finite_difference_step)
