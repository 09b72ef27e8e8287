"""Classifier-free guidance baked into the training target (spec section 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conventions import null_class_id
from ..validation import check_fraction, check_number, check_positive
from .targets import predict_without_grad


@dataclass(frozen=True, kw_only=True)
class TrainingGuidance:
    """Settings of guidance inside the target.

    ``omega`` and ``kappa`` mix the conditional velocity with the network's own predictions
    (Eq. 9, 10); the effective scale is ``omega / (1 - kappa)``. Guidance applies only where
    ``t_min <= t <= t_max``. ``class_dropout`` is the probability that a sample's label is
    replaced by the null class; such samples get the plain velocity.
    Defaults (omega 1, kappa 0) mean "no guidance", with class dropout 0.1 kept so the model also
    learns the unconditional field.
    """

    omega: float = 1.0
    kappa: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    class_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_positive("omega", self.omega, allow_zero=True)
        check_number("kappa", self.kappa, 0.0, 1.0, high_open=True)
        check_fraction("t_min", self.t_min)
        check_fraction("t_max", self.t_max)
        if not self.t_min <= self.t_max:
            raise ValueError(
                f"the guidance interval must satisfy 0 <= t_min <= t_max <= 1, got [{self.t_min}, {self.t_max}]"
            )
        check_fraction("class_dropout", self.class_dropout)

    @property
    def effective_scale(self) -> float:
        """omega' = omega / (1 - kappa): the plain-CFG scale this setting is equivalent to."""
        return self.omega / (1.0 - self.kappa)

    @property
    def needs_model_predictions(self) -> bool:
        """False when v_hat = v regardless of the network (omega = 1 and kappa = 0)."""
        return not (self.omega == 1.0 and self.kappa == 0.0)

    @property
    def needs_conditional_prediction(self) -> bool:
        """Eq. 10 uses the network's conditional prediction only when kappa > 0."""
        return self.kappa > 0.0


def guided_velocity(v: Tensor, v_unc: Tensor, v_cond: Tensor | None, omega: float, kappa: float) -> Tensor:
    """The guided ground-truth velocity v_hat.

    kappa = 0: ``v_unc + omega (v - v_unc)`` (Eq. 9);
    kappa > 0: ``omega v + (1 - omega - kappa) v_unc + kappa v_cond`` (Eq. 10).
    All tensors share one shape (B, ...); ``v_cond`` may be None when kappa = 0.
    """
    mixed = omega * v + (1.0 - omega - kappa) * v_unc
    if kappa > 0.0:
        if v_cond is None:
            raise ValueError("kappa > 0 needs the conditional prediction v_cond")
        mixed = mixed + kappa * v_cond
    return mixed


def guided_target_velocity(model: nn.Module, guidance: Optional[TrainingGuidance], num_classes: Optional[int],
                           z: Tensor, t: Tensor, v: Tensor, labels: Optional[Tensor]) -> Tensor:
    """v_hat (Eq. 9-10) where guidance applies (label kept, t in [t_min, t_max]), else v.

    z, v: (B, ...); t: (B,); labels: (B,) with the null id (``num_classes``) on dropped rows, or
    None. MeanFlow uses v_hat as its target velocity and tangent; alpha-Flow and SplitMeanFlow as
    their boundary target. -> (B, ...)
    """
    return GuidedVelocity(model, guidance, num_classes, z, t, v, labels).v_hat


def rows_the_gradient_forward_predicts(z: Tensor, r: Tensor, t: Tensor) -> Optional[Tensor]:
    """(B,) bool, the r = t rows, whose gradient forward evaluates exactly the conditional
    prediction u(z, t, t | y) of Eq. 10, so :class:`GuidedVelocity` can defer them; None under
    autocast, where that output is low precision and the target stays fp32 (spec section 8)."""
    return None if torch.is_autocast_enabled(z.device.type) else r == t


class GuidedVelocity:
    """v_hat (Eq. 9-10) in at most two steps, so that the gradient forward can supply some rows'
    conditional predictions instead of an extra forward computing them again.

    Guidance applies on the rows whose label is kept and whose t lies in [t_min, t_max]. Their
    unconditional prediction u(z, t, t | null), and with kappa > 0 their conditional one
    u(z, t, t | y), come from ONE no-grad fp32 forward of the bare module over all the rows that
    need one (``predict_without_grad``). ``deferred`` (B,) bool marks rows whose conditional
    prediction the caller will pass to :meth:`complete` (MeanFlow: the r = t rows, whose gradient
    forward evaluates exactly u(z, t, t | y)); their v_hat waits for it. The sum is formed in the
    same order either way, so the result is the one-step result bit for bit given equal predictions.

    Attributes:
        v_hat: (B, ...) the guided velocity, final except on the pending rows.
        pending: (P,) indices of the deferred rows still waiting for :meth:`complete`.
    """

    def __init__(self, model: nn.Module, guidance: Optional[TrainingGuidance], num_classes: Optional[int],
                 z: Tensor, t: Tensor, v: Tensor, labels: Optional[Tensor], deferred: Optional[Tensor] = None):
        self.guidance, self.v_hat = guidance, v
        self.pending = v.new_zeros((0,), dtype=torch.long)
        if guidance is None or labels is None or not guidance.needs_model_predictions:
            return
        null = null_class_id(num_classes)
        guided = (labels != null) & (t >= guidance.t_min) & (t <= guidance.t_max)
        # No branch on how many rows are guided (none is fine: every op below takes empty
        # index sets), so torch.compile traces one graph whatever the batch draws.
        rows = guided.nonzero().squeeze(1)
        conditional = rows[:0]
        if guidance.needs_conditional_prediction:
            later = torch.zeros_like(guided) if deferred is None else deferred
            conditional = (guided & ~later).nonzero().squeeze(1)
            self.pending = (guided & later).nonzero().squeeze(1)
        # One forward: the unconditional rows, then the conditional ones, all at r = t.
        inputs = torch.cat([rows, conditional])
        row_labels = torch.cat([torch.full_like(labels[rows], null), labels[conditional]])
        both = predict_without_grad(model, z[inputs], t[inputs], t[inputs], row_labels).to(v.dtype)
        v_unc, v_cond = both[: rows.numel()], both[rows.numel():]
        omega, kappa = guidance.omega, guidance.kappa
        # Eq. 9, or Eq. 10 without its kappa v_cond term, which index_add then adds: the order of
        # guided_velocity's sums, so both routes give the same bits.
        v_hat = v.index_copy(0, rows, omega * v[rows] + (1.0 - omega - kappa) * v_unc)
        if guidance.needs_conditional_prediction:
            v_hat = v_hat.index_add(0, conditional, kappa * v_cond)
        self.v_hat = v_hat

    def complete(self, conditional: Tensor) -> Tensor:
        """v_hat with the pending rows' ``kappa * v_cond`` added from ``conditional`` (B, ...), the
        batch's conditional predictions u(z, t, t | y) (only the pending rows are read). -> (B, ...)"""
        if self.guidance is None or not self.guidance.needs_conditional_prediction:
            return self.v_hat
        v_cond = conditional[self.pending].detach().to(self.v_hat.dtype)
        return self.v_hat.index_add(0, self.pending, self.guidance.kappa * v_cond)


def drop_labels(labels: Tensor, probability: float, null_id: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_id`` with the given probability. (B,) -> (B,)"""
    if probability <= 0.0:
        return labels
    dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < probability
    return torch.where(dropped, torch.full_like(labels, null_id), labels)
