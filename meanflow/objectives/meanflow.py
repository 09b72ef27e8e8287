"""The MeanFlow objective (spec sections 2, 3 and 5), with the curricula of FAMILY.md F6.

F6 knobs, all off by default (then the objective is today's MeanFlow bit for bit):

- Modular MeanFlow (You, Liu, He, arXiv 2508.17426): the stop-gradient on the target becomes
  ``SG_lambda(z) = lambda z + (1 - lambda) sg(z)``, lambda warmed up from 0 over training (the
  paper's curriculum warm-up; a linear ramp to ``sg_lambda`` over the first ``sg_lambda_warmup``
  of training by default). Its gradient is ``lambda`` times the full gradient (through du/dt)
  plus ``1 - lambda`` times MeanFlow's. Only the derivative term carries it: the guided velocity
  v_hat (spec section 5) is built without gradient as always. The gradient through du/dt is
  reverse mode over the forward-mode ``torch.func.jvp`` (its tangent output is differentiable
  like any tensor; tests/test_meanflow_schedules.py checks it against a double-backward JVP), so
  lambda > 0 needs ``derivative='jvp'``: 'two_pass' and 'finite_difference' compute du/dt
  without gradient and are refused at construction, and so is data parallelism (the gradient
  through the tangent runs on the bare module, past DDP's or FSDP's gradient hooks).
- The r != t curricula (arXiv 2511.19065, "learn the instantaneous velocity first, then shift
  the gaps from short to long"): the share of r != t ramps from ``fraction_r_neq_t_start`` to
  ``fraction_r_neq_t``, and a factor on the gaps (t - r) from ``gap_scale_start`` to 1
  (:class:`~meanflow.objectives.time_sampling.TimeSampler`). The paper reweights the
  average-velocity loss by the gap; a schedule on the law of the gaps is our rendering of the
  same "short gaps first" idea (its code, seahl0119/ImprovedMeanFlow, was not available to us).

The curricula are :class:`~meanflow.objectives.schedules.Ramp` records over training progress.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import average_velocity
from ..conventions import at_least_fp32, autocast_off, broadcast_like, interpolate
from ..jvp import (Derivative, finite_difference_along_flow, jvp_along_flow, one_pass_along_flow, one_pass_tangent,
                   tangent_along_flow)
from ..samplers import AverageVelocitySampler, Sampler
from ..validation import check_fraction, check_number, check_positive, parse_enum
from ..wrappers import is_data_parallel, unwrap
from .base import NoiseTimeObjective, check_num_classes, default_of
from .guidance import GuidedVelocity, TrainingGuidance, guided_target_velocity, rows_the_gradient_forward_predicts
from .loss import AdaptiveWeighting, LossOutput, loss_output
from .schedules import Ramp, RampShape
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

    Curricula over training progress (FAMILY.md F6, module docstring; every shape is a
    :class:`~meanflow.objectives.schedules.RampShape`, ``schedule_steepness`` is the sigmoid's):
    ``fraction_r_neq_t_start`` (None: no schedule), ramping to ``fraction_r_neq_t`` by
    ``share_schedule`` over ``[share_begin, share_finish]``; ``gap_scale_start`` in (0, 1]
    (1: no schedule), ramping to 1 by ``gap_schedule`` over ``[gap_begin, gap_finish]``;
    Modular MeanFlow's ``sg_lambda`` in [0, 1] (0: plain stop-gradient), reached from 0 by
    ``sg_lambda_schedule`` over the first ``sg_lambda_warmup`` of training ('constant': no
    warm-up); sg_lambda > 0 needs derivative='jvp'.
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
    fraction_r_neq_t_start: Optional[float] = None
    share_schedule: str = RampShape.LINEAR.value
    share_begin: float = 0.0
    share_finish: float = 1.0
    gap_scale_start: float = 1.0
    gap_schedule: str = RampShape.LINEAR.value
    gap_begin: float = 0.0
    gap_finish: float = 1.0
    sg_lambda: float = 0.0
    sg_lambda_schedule: str = RampShape.LINEAR.value
    sg_lambda_warmup: float = 0.0
    schedule_steepness: float = 25.0

    def __post_init__(self) -> None:
        derivative = parse_enum(Derivative, self.derivative, "derivative")
        check_positive("finite_difference_step", self.finite_difference_step)
        self.time_sampler(), self.weighting(), self.guidance()  # each record validates its fields
        check_modulation(self.modulation(), derivative)

    def time_sampler(self) -> TimeSampler:
        return TimeSampler(distribution=self.distribution, mu=self.mu, sigma=self.sigma,
                           fraction_r_neq_t=self.fraction_r_neq_t, mask_mode=self.mask_mode, r_mu=self.r_mu,
                           r_sigma=self.r_sigma, share_ramp=self.share_ramp(), gap_ramp=self.gap_ramp())

    def share_ramp(self) -> Optional[Ramp]:
        """The share of r != t over progress, or None for ``fraction_r_neq_t`` throughout."""
        if self.fraction_r_neq_t_start is None:
            return None
        check_fraction("fraction_r_neq_t_start", self.fraction_r_neq_t_start)
        return Ramp(shape=self.share_schedule, start=self.fraction_r_neq_t_start, end=self.fraction_r_neq_t,
                    begin=self.share_begin, finish=self.share_finish, steepness=self.schedule_steepness)

    def gap_ramp(self) -> Optional[Ramp]:
        """The factor on the gaps (t - r) over progress, or None for the base law throughout."""
        check_number("gap_scale_start", self.gap_scale_start, 0.0, 1.0, low_open=True)
        if self.gap_scale_start == 1.0:
            return None
        return Ramp(shape=self.gap_schedule, start=self.gap_scale_start, end=1.0, begin=self.gap_begin,
                    finish=self.gap_finish, steepness=self.schedule_steepness)

    def modulation(self) -> Optional[Ramp]:
        """Modular MeanFlow's lambda over progress (warmed up from 0), or None for lambda = 0."""
        check_fraction("sg_lambda", self.sg_lambda)
        check_fraction("sg_lambda_warmup", self.sg_lambda_warmup)
        if self.sg_lambda == 0.0:
            return None
        shape = parse_enum(RampShape, self.sg_lambda_schedule, "sg_lambda_schedule")
        start = self.sg_lambda if shape is RampShape.CONSTANT else 0.0
        return Ramp(shape=shape, start=start, end=self.sg_lambda, begin=0.0, finish=self.sg_lambda_warmup,
                    steepness=self.schedule_steepness)

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
        modulation: Modular MeanFlow's lambda over training progress (module docstring), values
            in [0, 1]; None is lambda = 0, the plain stop-gradient. lambda > 0 needs
            ``Derivative.JVP``.

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
        modulation: Ramp | None = None,
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
        check_modulation(modulation, self.derivative)
        self.modulation = modulation

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "MeanFlow":
        """MeanFlow from its settings record (or dict); guidance applies to class-conditional data only."""
        settings = cls.parse_settings(settings)
        guidance = settings.guidance() if num_classes is not None else None
        return cls(settings.time_sampler(), weighting=settings.weighting(), num_classes=num_classes,
                   guidance=guidance, derivative=settings.derivative,
                   finite_difference_step=settings.finite_difference_step, modulation=settings.modulation())

    @property
    def sampler(self) -> Sampler:
        """The network is an average velocity: Eq. 3 steps, one NFE each."""
        return AverageVelocitySampler()

    def check_parallel(self, data_parallel: bool, sharded: bool) -> None:
        if data_parallel and self.modulation is not None:
            raise ValueError("objective.meanflow.sg_lambda > 0 back-propagates through the JVP's tangent, which "
                             "runs on the bare module past the data-parallel gradient hooks; train on one process "
                             "or set --set objective.meanflow.sg_lambda=0")
        if data_parallel and not sharded and self.derivative is Derivative.JVP:
            raise ValueError("objective.meanflow.derivative='jvp' cannot run through DistributedDataParallel (the "
                             "JVP would bypass gradient synchronisation); use --set objective.meanflow.derivative="
                             "two_pass (the default; Python: derivative='two_pass') or --set training.parallel=fsdp")

    def sample_times(self, batch_size: int, like: Tensor, generator: torch.Generator | None,
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        return self.time_sampler.sample(batch_size, like.device, like.dtype, generator, progress)

    def modulation_at(self, progress: float) -> float:
        """Modular MeanFlow's lambda at training ``progress`` (0 without a schedule)."""
        return 0.0 if self.modulation is None else self.modulation(progress)

    whole_step_compile = True

    def loss_from_draws(self, model, x, noise, r, t, labels, progress: float = 0.0) -> LossOutput:
        """The loss of drawn inputs at ``progress`` (unchecked; what ``training.compile`` compiles)."""
        u, u_tgt = self.compute(model, x, noise, r, t, labels, progress=progress)
        return self._loss_output(u, u_tgt, noise - x, r, t, progress)

    def loss_at(self, model, x, noise, r, t, labels=None, *, progress: float = 0.0) -> LossOutput:
        """The loss for explicit noise, times and (already dropped) labels at ``progress``, checked."""
        u, u_tgt = self.prediction_and_target(model, x, noise, r, t, labels, progress=progress)
        return self._loss_output(u, u_tgt, noise - x, r, t, progress)

    def prediction_and_target(self, model, x, noise, r, t, labels=None, *, progress: float = 0.0):
        """``(u_theta(z_t, r, t), SG_lambda(u_tgt))`` for explicit inputs at ``progress``, checked."""
        check_number("progress", progress, 0.0, 1.0)
        labels = self.check_inputs(x, noise, r, t, labels)
        return self.compute(model, x, noise, r, t, labels, progress=progress)

    def _loss_output(self, u: Tensor, u_tgt: Tensor, v: Tensor, r: Tensor, t: Tensor, progress: float) -> LossOutput:
        """Eq. 7-8 and their metrics, plus the values of the curricula that are on."""
        out = loss_output(self.weighting, u, u_tgt, v, r, t)
        if self.modulation is not None:
            out.metrics["sg_lambda"] = torch.full((), self.modulation(progress), device=u.device)
        if self.time_sampler.gap_ramp is not None:
            out.metrics["gap_scale"] = torch.full((), self.time_sampler.gap_scale_at(progress), device=u.device)
        return out

    def compute(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None,
        *, progress: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, r, t), SG_lambda(u_tgt))`` for explicit inputs, each of x's shape.

        x, noise: (B, ...); r, t: (B,) with r <= t; labels: (B,) with the null id marking samples
        whose class was dropped (they get the plain velocity), or None when unconditional;
        progress: training progress, for Modular MeanFlow's lambda (module docstring). With
        lambda = 0 (the default) the target is ``sg(u_tgt)``, detached.
        Deterministic given its inputs (up to dropout inside the model). Called through
        :meth:`prediction_and_target` (which checks the inputs) or by :meth:`loss`.
        """
        modulation = self.modulation_at(progress)
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        v = noise - x  # (B, ...) Eq. 1
        moving = (r < t).nonzero().squeeze(1)  # indices of samples that pay for the derivative
        # The r = t rows' conditional predictions (Eq. 10, kappa > 0) come from the gradient forward.
        deferred = rows_the_gradient_forward_predicts(z, r, t)
        guided = GuidedVelocity(model, self.guidance, self.num_classes, z, t, v, labels, deferred)  # Eq. 9-10
        low_precision = torch.is_autocast_enabled(z.device.type)
        v_hat = guided.v_hat  # (B, ...), final on the moving rows (the tangent's direction)
        if self.derivative is Derivative.JVP:
            u, dudt = self._single_pass(model, z, r, t, labels, v_hat, moving)
        elif self.derivative is Derivative.TWO_PASS and one_pass_tangent(model) and not low_precision:
            # One pass needs the primal's intermediate values in fp32; under autocast the tangent
            # runs apart, in fp32, as below.
            out, dudt = one_pass_along_flow(model, z, r, t, labels, at_least_fp32(v_hat[moving]), moving)
            u = out.u
        else:
            dudt = self._derivative_without_grad(model, z, r, t, labels, v_hat, moving)
            u = average_velocity(model(z, r, t, labels))  # (B, ...) the one gradient forward, through any wrapper
        u_tgt = at_least_fp32(guided.complete(u))
        dudt = at_least_fp32(dudt).to(u_tgt.dtype)
        gap = broadcast_like((t - r)[moving], dudt).to(u_tgt.dtype)
        u_tgt = u_tgt.index_add(0, moving, -gap * dudt)  # Eq. 6 on the r != t rows (none: unchanged)
        if modulation == 0.0:
            return u, u_tgt.detach()
        # SG_lambda: the value of u_tgt, a share lambda of its gradient (through du/dt alone).
        return u, modulation * u_tgt + (1.0 - modulation) * u_tgt.detach()

    def guided_target_velocity(
        self, model: nn.Module, z: Tensor, t: Tensor, v: Tensor, labels: Optional[Tensor]
    ) -> Tensor:
        """v_hat (Eq. 9-10) where guidance applies (label kept, t in the interval), else v
        (:func:`meanflow.objectives.guidance.guided_target_velocity`, which SplitMeanFlow shares)."""
        return guided_target_velocity(model, self.guidance, self.num_classes, z, t, v, labels)

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
        with autocast_off(z):  # the bare module: forward-mode AD through torch.compile is not assumed to work
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
        with torch.no_grad(), autocast_off(z):
            if self.derivative is Derivative.TWO_PASS:
                return tangent_along_flow(bare, *rows)
            return finite_difference_along_flow(bare, *rows, step=self.finite_difference_step)


def check_modulation(modulation: Optional[Ramp], derivative: Derivative) -> None:
    """Refuse a Modular MeanFlow lambda outside [0, 1], or > 0 with a derivative without gradient."""
    if modulation is None:
        return
    modulation.check_values("sg_lambda", 0.0, 1.0)
    if modulation.bounds[1] > 0.0 and derivative is not Derivative.JVP:
        raise ValueError(f"sg_lambda > 0 (Modular MeanFlow) needs the gradient through du/dt, which "
                         f"derivative={derivative.value!r} computes without gradient; use derivative='jvp' "
                         "(--set objective.meanflow.derivative=jvp) or sg_lambda=0")


def _rows_for_jvp(z, r, t, labels, v_hat, rows):
    """The JVP's inputs (z, r, t, labels, tangent) for the given rows, promoted to fp32 or wider."""
    picked = [at_least_fp32(tensor[rows]) for tensor in (z, r, t)]
    return (*picked, None if labels is None else labels[rows], at_least_fp32(v_hat[rows]))

