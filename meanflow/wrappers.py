"""Seeing through the wrappers a training run puts around a network (DDP, torch.compile)."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_data_parallel(model: nn.Module) -> bool:
    """True if ``model`` or a wrapper inside it is DistributedDataParallel."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return True
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner
