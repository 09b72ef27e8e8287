"""One optimizer step -- loss, backward, gradient sync and clip, optimizer, schedule, EMA -- under
the non-finite policy, with one host read.

Whether the step may be applied is the only thing the host must know before going on, so the
loss's and the gradient norm's finiteness are packed into one device flag (under torchrun
together with each rank's stop request, in the same all-reduce) and read once. Everything else
the step produces (the metrics) stays on the device for :class:`meanflow.train.metrics.MetricWindow`.

Why one read rather than none: a skipped step must not advance the step counter, the schedule or
the EMA, and the loop decides on that counter when to log, checkpoint and stop. Masking the
update on the device instead would still leave the counter, the ``on_nonfinite='stop'`` error and
the "never in a checkpoint" guarantee waiting for a read at the next checkpoint, and would cost a
copy of the weights and optimizer state every step to undo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conventions import Batch
from ..distributed import Distributed, is_sharded
from ..errors import NonFiniteTrainingError
from .ema import EMA
from .signals import StopRequest


@dataclass(frozen=True)
class StepOutcome:
    """What one call of :class:`TrainStep` did.

    metrics: the objective's metrics and ``grad_norm`` as 0-d device tensors, or None when the
        step was skipped (non-finite loss or gradient on some rank).
    stop_requested: some rank asked to stop (SIGTERM / SIGINT); the same on every rank.
    skipped_because: why a skipped step was skipped (the step, the loss and the gradient norm),
        for the warning the loop prints; None for a step that was taken.
    """

    metrics: Optional[dict[str, Tensor]]
    stop_requested: bool
    skipped_because: Optional[str] = None

    @property
    def taken(self) -> bool:
        return self.metrics is not None


class NonFinitePolicy:
    """``training.on_nonfinite`` and ``training.max_consecutive_skips``: after a non-finite step,
    'skip' goes on unless ``max_consecutive`` steps in a row were skipped; 'stop' stops at once.
    Stopping raises :class:`~meanflow.errors.NonFiniteTrainingError` (a FloatingPointError, which
    ``meanflow train`` reports in one line and exit code 1); the last checkpoint is intact, since
    a skipped step never changes the weights."""

    def __init__(self, mode: str, max_consecutive: int):
        if mode not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {mode!r}")
        self.mode, self.max_consecutive, self.consecutive = mode, max_consecutive, 0

    def taken(self) -> None:
        self.consecutive = 0

    def skipped(self, step_number: int, loss: Tensor, grad_norm: Tensor) -> str:
        """Count a skipped step (``step_number`` is the 1-based step it would have been); raise to
        stop, else return what happened (for the loop's warning)."""
        self.consecutive += 1
        # Reading the values here costs nothing extra: the flag read has already synchronised.
        message = (f"non-finite loss or gradient at step {step_number} (loss {float(loss):.4g}, "
                   f"gradient norm {float(grad_norm):.4g})")
        if self.mode == "stop":
            raise NonFiniteTrainingError(
                message + "; stopping (--set training.on_nonfinite=stop; Python: training.on_nonfinite='stop'). "
                f"The last checkpoint is intact; {_REMEDY}")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                message + f"; {self.consecutive} steps in a row were skipped, stopping (the limit "
                "training.max_consecutive_skips). The last checkpoint is intact; " + _REMEDY)
        return message


# What to change after non-finite steps, as the command line spells it (the config fields are
# the same in Python: config.optim.lr, config.optim.grad_clip).
_REMEDY = "lower the learning rate (--set optim.lr=...) or clip the gradient norm (--set optim.grad_clip=1.0)"


class TrainStep:
    """Takes optimizer steps on batches; built once per run from its parts.

    Args:
        network: what the gradient forward goes through (the model, or its DDP / compiled wrapper).
        model: the bare module (its parameters are clipped; its weights feed the EMA).
        loss: the objective's loss, ``loss(network, batch, generator=..., progress=...)``
            (``objective.loss``, or its compiled whole step, :mod:`meanflow.train.compiled`).
        optimizer, schedule, ema: stepped only when the step is finite.
        policy: the non-finite policy.
        dist: the process group (the flag's all-reduce).
        grad_clip: the gradient-norm limit, or None for none.
        autocast: the autocast context of the forward (bf16 or disabled).
    """

    def __init__(self, network: nn.Module, model: nn.Module, loss, optimizer: torch.optim.Optimizer,
                 schedule, ema: EMA, policy: NonFinitePolicy, dist: Distributed, grad_clip: Optional[float],
                 autocast: torch.autocast):
        self.network, self.model, self.loss = network, model, loss
        self.optimizer, self.schedule, self.ema, self.policy, self.dist = optimizer, schedule, ema, policy, dist
        self.grad_clip = math.inf if grad_clip is None else grad_clip
        self.autocast = autocast

    def __call__(self, batch: Batch, step: int, progress: float, generator: torch.Generator,
                 stop: Optional[StopRequest] = None) -> StepOutcome:
        """One step from ``step`` optimizer steps done; ``progress`` is the share of training done.
        ``stop.requested`` is read after the backward pass and agreed on by every rank."""
        with self.autocast:
            out = self.loss(self.network, batch, generator=generator, progress=progress)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        # Taken after DDP's all-reduce (or FSDP's reduce-scatter): the same norm on every rank.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if is_sharded(grad_norm):
            grad_norm = grad_norm.full_tensor()
        nonfinite, stopping = self._agree(out.loss.detach(), grad_norm.detach(), stop is not None and stop.requested)
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            reason = self.policy.skipped(step + 1, out.loss.detach(), grad_norm)
            return StepOutcome(None, stopping, reason)
        self.policy.taken()
        self.optimizer.step()
        self.schedule.step()
        self.ema.update(self.model, step + 1)
        return StepOutcome({**out.metrics, "grad_norm": grad_norm.detach()}, stopping)

    def _agree(self, loss: Tensor, grad_norm: Tensor, stop_requested: bool) -> tuple[bool, bool]:
        """(any rank's loss or the gradient is non-finite, any rank asked to stop): the step's
        one host read, after one all-reduce of a (2,) flag under torchrun."""
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))  # () bool, on the device
        if not self.dist.enabled:
            return bool(nonfinite), stop_requested
        # A fill from a host scalar, not a host-to-device copy (which would synchronise a stream).
        flags = torch.stack([nonfinite.float(), torch.full((), float(stop_requested), device=loss.device)])  # (2,)
        bad, stops = self.dist.sum(flags).tolist()
        return bad > 0, stops > 0


__all__ = ["NonFinitePolicy", "StepOutcome", "TrainStep"]
