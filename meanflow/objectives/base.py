"""The objective protocol, and what the registered objectives share.

Every objective, built in or plugged in, offers (see :class:`Objective`):

- ``name`` and ``Settings``: the name in the registry and config (``objective.method``), and a
  keyword-only frozen dataclass of its knobs, nested in the config as ``objective.<name>.*``
  and validated by the objective itself (:meth:`Objective.parse_settings`);
- ``from_settings(settings, num_classes)``: the objective for a data set's classes;
- ``loss(model, batch, generator=..., progress=...)``: the loss of one batch, where
  ``progress`` in [0, 1] is the share of training done (for curricula);
- ``sampler``: how its network is sampled (:mod:`meanflow.samplers`);
- ``required_conditions`` and ``check_model(model)``: what the network must accept, checked
  when the objective is built for a network.

:class:`NoiseTimeObjective` implements ``loss`` for objectives that draw noise, times and label
dropout and regress a prediction onto a target (:meth:`NoiseTimeObjective.compute`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from ..conditions import LABELS, accepted_conditions
from ..conventions import Batch, as_batch, check_times, null_class_id
from ..samplers import Sampler
from ..validation import check_known_keys, check_number
from .guidance import drop_labels
from .loss import AdaptiveWeighting, LossOutput, loss_output


class Objective:
    """The protocol of a training objective (see the module docstring). Objectives hold no
    optimizer, EMA or data loader."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    num_classes: Optional[int]

    @classmethod
    def parse_settings(cls, values: Any = None):
        """The objective's Settings record from a record, a dict (unknown keys refused, naming
        the valid ones) or None (the defaults)."""
        if values is None:
            return cls.Settings()
        if isinstance(values, cls.Settings):
            return values
        if not isinstance(values, dict):
            raise ValueError(f"objective.{cls.name} must be a group of settings, got {values!r}")
        valid = [f.name for f in dataclasses.fields(cls.Settings)]
        check_known_keys(f"settings for objective {cls.name!r}", values, valid)
        try:
            return cls.Settings(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"objective.{cls.name}: {error}") from None

    @classmethod
    def from_settings(cls, settings: Any, num_classes: Optional[int]) -> "Objective":
        raise NotImplementedError

    @property
    def sampler(self) -> Sampler:
        raise NotImplementedError

    @property
    def required_conditions(self) -> frozenset[str]:
        """The conditions the objective passes to the network."""
        return frozenset({LABELS}) if self.num_classes is not None else frozenset()

    def check_model(self, model: nn.Module) -> None:
        """Refuse a network that does not accept the conditions this objective passes."""
        missing = self.required_conditions - accepted_conditions(model)
        if missing:
            raise ValueError(f"objective {self.name!r} passes the conditions {sorted(missing)}, which the "
                             f"network {type(model).__name__} does not accept (accepts "
                             f"{sorted(accepted_conditions(model)) or 'none'}); "
                             "set the model's num_classes to match the data")

    def check_parallel(self, data_parallel: bool, sharded: bool) -> None:
        """Refuse, at start, a setting that cannot run under this kind of parallelism."""

    def loss(self, model: nn.Module, batch: Batch | Tensor, labels: Optional[Tensor] = None, *,
             generator: Optional[torch.Generator] = None, progress: float = 0.0) -> LossOutput:
        """The loss of one batch. ``batch`` is a :class:`~meanflow.conventions.Batch` (or data
        ``x`` (B, ...) with ``labels``); ``progress`` in [0, 1] is the share of training done."""
        raise NotImplementedError


class NoiseTimeObjective(Objective):
    """An objective that draws noise, times (r, t) and label dropout, then regresses the network's
    prediction onto a stop-gradient target with an adaptive weight (Eq. 7-8).

    Subclasses define :meth:`sample_times` and :meth:`compute`. The training path
    (:meth:`loss`) checks only what it did not make itself (the batch), and never reads the
    device to do so for tensors off the CPU; :meth:`prediction_and_target` checks every input.
    """

    weighting: AdaptiveWeighting
    class_dropout: float

    def sample_times(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator],
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        """(r, t), each (B,), with like's dtype and device."""
        raise NotImplementedError

    def compute(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """``(prediction, sg(target))`` for inputs already checked; what subclasses write."""
        raise NotImplementedError

    def prediction_and_target(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """The deterministic core: ``(u_theta(z_t, r, t), sg(u_tgt))`` for explicit inputs, checked."""
        labels = self.check_inputs(x, noise, r, t, labels)
        return self.compute(model, x, noise, r, t, labels)

    def draw(self, batch, labels, generator, progress) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
        """The checked batch and its random draws: (x, labels, noise, r, t), before label dropout."""
        batch = as_batch(batch, labels)
        check_number("progress", progress, 0.0, 1.0)
        x = batch.x
        labels = self.check_labels(batch.labels, x.shape[0], allow_null=False)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        r, t = self.sample_times(x.shape[0], x, generator, progress)
        return x, labels, noise, r, t

    whole_step_compile: ClassVar[bool] = False
    """True where :meth:`loss_from_draws` traces into one torch.compile graph whatever the draws
    (no branch on their values; tests/test_compiled_step.py), so ``training.compile`` compiles the
    whole step, derivative and target included, not the network alone."""

    def draws(self, batch, labels=None, *, generator=None, progress=0.0):
        """A step's random draws for the batch (eager: generators do not enter compiled code):
        ``(x, noise, r, t, labels)``, the labels after class dropout."""
        x, labels, noise, r, t = self.draw(batch, labels, generator, progress)
        if labels is not None:
            labels = drop_labels(labels, self.class_dropout, null_class_id(self.num_classes), generator)
        return x, noise, r, t, labels

    def loss_from_draws(self, model, x, noise, r, t, labels, progress: float = 0.0) -> LossOutput:
        """The loss of inputs this objective drew (unchecked): the part of a step that compiles."""
        u, u_tgt = self.compute(model, x, noise, r, t, labels)
        return loss_output(self.weighting, u, u_tgt, noise - x, r, t)

    def loss(self, model, batch, labels=None, *, generator=None, progress=0.0) -> LossOutput:
        """Draw noise, times and label dropout for the batch's data ``x`` (B, ...) and return the loss."""
        draws = self.draws(batch, labels, generator=generator, progress=progress)
        return self.loss_from_draws(model, *draws, progress=progress)  # times and noise are ours: no checks

    def loss_at(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> LossOutput:
        """The loss for explicit noise, times and (already dropped) labels, all checked."""
        u, u_tgt = self.prediction_and_target(model, x, noise, r, t, labels)
        return loss_output(self.weighting, u, u_tgt, noise - x, r, t)

    def check_inputs(self, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor]) -> Optional[Tensor]:
        """Validate explicit inputs; returns the labels (null ids allowed)."""
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal data shape {tuple(x.shape)}")
        check_times(r, t, x.shape[0])
        return self.check_labels(labels, x.shape[0], allow_null=True)

    def check_labels(self, labels: Optional[Tensor], batch_size: int, allow_null: bool) -> Optional[Tensor]:
        """Labels must match the objective: (B,) integers in [0, num_classes) (or the null id)."""
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels were given but the objective is unconditional (num_classes=None)")
            return None
        if labels is None:
            raise ValueError(f"the objective is class-conditional ({self.num_classes} classes): labels are required")
        if labels.shape != (batch_size,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor of shape ({batch_size},), got {labels.dtype} {tuple(labels.shape)}")
        upper = self.num_classes + (1 if allow_null else 0)
        # The range check reads the tensor: done on the CPU only, never as a device sync in a step
        # (the data sources check their labels when they load them).
        if labels.numel() and labels.device.type == "cpu" and (int(labels.min()) < 0 or int(labels.max()) >= upper):
            raise ValueError(f"labels must lie in [0, {upper - 1}]; got range [{int(labels.min())}, {int(labels.max())}]")
        return labels.long()


def default_of(record: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``record`` (for settings that build records)."""
    return record.__dataclass_fields__[name].default


def check_num_classes(num_classes: Optional[int]) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
