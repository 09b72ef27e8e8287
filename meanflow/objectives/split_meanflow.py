"""SplitMeanFlow (Guo et al., ByteDance Seed; arXiv 2507.16884; FAMILY.md section F4).

The average velocity is additive over a split of its interval. For r <= s <= t with
s = r + lambda (t - r), lambda ~ U(0, 1), and two no-grad forwards of the network itself::

    z_s   = z_t - (t - s) sg(u(z_t, s, t)),
    u_tgt = sg( [(s - r) u(z_s, r, s) + (t - s) u(z_t, s, t)] / (t - r) )          (F-5)

on the rows with r < t, and the boundary term u(z_t, t, t) = v on the rows with r = t. No JVP:
no forward-mode AD, fused attention kernels throughout. MeanFlow's identity (Eq. 4) is the limit
s -> t: (t - r) / (t - s) (u_tgt - u) tends to MeanFlow's target minus u, with the network's
own velocity u(z_t, t, t) in place of v (tests/test_split_meanflow.py pins it). At either end of
the split (lambda = 0 or 1) the target is the prediction itself: no signal.

There is no official code, and the paper's body was not readable from here; what is known and
what we chose:

- The identity, its derivation from the additivity of the integral and the MeanFlow limit: the
  paper's abstract and Section 3 (Eqs. 8-11, as summarised by its reviews).
- The split: the paper writes s = (1 - lambda) t + lambda r with target (1 - lambda) u(z_s, r, s)
  + lambda u(z_t, s, t) (its Algorithm 1, as the unofficial MIT implementation
  primepake/splitmeanflow reads it, ``splitmeanflow.py`` lines 179-213). That lambda is our
  1 - lambda; with lambda ~ U(0, 1) the law is the same. ``split_low`` / ``split_high`` make it
  U(low, high) (low = high: a fixed split; 1/2 is a Shortcut-like midpoint).
- The paper distils a pretrained flow-matching teacher for speech (Seed-TTS-style latents; one-
  and two-step models in Doubao): its boundary target is the teacher's CFG-guided velocity, and it
  reports logit-normal times (the unofficial implementation's README). We train from scratch, as
  MeanFlow does: the boundary target is v, or with guidance MeanFlow's v_hat (Eq. 9-10, the
  network's own unconditional prediction mixed in at omega, kappa on [t_min, t_max];
  :func:`meanflow.objectives.guidance.guided_target_velocity`, shared with MeanFlow). The split
  rows take no guidance of their own: it reaches them through the boundary, as the teacher's
  does in the paper.
- Time law, boundary share and loss: MeanFlow's (the paper names no other for images): (r, t)
  from :class:`TimeSampler` (LN(-0.4, 1), 25% of rows r < t; the boundary share is
  1 - fraction_r_neq_t; the unofficial implementation uses 1/2), MeanFlow's adaptive weight
  (p = 1, c = 0.01) on ||u - u_tgt||^2, class dropout 0.1 (dropped rows are unconditional in both
  no-grad forwards and get v at the boundary).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import average_velocity
from ..conventions import at_least_fp32, interpolate, null_class_id
from ..samplers import AverageVelocitySampler, Sampler
from ..validation import check_fraction, check_number
from .base import NoiseTimeObjective, check_num_classes, default_of
from .guidance import TrainingGuidance, drop_labels, guided_target_velocity
from .loss import AdaptiveWeighting, LossOutput, loss_output
from .targets import predict_without_grad, split_average_velocity
from .time_sampling import TimeSampler


@dataclass(frozen=True, kw_only=True)
class SplitLaw:
    """The split fraction lambda ~ U(low, high), 0 <= low <= high <= 1; s = r + lambda (t - r)."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_fraction("split_low", self.low)
        check_number("split_high", self.high, self.low, 1.0)

    def sample(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """lambda for each row, with like's dtype and device. -> (B,)"""
        uniform = torch.rand(batch_size, device=like.device, dtype=like.dtype, generator=generator)
        return self.low + (self.high - self.low) * uniform


@dataclass(frozen=True, kw_only=True)
class SplitMeanFlowSettings:
    """The knobs of :class:`SplitMeanFlow` (``objective.split_meanflow.*``).

    Time law (MeanFlow's, spec section 3): ``distribution``, ``mu``, ``sigma``,
    ``fraction_r_neq_t`` (the rows with r = t are the boundary term), ``mask_mode``, ``r_mu``,
    ``r_sigma``. Split: lambda ~ U(``split_low``, ``split_high``). Loss: adaptive weight ``p``,
    ``c``. Guidance at the boundary (class-conditional data only): ``omega``, ``kappa``,
    ``t_min``, ``t_max``, ``class_dropout``.
    """

    distribution: str = default_of(TimeSampler, "distribution").value
    mu: float = default_of(TimeSampler, "mu")
    sigma: float = default_of(TimeSampler, "sigma")
    fraction_r_neq_t: float = default_of(TimeSampler, "fraction_r_neq_t")
    mask_mode: str = default_of(TimeSampler, "mask_mode").value
    r_mu: Optional[float] = default_of(TimeSampler, "r_mu")
    r_sigma: Optional[float] = default_of(TimeSampler, "r_sigma")
    split_low: float = default_of(SplitLaw, "low")
    split_high: float = default_of(SplitLaw, "high")
    p: float = default_of(AdaptiveWeighting, "p")
    c: float = default_of(AdaptiveWeighting, "c")
    omega: float = default_of(TrainingGuidance, "omega")
    kappa: float = default_of(TrainingGuidance, "kappa")
    t_min: float = default_of(TrainingGuidance, "t_min")
    t_max: float = default_of(TrainingGuidance, "t_max")
    class_dropout: float = default_of(TrainingGuidance, "class_dropout")

    def __post_init__(self) -> None:
        self.time_sampler(), self.split_law(), self.weighting(), self.guidance()  # each validates its fields

    def time_sampler(self) -> TimeSampler:
        return TimeSampler(distribution=self.distribution, mu=self.mu, sigma=self.sigma,
                           fraction_r_neq_t=self.fraction_r_neq_t, mask_mode=self.mask_mode, r_mu=self.r_mu,
                           r_sigma=self.r_sigma)

    def split_law(self) -> SplitLaw:
        return SplitLaw(low=self.split_low, high=self.split_high)

    def weighting(self) -> AdaptiveWeighting:
        return AdaptiveWeighting(p=self.p, c=self.c)

    def guidance(self) -> TrainingGuidance:
        return TrainingGuidance(omega=self.omega, kappa=self.kappa, t_min=self.t_min, t_max=self.t_max,
                                class_dropout=self.class_dropout)

    def to_dict(self) -> dict:
        return asdict(self)


class SplitMeanFlow(NoiseTimeObjective):
    """Train ``u_theta(z_t, r, t)`` on the interval-splitting target (module docstring, F-5).

    Each row with r < t also draws a split fraction lambda; :meth:`prediction_and_target` takes it
    explicitly. Its target takes two no-grad forwards of those rows (fp32, bare module); the
    boundary rows' guidance, when set, one more of theirs; then one gradient forward of the batch.
    """

    name = "split_meanflow"
    Settings = SplitMeanFlowSettings

    def __init__(self, settings: SplitMeanFlowSettings | None = None, num_classes: Optional[int] = None):
        self.settings = settings or SplitMeanFlowSettings()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.time_sampler = self.settings.time_sampler()
        self.split_law = self.settings.split_law()
        self.weighting = self.settings.weighting()
        self.guidance = self.settings.guidance() if num_classes is not None else None
        self.class_dropout = self.guidance.class_dropout if self.guidance is not None else 0.0

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "SplitMeanFlow":
        return cls(cls.parse_settings(settings), num_classes)

    @property
    def sampler(self) -> Sampler:
        """The network is an average velocity: Eq. 3 steps, one NFE each."""
        return AverageVelocitySampler()

    def sample_times(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator],
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        return self.time_sampler.sample(batch_size, like.device, like.dtype, generator)

    def loss(self, model, batch, labels=None, *, generator=None, progress=0.0) -> LossOutput:
        """Draw noise, times, the split and class dropout for ``x`` (B, ...); the loss."""
        x, labels, noise, r, t = self.draw(batch, labels, generator, progress)
        split = self.split_law.sample(x.shape[0], t, generator)
        if labels is not None:
            labels = drop_labels(labels, self.class_dropout, null_class_id(self.num_classes), generator)
        u, u_tgt = self.compute_with_split(model, x, noise, r, t, labels, split)  # our own draws: no checks
        return loss_output(self.weighting, u, u_tgt, noise - x, r, t)

    def loss_at(self, model, x, noise, r, t, labels=None, split=None) -> LossOutput:
        """The loss for explicit inputs (see :meth:`prediction_and_target`), all checked."""
        u, u_tgt = self.prediction_and_target(model, x, noise, r, t, labels, split)
        return loss_output(self.weighting, u, u_tgt, noise - x, r, t)

    def prediction_and_target(self, model, x, noise, r, t, labels=None, split=None) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, r, t), sg(u_tgt))`` for explicit inputs, checked: x, noise (B, ...); r, t
        (B,); labels (B,) (null id = dropped) or None; split (B,) lambda in [0, 1], required when
        some row has r < t (ignored on the r = t rows)."""
        labels = self.check_inputs(x, noise, r, t, labels)
        if split is None:
            if bool((r < t).any()):
                raise ValueError("rows with r < t need the split fraction: pass split=lambda, a (B,) tensor in [0, 1] "
                                 "(s = r + lambda (t - r))")
            split = torch.zeros_like(t)
        if split.shape != t.shape or not bool(torch.isfinite(split).all()) or \
                not bool(((split >= 0) & (split <= 1)).all()):
            raise ValueError(f"split must be a ({t.shape[0]},) tensor of finite numbers in [0, 1] (lambda, with "
                             f"s = r + lambda (t - r)); got shape {tuple(split.shape)}")
        return self.compute_with_split(model, x, noise, r, t, labels, split)

    def compute(self, model, x, noise, r, t, labels=None) -> tuple[Tensor, Tensor]:
        """The base class's hook: only for batches without r < t rows (the split is needed there)."""
        return self.prediction_and_target(model, x, noise, r, t, labels)

    def compute_with_split(self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor,
                           labels: Optional[Tensor], split: Tensor) -> tuple[Tensor, Tensor]:
        """The core, for inputs already checked: v or v_hat on the r = t rows, F-5 on the others.
        Shapes as :meth:`prediction_and_target`; returns two tensors of x's shape."""
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        v = noise - x  # (B, ...) Eq. 1
        u_tgt = at_least_fp32(v)
        boundary = (r == t).nonzero().squeeze(1)
        if boundary.numel() and self.guidance is not None:
            v_hat = guided_target_velocity(model, self.guidance, self.num_classes, z[boundary], t[boundary],
                                           v[boundary], None if labels is None else labels[boundary])
            u_tgt = u_tgt.index_copy(0, boundary, at_least_fp32(v_hat).to(u_tgt.dtype))  # Eq. 9-10
        rows = (r < t).nonzero().squeeze(1)
        if rows.numel():
            target = self.split_target(model, z[rows], r[rows], t[rows], split[rows],
                                       None if labels is None else labels[rows])
            u_tgt = u_tgt.index_copy(0, rows, target.to(u_tgt.dtype))
        u = average_velocity(model(z, r, t, labels))  # (B, ...) the one gradient forward, through any wrapper
        return u, u_tgt.detach()

    def split_target(self, model: nn.Module, z: Tensor, r: Tensor, t: Tensor, split: Tensor,
                     labels: Optional[Tensor]) -> Tensor:
        """F-5 without gradient, fp32: z (M, ...); r, t, split (M,) with r < t. -> (M, ...)"""
        z, r, t, split = (at_least_fp32(tensor) for tensor in (z, r, t, split))
        s = torch.clamp(r + split * (t - r), min=r, max=t)  # (M,) rounding must not leave [r, t]

        def velocity(z_q: Tensor, r_q: Tensor, t_q: Tensor) -> Tensor:
            return predict_without_grad(model, z_q, r_q, t_q, labels)

        return split_average_velocity(velocity, z, r, s, t)
