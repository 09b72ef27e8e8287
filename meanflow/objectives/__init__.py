"""Training objectives behind one protocol (:class:`Objective`), by name in :data:`OBJECTIVES`."""

from .alpha_flow import AlphaFlow, AlphaFlowSettings
from .base import NoiseTimeObjective, Objective
from .consistency import ConsistencySettings, ConsistencyTraining
from .flow_matching import FlowMatching, FlowMatchingSettings
from .imf import ImfSettings, ImfTerms, ImprovedMeanFlow
from .guidance import TrainingGuidance, guided_velocity
from .loss import AdaptiveWeighting, LossOutput
from .meanflow import MeanFlow, MeanFlowSettings
from .registry import OBJECTIVES, build_objective, objective_class, register_objective
from .shortcut import Shortcut, ShortcutSettings
from .split_meanflow import SplitMeanFlow, SplitMeanFlowSettings
from .time_sampling import MaskMode, TimeDistribution, TimeSampler

__all__ = [
    "OBJECTIVES",
    "AdaptiveWeighting",
    "AlphaFlow",
    "AlphaFlowSettings",
    "ConsistencySettings",
    "ConsistencyTraining",
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
    "Shortcut",
    "ShortcutSettings",
    "SplitMeanFlow",
    "SplitMeanFlowSettings",
    "TimeDistribution",
    "TimeSampler",
    "TrainingGuidance",
    "build_objective",
    "guided_velocity",
    "objective_class",
    "register_objective",
]
