"""The objectives by name: what ``objective.method`` may say.

A new objective is one module defining a subclass of :class:`~meanflow.objectives.base.Objective`
with its ``Settings``, plus one line here. Code outside the package (a research script, a test)
adds its own with :func:`register_objective`.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .alpha_flow import AlphaFlow
from .base import Objective
from .consistency import ConsistencyTraining
from .flow_matching import FlowMatching
from .imf import ImprovedMeanFlow
from .meanflow import MeanFlow
from .shortcut import Shortcut
from .split_meanflow import SplitMeanFlow

OBJECTIVES: dict[str, type[Objective]] = {
    MeanFlow.name: MeanFlow,
    FlowMatching.name: FlowMatching,
    ImprovedMeanFlow.name: ImprovedMeanFlow,
    ConsistencyTraining.name: ConsistencyTraining,
    Shortcut.name: Shortcut,
    SplitMeanFlow.name: SplitMeanFlow,
    AlphaFlow.name: AlphaFlow,
}


def register_objective(objective: type[Objective]) -> type[Objective]:
    """Add an objective class to the registry under its ``name`` (usable as a decorator)."""
    name = getattr(objective, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an objective needs a class attribute 'name' that is an identifier, got {name!r}")
    if name in OBJECTIVES and OBJECTIVES[name] is not objective:
        raise ValueError(f"an objective named {name!r} is already registered ({OBJECTIVES[name].__name__})")
    if not hasattr(objective, "Settings"):
        raise ValueError(f"objective {name!r} needs a Settings dataclass of its knobs")
    OBJECTIVES[name] = objective
    return objective


def objective_class(method: str) -> type[Objective]:
    """The registered class of ``method``, or an error listing the registered names."""
    if method not in OBJECTIVES:
        raise ValueError(f"objective.method must be one of {sorted(OBJECTIVES)}; got {method!r}")
    return OBJECTIVES[method]


def build_objective(method: str, settings: Any, num_classes: Optional[int], model: Optional[nn.Module] = None,
                    data_parallel: bool = False, sharded: bool = False) -> Objective:
    """The objective ``method`` with its settings, for data with ``num_classes`` classes.

    With ``model``, checks that the network accepts the conditions the objective passes; with
    ``data_parallel`` / ``sharded``, that its settings can run that way. Both fail at start, not
    at the first step.
    """
    objective = objective_class(method).from_settings(settings, num_classes)
    if model is not None:
        objective.check_model(model)
    objective.check_parallel(data_parallel, sharded)
    return objective
