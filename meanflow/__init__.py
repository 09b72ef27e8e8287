"""meanflow: one-step generative modelling with MeanFlow and its family of average-velocity methods.

The pieces, each usable on its own:

- :mod:`meanflow.objectives`: ``MeanFlow`` and ``FlowMatching`` behind one protocol
  (``loss(model, batch, generator=..., progress=...)``), registered by name in ``OBJECTIVES``.
- :mod:`meanflow.conditions`: the ``Conditions`` record a network is called with and the named
  ``ModelOutput`` it may return.
- :mod:`meanflow.sampling` / :mod:`meanflow.samplers`: ``sample`` (1-NFE / k-NFE), ``sample_ode``
  (Euler / Heun), and the sampler objects an objective declares.
- :mod:`meanflow.models`: ``MLP``, ``DiT``, ``UNet``, all called as ``model(z, r, t, conditions)``.
- :mod:`meanflow.encoders`: the space of the samples (pixels, VAE latents, points).
- :mod:`meanflow.train`: the training loop with EMA, checkpoints and resume;
  :mod:`meanflow.inference`: loading a run and generating samples.
"""

from .conditions import Conditions, ModelOutput, Tangent
from .conventions import Batch, interpolate, null_class_id
from .jvp import Derivative
from .objectives import (
    OBJECTIVES,
    AdaptiveWeighting,
    FlowMatching,
    MeanFlow,
    TimeSampler,
    TrainingGuidance,
    register_objective,
)
from .samplers import AverageVelocitySampler, VelocityOdeSampler
from .sampling import sample, sample_ode, sample_one_step, time_grid

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "AdaptiveWeighting",
    "AverageVelocitySampler",
    "Batch",
    "Conditions",
    "Derivative",
    "FlowMatching",
    "MeanFlow",
    "ModelOutput",
    "Tangent",
    "TimeSampler",
    "TrainingGuidance",
    "VelocityOdeSampler",
    "interpolate",
    "null_class_id",
    "register_objective",
    "sample",
    "sample_ode",
    "sample_one_step",
    "time_grid",
]
