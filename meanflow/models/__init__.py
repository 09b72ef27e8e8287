"""Average-velocity networks ``u(z, r, t, conditions)`` and a registry that builds them from plain data.

A model is described by ``(architecture, options)``: the architecture's name and the keyword
arguments of its config dataclass. That pair is what configs and run records store (JSON).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .mlp import MLP, MLPConfig

# name -> (module, config class, model class); modules are imported when first asked for.
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "mlp": ("meanflow.models.mlp", "MLPConfig", "MLP"),
    "dit": ("meanflow.models.dit", "DiTConfig", "DiT"),
    "unet": ("meanflow.models.unet", "UNetConfig", "UNet"),
}


def _classes(architecture: str) -> tuple[type, type]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; valid architectures are {list(ARCHITECTURES)}")
    module_name, config_name, model_name = ARCHITECTURES[architecture]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def model_config(architecture: str, options: dict[str, Any]):
    """The validated config dataclass of ``architecture`` built from ``options``."""
    config_class, _ = _classes(architecture)
    return config_class.from_dict(dict(options))


def build_model(architecture: str, options: dict[str, Any]) -> nn.Module:
    """Instantiate a model from its architecture name and config options."""
    config_class, model_class = _classes(architecture)
    return model_class(config_class.from_dict(dict(options)))


__all__ = ["ARCHITECTURES", "MLP", "MLPConfig", "build_model", "model_config"]
