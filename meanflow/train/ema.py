"""Exponential moving averages of the weights, several decays at once."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..distributed import shard_like


def ema_name(decay: float) -> str:
    """The name an EMA copy is stored and chosen under, e.g. ``ema_0.9999``."""
    return f"ema_{decay:g}"


class EMA:
    """Shadow copies ``w_ema <- decay * w_ema + (1 - decay) * w`` of a model's floating tensors.

    With ``period > 1`` the update runs every ``period`` steps with ``decay ** period``, which keeps
    the same averaging horizon in steps. Shadows are fp32 and live on the model's device; the
    model itself is never swapped or modified.
    """

    def __init__(self, model: nn.Module, decays: Iterable[float], period: int = 1):
        self.decays = tuple(float(d) for d in decays)
        if not self.decays or not all(0.0 < d < 1.0 for d in self.decays):
            raise ValueError(f"EMA decays must lie in (0, 1), got {self.decays}")
        if period < 1:
            raise ValueError(f"EMA period must be >= 1, got {period}")
        self.period = period
        tracked = self._tracked(model)
        self.shadows: dict[str, dict[str, Tensor]] = {
            ema_name(d): {key: value.detach().float().clone() for key, value in tracked.items()} for d in self.decays
        }

    @staticmethod
    def _tracked(model: nn.Module) -> dict[str, Tensor]:
        return {key: value for key, value in model.state_dict().items() if value.is_floating_point()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.shadows)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's current weights in after optimizer step number ``step`` (1-based)."""
        if step % self.period:
            return
        current = [value.float() for value in self._tracked(model).values()]
        for decay, shadow in zip(self.decays, self.shadows.values()):
            torch._foreach_lerp_(list(shadow.values()), current, 1.0 - decay**self.period)

    def copy_to(self, model: nn.Module, name: str) -> nn.Module:
        """Load the EMA copy ``name`` into ``model`` (another instance of the same architecture)."""
        if name not in self.shadows:
            raise ValueError(f"unknown EMA {name!r}; this run keeps {list(self.shadows)}")
        model.load_state_dict(self.shadows[name], strict=False)
        return model

    def state_tensors(self) -> dict[str, Tensor]:
        """Flat ``{"<ema name>/<tensor name>": tensor}`` for a safetensors file."""
        return {f"{name}/{key}": value for name, shadow in self.shadows.items() for key, value in shadow.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy full tensors (as :meth:`state_tensors` names them) into the shadows, sharded like
        them under FSDP2."""
        for name, shadow in self.shadows.items():
            for key in shadow:
                stored = tensors.get(f"{name}/{key}")
                if stored is None:
                    raise ValueError(f"the checkpoint has no EMA tensor {name}/{key}")
                shadow[key].copy_(shard_like(stored, shadow[key]))
