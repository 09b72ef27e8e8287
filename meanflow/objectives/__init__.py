"""Training objectives behind one protocol (:class:`Objective`), by name in :data:`OBJECTIVES`."""

from .base import NoiseTimeObjective, Objective
from .flow_matching import FlowMatching, FlowMatchingSettings
from .imf import ImfSettings, ImfTerms, ImprovedMeanFlow
from .guidance import TrainingGuidance, guided_velocity
from .loss import AdaptiveWeighting, LossOutput
from .meanflow import MeanFlow, MeanFlowSettings
from .registry import OBJECTIVES, build_objective, objective_class, register_objective
from .time_sampling import MaskMode, TimeDistribution, TimeSampler

__all__ = [
    "OBJECTIVES",
    "AdaptiveWeighting",
    "FlowMatching",
    "FlowMatchingSettings",
    "ImfSettings",
    "ImfTerms",
    "ImprovedMeanFlow",
    "LossOutput",
    "MaskMode",
    "MeanFlow",
    "MeanFlowSettings",
    "NoiseTimeObjective",
    "Objective",
    "TimeDistribution",
    "TimeSampler",
    "TrainingGuidance",
    "build_objective",
    "guided_velocity",
    "objective_class",
    "register_objective",
]
