"""What every objective shares: noise, label dropout, and the loss from (prediction, target)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..conventions import check_times, null_class_id
from .guidance import drop_labels
from .loss import AdaptiveWeighting, LossOutput, loss_output


class Objective:
    """Base of the training objectives.

    Subclasses define :meth:`sample_times` and :meth:`prediction_and_target`; this class turns a
    data batch into a loss. Objectives hold no optimizer, EMA or data loader.
    """

    weighting: AdaptiveWeighting
    num_classes: Optional[int]
    class_dropout: float

    def sample_times(self, batch_size: int, like: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(r, t), each (B,), with like's dtype and device."""
        raise NotImplementedError

    def prediction_and_target(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """The deterministic core: ``(u_theta(z_t, r, t), sg(u_tgt))`` for explicit inputs."""
        raise NotImplementedError

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Optional[Tensor] = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Draw noise, times and label dropout for a data batch ``x`` (B, ...) and return the loss."""
        labels = self.check_labels(labels, x.shape[0], allow_null=False)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        r, t = self.sample_times(x.shape[0], x, generator)
        if labels is not None:
            labels = drop_labels(labels, self.class_dropout, null_class_id(self.num_classes), generator)
        return self.loss_at(model, x, noise, r, t, labels)

    def loss_at(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> LossOutput:
        """The loss for explicit noise, times and (already dropped) labels."""
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
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= upper):
            raise ValueError(f"labels must lie in [0, {upper - 1}]; got range [{int(labels.min())}, {int(labels.max())}]")
        return labels.long()
