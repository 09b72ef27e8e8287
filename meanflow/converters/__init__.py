"""Converters from other projects' weight files into meanflow run folders.

Each converter reads a foreign file without executing anything in it, checks it strictly against
the architecture it claims to be, and writes a run folder (``checkpoints/step_000000000/`` with
weights and ``run.json``) that ``meanflow sample`` and ``meanflow eval`` use as is.

:data:`CONVERTERS` names the module and function of each ``meanflow convert --from`` format; the
module (and torch) is imported only by :func:`converter`, so ``meanflow convert --help`` answers
at once.
"""

from __future__ import annotations

import importlib
from typing import Callable

CONVERTERS: dict[str, tuple[str, str]] = {
    "imf-torch": ("meanflow.converters.imf_torch", "convert_imf_details"),
}
"""``--from`` name -> (module, function ``(path, output, preset=None) -> Conversion``)."""


def converter(name: str) -> Callable:
    """The conversion function of the format ``name`` (a key of :data:`CONVERTERS`)."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown source format {name!r}; valid formats are {sorted(CONVERTERS)}")
    module_name, function_name = CONVERTERS[name]
    return getattr(importlib.import_module(module_name), function_name)


def convert_imf_torch(path, output, preset=None):
    """See :func:`meanflow.converters.imf_torch.convert_imf_torch`."""
    from .imf_torch import convert_imf_torch as convert

    return convert(path, output, preset)


__all__ = ["CONVERTERS", "convert_imf_torch", "converter"]
