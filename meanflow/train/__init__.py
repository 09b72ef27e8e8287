"""Training: the loop, EMA, checkpoints."""

from .loop import TrainResult, train

__all__ = ["TrainResult", "train"]
