"""Drawing the two times (r, t) of each training sample (spec section 3)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..validation import check_fraction, check_number, check_positive, parse_enum
from .schedules import Ramp


class TimeDistribution(str, enum.Enum):
    """How a single time is drawn."""

    LOGIT_NORMAL = "logit_normal"  # sigmoid(N(mu, sigma^2))
    UNIFORM = "uniform"  # U(0, 1)


class MaskMode(str, enum.Enum):
    """Which samples of a batch get r = t.

    RANDOM: each sample independently with probability ``1 - fraction_r_neq_t`` (the default; the
        share varies from batch to batch around its expectation).
    PREFIX: exactly ``round((1 - fraction_r_neq_t) * B)`` samples, the first ones of the batch (of
        each process's batch under data parallelism), so every batch has the same share.
    """

    RANDOM = "random"
    PREFIX = "prefix"


@dataclass(frozen=True, kw_only=True)
class TimeSampler:
    """Samples (r, t) with 0 <= r <= t <= 1 for a batch.

    Two times are drawn independently from ``distribution`` and sorted, ``t = max``, ``r = min``.
    When ``r_mu`` / ``r_sigma`` are given, ``r`` instead has its own logit-normal law and
    ``r = min(r, t)`` (the later CIFAR-10 recipe). Finally ``r := t`` for a share
    ``1 - fraction_r_neq_t`` of the samples, chosen by ``mask_mode``.

    Curricula over training progress (FAMILY.md F6, "learn the instantaneous velocity first,
    then shift the gaps from short to long", arXiv 2511.19065), both off by default:

    - ``share_ramp``: the share of r != t at each progress (it replaces ``fraction_r_neq_t``);
    - ``gap_ramp``: a factor ``g`` in (0, 1] on the gaps, ``r := t - g (t - r)``: the law of
      (t - r) is the base law shrunk by ``g``, so gaps start short and grow to the base law
      as ``g`` reaches 1.

    Defaults are the paper's ImageNet settings: LN(-0.4, 1.0), 25% of samples with r != t.
    """

    distribution: TimeDistribution = TimeDistribution.LOGIT_NORMAL
    mu: float = -0.4
    sigma: float = 1.0
    fraction_r_neq_t: float = 0.25
    mask_mode: MaskMode = MaskMode.RANDOM
    r_mu: Optional[float] = None
    r_sigma: Optional[float] = None
    share_ramp: Optional[Ramp] = None
    gap_ramp: Optional[Ramp] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "distribution", parse_enum(TimeDistribution, self.distribution, "distribution"))
        object.__setattr__(self, "mask_mode", parse_enum(MaskMode, self.mask_mode, "mask_mode"))
        check_number("mu", self.mu)
        check_positive("sigma", self.sigma)
        check_fraction("fraction_r_neq_t", self.fraction_r_neq_t)
        if (self.r_mu is None) != (self.r_sigma is None):
            raise ValueError("r_mu and r_sigma must be given together (or neither)")
        if self.r_sigma is not None:
            check_number("r_mu", self.r_mu)
            check_positive("r_sigma", self.r_sigma)
        if self.r_mu is not None and self.distribution is not TimeDistribution.LOGIT_NORMAL:
            raise ValueError("a separate law for r (r_mu, r_sigma) requires distribution='logit_normal'")
        if self.share_ramp is not None:
            self.share_ramp.check_values("fraction_r_neq_t", 0.0, 1.0)
        if self.gap_ramp is not None:
            self.gap_ramp.check_values("gap scale", 0.0, 1.0, low_open=True)

    def fraction_at(self, progress: float) -> float:
        """The share of samples with r != t at training ``progress``."""
        return self.fraction_r_neq_t if self.share_ramp is None else self.share_ramp(progress)

    def gap_scale_at(self, progress: float) -> float:
        """The factor on the gaps (t - r) at training ``progress`` (1: the base law)."""
        return 1.0 if self.gap_ramp is None else self.gap_ramp(progress)

    def draw(self, batch_size: int, mu: float, sigma: float, device, dtype, generator) -> Tensor:
        """One time per sample from ``distribution`` with the given (mu, sigma). -> (B,)"""
        if self.distribution is TimeDistribution.UNIFORM:
            return torch.rand(batch_size, device=device, dtype=dtype, generator=generator)
        normal = torch.randn(batch_size, device=device, dtype=dtype, generator=generator)
        return torch.sigmoid(normal * sigma + mu)

    def sample(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        progress: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(r, t)``, each (B,), with ``r <= t`` and ``r == t`` where the mask says so;
        ``progress`` in [0, 1] drives the share and gap curricula (class docstring)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        first = self.draw(batch_size, self.mu, self.sigma, device, dtype, generator)
        if self.r_mu is None:
            second = self.draw(batch_size, self.mu, self.sigma, device, dtype, generator)
            t, r = torch.maximum(first, second), torch.minimum(first, second)
        else:
            t = first
            r = self.draw(batch_size, self.r_mu, self.r_sigma, device, dtype, generator)
        equal = self.equal_mask(batch_size, device, generator, self.fraction_at(progress))
        r = torch.where(equal, t, r)
        scale = self.gap_scale_at(progress)
        if scale != 1.0:  # skipped at 1 so that no curriculum leaves r bit for bit as drawn
            r = t - scale * (t - r)
        return torch.minimum(r, t), t

    def equal_mask(self, batch_size: int, device, generator: torch.Generator | None,
                   fraction_r_neq_t: Optional[float] = None) -> Tensor:
        """(B,) bool, True where the sample gets r = t; the share of r != t is
        ``fraction_r_neq_t`` (default: the record's)."""
        fraction = self.fraction_r_neq_t if fraction_r_neq_t is None else fraction_r_neq_t
        if self.mask_mode is MaskMode.PREFIX:
            num_equal = round((1.0 - fraction) * batch_size)
            return torch.arange(batch_size, device=device) < num_equal
        uniform = torch.rand(batch_size, device=device, generator=generator)
        return uniform >= fraction
