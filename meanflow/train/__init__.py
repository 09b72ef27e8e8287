"""Training: the loop, and the pieces a custom loop can reuse.

``train(config, folder)`` runs (or resumes) a whole run; ``train(config, folder, data=x)``
trains on your own samples. A custom loop can take the EMA (:class:`EMA`), the learning-rate
schedule (:func:`build_schedule`, :func:`lr_factor`), one optimizer step under the non-finite
policy (:class:`TrainStep`) and the checkpoint state (:mod:`meanflow.train.state`).
"""

from .ema import EMA, ema_name
from .loop import Trainer, TrainResult, train
from .schedule import build_schedule, lr_factor
from .signals import StopRequest
from .step import NonFinitePolicy, StepOutcome, TrainStep

__all__ = ["EMA", "NonFinitePolicy", "StepOutcome", "StopRequest", "TrainResult", "TrainStep", "Trainer",
           "build_schedule", "ema_name", "lr_factor", "train"]
