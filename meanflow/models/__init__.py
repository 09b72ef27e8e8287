"""Average-velocity networks ``u(z, r, t, conditions)`` and a registry that builds them from plain data.

A model is described by ``(architecture, options)``: the architecture's name and the keyword
arguments of its config dataclass. That pair is what configs and run records store (JSON).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .base import enable_activation_checkpointing
from .mlp import MLP, MLPConfig

# name -> (module, config class, model class); modules are imported when first asked for.
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "mlp": ("meanflow.models.mlp", "MLPConfig", "MLP"),
    "dit": ("meanflow.models.dit", "DiTConfig", "DiT"),
    "unet": ("meanflow.models.unet", "UNetConfig", "UNet"),
    "imf_dit": ("meanflow.models.imf_dit", "ImfDiTConfig", "ImfDiT"),
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
    if not isinstance(options, dict):
        raise ValueError(f"model.options must be a JSON object of {config_class.__name__} fields, got {options!r}")
    try:
        return config_class.from_dict(dict(options))
    except TypeError as error:  # a required field is missing
        missing = str(error).split("missing", 1)[-1].strip()
        raise ValueError(f"model.options for architecture {architecture!r} lacks {missing}") \
            from None


def build_model(architecture: str, options: dict[str, Any]) -> nn.Module:
    """Instantiate a model from its architecture name and config options."""
    _, model_class = _classes(architecture)
    return model_class(model_config(architecture, options))


__all__ = ["ARCHITECTURES", "MLP", "MLPConfig", "build_model", "enable_activation_checkpointing", "model_config"]
