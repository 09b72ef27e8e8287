"""The learning-rate schedule: linear warm-up, then constant (the paper) or a half cosine.

:func:`lr_factor` is the schedule as a pure function of the step; :func:`build_schedule` wraps
it in the ``LambdaLR`` whose ``state_dict`` a checkpoint stores. A custom training loop can use
either directly (``from meanflow.train import build_schedule``).
"""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(step: int, warmup: int, total: int, decay: str) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then 1 ('constant') or a half cosine from 1 to 0 at ``total`` ('cosine')."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                   decay: str = "constant") -> torch.optim.lr_scheduler.LambdaLR:
    """The ``LambdaLR`` of :func:`lr_factor` over ``total`` optimizer steps; call its ``step()``
    once after each optimizer step (a skipped step does not advance it).

    Args:
        optimizer: whose every parameter group follows the schedule.
        warmup: ``optim.warmup_steps``; total: ``training.steps``; decay: ``optim.decay``.
    """
    if decay not in ("constant", "cosine"):
        raise ValueError(f"decay must be 'constant' or 'cosine', got {decay!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=total, decay=decay))


__all__ = ["build_schedule", "lr_factor"]
