"""meanflow: one-step generative modelling with MeanFlow and its family of average-velocity methods.

The pieces, each usable on its own:

- :mod:`meanflow.objectives`: ``MeanFlow`` and ``FlowMatching`` (``loss(model, x, labels)``).
- :mod:`meanflow.sampling`: ``sample`` (1-NFE / k-NFE), ``sample_ode`` (Euler / Heun baseline).
- :mod:`meanflow.models`: ``MLP``, ``DiT``, ``UNet``, all called as ``model(z, r, t, y)``.
- :mod:`meanflow.train`: the training loop with EMA, checkpoints and resume.
"""

from .conventions import interpolate, null_class_id
from .jvp import Derivative
from .objectives import AdaptiveWeighting, FlowMatching, MeanFlow, TimeSampler, TrainingGuidance
from .sampling import sample, sample_ode, sample_one_step, time_grid

__version__ = "0.1.0"

__all__ = [
    "AdaptiveWeighting",
    "Derivative",
    "FlowMatching",
    "MeanFlow",
    "TimeSampler",
    "TrainingGuidance",
    "interpolate",
    "null_class_id",
    "sample",
    "sample_ode",
    "sample_one_step",
    "time_grid",
]
