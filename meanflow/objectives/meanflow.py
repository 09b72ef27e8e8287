"""The MeanFlow objective (spec sections 2, 3 and 5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import average_velocity
from ..conventions import at_least_fp32, broadcast_like, interpolate, null_class_id
from ..jvp import Derivative, finite_difference_along_flow, jvp_along_flow, tangent_along_flow
from ..samplers import AverageVelocitySampler, Sampler
from ..validation import check_positive, parse_enum
from ..wrappers import is_data_parallel, unwrap
from .base import NoiseTimeObjective, check_num_classes, default_of
from .guidance import TrainingGuidance, guided_velocity
from .loss import AdaptiveWeighting
from .time_sampling import TimeSampler


@dataclass(frozen=True, kw_only=True)
class MeanFlowSettings:
    """The knobs of :class:`MeanFlow`, as the config holds them (``objective.meanflow.*``).

    Time law (spec section 3): ``distribution`` with ``mu``, ``sigma``; ``fraction_r_neq_t``,
    ``mask_mode``; optional own law of r (``r_mu``, ``r_sigma``). Loss (section 2): adaptive
    weight ``p``, ``c``. Derivative (section 3): ``derivative`` ('two_pass' default: exact,
    DDP/FSDP-safe and the fastest; 'jvp': torch.func.jvp in one pass, refuses DDP;
    'finite_difference': approximate, the paper's ablation) and its ``finite_difference_step``.
    Guidance in the target (section 5, class-conditional data only): ``omega``, ``kappa``,
    interval ``[t_min, t_max]``, ``class_dropout``.
    """

    # Defaults come from the records these fields build, so there is one copy of each.
    distribution: str = default_of(TimeSampler, "distribution").value
    mu: float = default_of(TimeSampler, "mu")
    sigma: float = default_of(TimeSampler, "sigma")
    fraction_r_neq_t: float = default_of(TimeSampler, "fraction_r_neq_t")
    mask_mode: str = default_of(TimeSampler, "mask_mode").value
    r_mu: Optional[float] = default_of(TimeSampler, "r_mu")
    r_sigma: Optional[float] = default_of(TimeSampler, "r_sigma")
    p: float = default_of(AdaptiveWeighting, "p")
    c: float = default_of(AdaptiveWeighting, "c")
    derivative: str = Derivative.TWO_PASS.value
    finite_difference_step: float = 1e-3
    omega: float = default_of(TrainingGuidance, "omega")
    kappa: float = default_of(TrainingGuidance, "kappa")
    t_min: float = default_of(TrainingGuidance, "t_min")
    t_max: float = default_of(TrainingGuidance, "t_max")
    class_dropout: float = default_of(TrainingGuidance, "class_dropout")

    def __post_init__(self) -> None:
        parse_enum(Derivative, self.derivative, "derivative")
        check_positive("finite_difference_step", self.finite_difference_step)
        self.time_sampler(), self.weighting(), self.guidance()  # each record validates its fields

    def time_sampler(self) -> TimeSampler:
        return TimeSampler(distribution=self.distribution, mu=self.mu, sigma=self.sigma,
                           fraction_r_neq_t=self.fraction_r_neq_t, mask_mode=self.mask_mode, r_mu=self.r_mu,
                           r_sigma=self.r_sigma)

    def weighting(self) -> AdaptiveWeighting:
        return AdaptiveWeighting(p=self.p, c=self.c)

    def guidance(self) -> TrainingGuidance:
        return TrainingGuidance(omega=self.omega, kappa=self.kappa, t_min=self.t_min, t_max=self.t_max,
                                class_dropout=self.class_dropout)

    def to_dict(self) -> dict:
        return asdict(self)


class MeanFlow(NoiseTimeObjective):
    """Train ``u_theta(z_t, r, t)`` on the MeanFlow target (Eq. 6)::

        u_tgt = sg( v_hat - (t - r) d/dt u_theta(z_t, r, t) ),   tangent (v_hat, dr = 0, dt = 1)

    with the adaptive loss of Eq. 7-8.

    Args:
        time_sampler: the law of (r, t) and the share of samples with r != t.
        weighting: adaptive loss weighting (p, c).
        num_classes: None for unconditional data, else the number of classes (null id = num_classes).
        guidance: guidance inside the target and class dropout (class-conditional only). None
            means no guidance and no class dropout.
        derivative: how d/dt u is computed (:class:`meanflow.jvp.Derivative`).
        finite_difference_step: h for ``Derivative.FINITE_DIFFERENCE``.

    Only samples with r != t pay for the derivative: for the others ``(t - r) d/dt u`` is zero,
    so the JVP runs on the r != t subset alone. The JVP, the target and the loss run in fp32 with
    autocast disabled, whatever precision the rest of the forward uses.
    """

    name = "meanflow"
    Settings = MeanFlowSettings

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        *,
        weighting: AdaptiveWeighting | None = None,
        num_classes: Optional[int] = None,
        guidance: TrainingGuidance | None = None,
        derivative: Derivative | str = Derivative.TWO_PASS,
        finite_difference_step: float = 1e-3,
    ):
        self.time_sampler = time_sampler or TimeSampler()
        self.weighting = weighting or AdaptiveWeighting()
        check_num_classes(num_classes)
        if guidance is not None and num_classes is None:
            raise ValueError("guidance needs class labels: set num_classes, or pass guidance=None")
        self.num_classes = num_classes
        self.guidance = guidance
        self.class_dropout = guidance.class_dropout if guidance is not None else 0.0
        self.derivative = parse_enum(Derivative, derivative, "derivative")
        check_positive("finite_difference_step", finite_difference_step)
        self.finite_difference_step = finite_difference_step

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "MeanFlow":
        """MeanFlow from its settings record (or dict); guidance applies to class-conditional data only."""
        settings = cls.parse_settings(settings)
        guidance = settings.guidance() if num_classes is not None else None
        return cls(settings.time_sampler(), weighting=settings.weighting(), num_classes=num_classes,
                   guidance=guidance, derivative=settings.derivative,
                   finite_difference_step=settings.finite_difference_step)

    @property
    def sampler(self) -> Sampler:
        """The network is an average velocity: Eq. 3 steps, one NFE each."""
        return AverageVelocitySampler()

    def check_parallel(self, data_parallel: bool, sharded: bool) -> None:
        if data_parallel and not sharded and self.derivative is Derivative.JVP:
            raise ValueError("objective.meanflow.derivative='jvp' cannot run through DistributedDataParallel (the "
                             "JVP would bypass gradient synchronisation); use --set objective.meanflow.derivative="
                             "two_pass (the default; Python: derivative='two_pass') or --set training.parallel=fsdp")

    def sample_times(self, batch_size: int, like: Tensor, generator: torch.Generator | None,
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        return self.time_sampler.sample(batch_size, like.device, like.dtype, generator)

    def compute(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, r, t), sg(u_tgt))`` for explicit inputs, each of x's shape.

        x, noise: (B, ...); r, t: (B,) with r <= t; labels: (B,) with the null id marking samples
        whose class was dropped (they get the plain velocity), or None when unconditional.
        Deterministic given its inputs (up to dropout inside the model). Called through
        :meth:`prediction_and_target` (which checks the inputs) or by :meth:`loss`.
        """
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        v = noise - x  # (B, ...) Eq. 1
        v_hat = self.guided_target_velocity(model, z, t, v, labels)  # (B, ...) Eq. 9-10
        moving = (r < t).nonzero().squeeze(1)  # indices of samples that pay for the derivative
        if self.derivative is Derivative.JVP:
            u, dudt = self._single_pass(model, z, r, t, labels, v_hat, moving)
        else:
            dudt = self._derivative_without_grad(model, z, r, t, labels, v_hat, moving)
            u = average_velocity(model(z, r, t, labels))  # (B, ...) the one gradient forward, through any wrapper
        u_tgt = at_least_fp32(v_hat)
        if moving.numel():
            dudt = at_least_fp32(dudt).to(u_tgt.dtype)
            gap = broadcast_like((t - r)[moving], dudt).to(u_tgt.dtype)
            u_tgt = u_tgt.index_add(0, moving, -gap * dudt)  # Eq. 6 on the r != t rows
        return u, u_tgt.detach()

    def guided_target_velocity(
        self, model: nn.Module, z: Tensor, t: Tensor, v: Tensor, labels: Optional[Tensor]
    ) -> Tensor:
        """v_hat (Eq. 9-10) where guidance applies (label kept, t in the interval), else v."""
        guidance = self.guidance
        if guidance is None or labels is None or not guidance.needs_model_predictions:
            return v
        null = null_class_id(self.num_classes)
        guided = (labels != null) & (t >= guidance.t_min) & (t <= guidance.t_max)
        rows = guided.nonzero().squeeze(1)
        if rows.numel() == 0:
            return v
        bare = unwrap(model)
        z_g, t_g = z[rows], t[rows]
        with torch.no_grad(), _fp32(z):  # v_hat is part of the target: fp32 (spec section 8)
            z_g, t_g = at_least_fp32(z_g), at_least_fp32(t_g)
            null_labels = torch.full_like(labels[rows], null)
            if guidance.needs_conditional_prediction:
                # One forward of 2n rows: unconditional then conditional, both at r = t.
                both = average_velocity(bare(torch.cat([z_g, z_g]), torch.cat([t_g, t_g]), torch.cat([t_g, t_g]),
                                             torch.cat([null_labels, labels[rows]])))
                v_unc, v_cond = both.chunk(2)
            else:
                v_unc, v_cond = average_velocity(bare(z_g, t_g, t_g, null_labels)), None
        mixed = guided_velocity(v[rows], v_unc.to(v.dtype), None if v_cond is None else v_cond.to(v.dtype),
                                guidance.omega, guidance.kappa)
        return v.index_copy(0, rows, mixed)

    def _single_pass(
        self, model: nn.Module, z: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor], v_hat: Tensor, moving: Tensor
    ) -> tuple[Tensor, Tensor]:
        """u for the whole batch and du/dt for the ``moving`` rows; the JVP primal carries gradient."""
        if moving.numel() == 0:
            return average_velocity(model(z, r, t, labels)), z.new_zeros((0, *z.shape[1:]))
        if is_data_parallel(model):
            raise ValueError(
                "derivative='jvp' cannot run through DistributedDataParallel (the JVP would bypass gradient "
                "synchronisation); use derivative='two_pass'"
            )
        resting = (r == t).nonzero().squeeze(1)
        with _fp32(z):  # the bare module: forward-mode AD through torch.compile is not assumed to work
            u_moving, dudt = jvp_along_flow(unwrap(model), *_rows_for_jvp(z, r, t, labels, v_hat, moving))
        if resting.numel() == 0:
            return u_moving, dudt
        u_resting = average_velocity(model(z[resting], r[resting], t[resting],
                                            None if labels is None else labels[resting]))
        order = torch.cat([moving, resting]).argsort()  # back to batch order
        return torch.cat([u_moving.to(u_resting.dtype), u_resting])[order], dudt

    def _derivative_without_grad(
        self, model: nn.Module, z: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor], v_hat: Tensor, moving: Tensor
    ) -> Tensor:
        """du/dt for the ``moving`` rows on the bare module, without gradient. -> (M, ...)"""
        if moving.numel() == 0:
            return z.new_zeros((0, *z.shape[1:]))
        bare = unwrap(model)
        rows = _rows_for_jvp(z, r, t, labels, v_hat, moving)
        with torch.no_grad(), _fp32(z):
            if self.derivative is Derivative.TWO_PASS:
                return tangent_along_flow(bare, *rows)
            return finite_difference_along_flow(bare, *rows, step=self.finite_difference_step)


def _rows_for_jvp(z, r, t, labels, v_hat, rows):
    """The JVP's inputs (z, r, t, labels, tangent) for the given rows, promoted to fp32 or wider."""
    picked = [at_least_fp32(tensor[rows]) for tensor in (z, r, t)]
    return (*picked, None if labels is None else labels[rows], at_least_fp32(v_hat[rows]))


def _fp32(like: Tensor):
    """Autocast off: the JVP and the target stay in fp32 (spec section 8)."""
    return torch.autocast(device_type=like.device.type, enabled=False)
