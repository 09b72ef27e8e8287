"""Training objectives: MeanFlow and its flow-matching special case."""

from .flow_matching import FlowMatching
from .guidance import TrainingGuidance, guided_velocity
from .loss import AdaptiveWeighting, LossOutput
from .meanflow import MeanFlow
from .time_sampling import MaskMode, TimeDistribution, TimeSampler

__all__ = [
    "AdaptiveWeighting",
    "FlowMatching",
    "LossOutput",
    "MaskMode",
    "MeanFlow",
    "TimeDistribution",
    "TimeSampler",
    "TrainingGuidance",
    "guided_velocity",
]
