"""``training.compile`` over the whole step: the objective's loss, network call included.

An objective with ``whole_step_compile`` (MeanFlow, flow matching) traces its
:meth:`~meanflow.objectives.base.NoiseTimeObjective.loss_from_draws` (the guidance forwards, the
one-pass gradient forward with its tangent, the target and the loss) into one graph whatever the
step draws: the rows with r != t and the guided rows are index sets whose sizes the graph holds as
symbols (``capture_dynamic_output_shape_ops``), so a new mask never recompiles. The draws
themselves (noise, times, label dropout) stay eager, since random generators do not enter
compiled code. Other objectives, runs under torchrun and the U-Net (whose convolutions inductor
cannot compile over a symbolic number of rows) compile the network module alone.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from ..objectives.base import Objective
from ..objectives.loss import LossOutput


def compiles_whole_step(objective: Objective, model: nn.Module, distributed: bool) -> bool:
    """True if ``training.compile`` compiles this objective's whole loss: single process only
    (under torchrun the DDP / FSDP wrappers are compiled as modules, as before), and a network
    whose tangent compiles (``tangent_compiles``; not the U-Net)."""
    return (bool(getattr(objective, "whole_step_compile", False)) and not distributed
            and bool(getattr(model, "tangent_compiles", True)))


class CompiledStepLoss:
    """``objective.loss`` with its draws eager and the rest compiled once.

    Called like ``objective.loss(network, batch, generator=..., progress=...)``.
    """

    def __init__(self, objective: Objective, backend: str):
        self.objective = objective
        self.compiled = torch.compile(objective.loss_from_draws, backend=backend)

    def __call__(self, network, batch, labels=None, *, generator=None, progress: float = 0.0) -> LossOutput:
        draws = self.objective.draws(batch, labels, generator=generator, progress=progress)
        # Index sets of data-dependent size (torch.nonzero) stay inside the graph as size symbols.
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
            return self.compiled(network, *draws, progress=progress)
