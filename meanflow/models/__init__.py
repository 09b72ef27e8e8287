"""Average-velocity networks ``u(z, r, t, y)`` and a registry that builds them from plain data.

A model is described by ``(architecture, options)``: the architecture's name and the keyword
arguments of its config dataclass. That pair is what configs and checkpoints store (JSON).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .mlp import MLP, MLPConfig

ARCHITECTURES = ("mlp", "dit", "unet")


def _classes(architecture: str):
    if architecture == "mlp":
        return MLPConfig, MLP
    if architecture == "dit":
        from .dit import DiT, DiTConfig

        return DiTConfig, DiT
    if architecture == "unet":
        from .unet import UNet, UNetConfig

        return UNetConfig, UNet
    raise ValueError(f"unknown architecture {architecture!r}; valid architectures are {list(ARCHITECTURES)}")


def model_config(architecture: str, options: dict[str, Any]):
    """The validated config dataclass of ``architecture`` built from ``options``."""
    config_class, _ = _classes(architecture)
    return config_class.from_dict(dict(options))


def build_model(architecture: str, options: dict[str, Any]) -> nn.Module:
    """Instantiate a model from its architecture name and config options."""
    config_class, model_class = _classes(architecture)
    return model_class(config_class.from_dict(dict(options)))


__all__ = ["ARCHITECTURES", "MLP", "MLPConfig", "build_model", "model_config"]
