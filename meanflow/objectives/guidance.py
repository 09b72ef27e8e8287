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
    None. The network's predictions at r = t (the unconditional one, and the conditional one when
    kappa > 0) come from one no-grad fp32 forward of the guided rows. MeanFlow uses v_hat as its
    target velocity and tangent; SplitMeanFlow as its boundary target. -> (B, ...)
    """
    if guidance is None or labels is None or not guidance.needs_model_predictions:
        return v
    null = null_class_id(num_classes)
    guided = (labels != null) & (t >= guidance.t_min) & (t <= guidance.t_max)
    rows = guided.nonzero().squeeze(1)
    if rows.numel() == 0:
        return v
    z_g, t_g = z[rows], t[rows]
    null_labels = torch.full_like(labels[rows], null)
    if guidance.needs_conditional_prediction:
        # One forward of 2n rows: unconditional then conditional, both at r = t.
        both = predict_without_grad(model, torch.cat([z_g, z_g]), torch.cat([t_g, t_g]), torch.cat([t_g, t_g]),
                                    torch.cat([null_labels, labels[rows]]))
        v_unc, v_cond = both.chunk(2)
    else:
        v_unc, v_cond = predict_without_grad(model, z_g, t_g, t_g, null_labels), None
    mixed = guided_velocity(v[rows], v_unc.to(v.dtype), None if v_cond is None else v_cond.to(v.dtype),
                            guidance.omega, guidance.kappa)
    return v.index_copy(0, rows, mixed)


def drop_labels(labels: Tensor, probability: float, null_id: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_id`` with the given probability. (B,) -> (B,)"""
    if probability <= 0.0:
        return labels
    dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < probability
    return torch.where(dropped, torch.full_like(labels, null_id), labels)
