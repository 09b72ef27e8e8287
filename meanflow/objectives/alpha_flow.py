"""alpha-Flow (Zhang et al., Snap; arXiv 2510.20771; FAMILY.md F2).

MeanFlow's loss is trajectory flow matching plus trajectory consistency, whose gradients
conflict; alpha-Flow anneals from the first to MeanFlow. With Delta = alpha (t - r), alpha in
(0, 1], the target on the rows with r < t is::

    u_tgt = [ Delta v + (t - r - Delta) sg(u_theta(z_t - Delta v, r, t - Delta)) ] / (t - r)   (F-3)
          = alpha v + (1 - alpha) sg(u_theta(z_t - Delta v, r, t - Delta))

and v on the rows with r = t; v is the guided velocity v_hat of MeanFlow (spec section 5) where
guidance is on. alpha = 1 is trajectory flow matching (u_tgt = v: no network call); below the
threshold alpha is 0 and the target is MeanFlow's own (Eq. 6, its JVP and derivative backends).

What the limit alpha -> 0 means, exactly: the target itself tends to sg(u_theta(z_t, r, t)), and
    u_theta + (u_tgt - u_theta) / alpha  ->  v - (t - r) du_theta/dt   (Eq. 6), error O(alpha),
i.e. the regression's gradient divided by alpha tends to MeanFlow's. For the exact field the
error of F-3 is O(alpha^2 (t - r)): z_t - Delta v is one Euler step, on the trajectory only where
the trajectories are straight, so F-3 is exact for every alpha only for straight flows (point-mass
data) and alpha = 1 regresses u onto the instantaneous velocity v (tests/test_alpha_flow.py).

The loss is MeanFlow's adaptive loss (Eq. 7-8) with the weight of each row with r < t scaled by
alpha (rows with r = t, and every row once alpha = 0, keep weight 1).

What F2 leaves open, as the official code settles it (snap-research/alphaflow, commit b0fef77,
``src/training/loss.py``, class ``AlphaFlowLoss``):

- the curriculum (``get_ratio``): ``alpha = start + (end - start) sigmoid(gamma (step - middle) /
  (end_step - init_step))`` inside [init_step, end_step], ``start`` before and ``end`` after, then
  snapped: ``alpha < clamp`` -> 0 (the exact JVP target) and ``alpha > 1 - clamp`` -> 1; the
  recipes (``infra/experiments/experiments-alphaflow.yaml``) take start 1, end 0, gamma 25,
  clamp 0.005 over the whole run (B/2) or over steps 600k-1M of 1.2M (XL/2). Here: a sigmoid
  :class:`~meanflow.objectives.schedules.Ramp` over progress and ``alpha_threshold``;
- the weight (``forward``): ``alpha / (L + eps)`` on the rows with a discrete step (r != t and
  alpha > 0), ``1 / (L + eps)`` elsewhere, L the per-sample MEAN of squares, eps 1e-3 (the
  loss config as forked in eunso999/alphaFlow ``configs/loss/alphaflow.yaml``; the stored
  official snapshot lacks that file). Our L is the SUM over dimensions (Eq. 7), so c = 1e-3 D
  gives the official weights (the ImageNet presets set it);
- times (``sample_traj_params``): a share ``ratio_fm`` of the batch (the first rows) has r = t
  with t ~ LN(-0.4, 1); the rest has (r, t) = (min, max) of two LN(-0.4, 1) draws: our
  :class:`~meanflow.objectives.time_sampling.TimeSampler` with fraction_r_neq_t = 1 - ratio_fm
  ('prefix' picks the first rows, 'random' per row);
- at alpha = 1 the discrete target is v and the network is not called (``_compute_mean_velocity_d``);
  the discrete target is clipped to [-clamp_utgt, clamp_utgt] (4.0 in the XL/2 recipe): our
  ``target_clamp`` (None: no clipping);
- the discrete target uses the guided velocity both as the step and as the first term, and the
  JVP branch uses it as the tangent, as MeanFlow does. The official guidance differs in details
  we do not copy: its interval is open (t_min < t < t_max), labels are dropped only inside it and
  its network drops labels itself (``label_dropout``); ours is MeanFlow's (spec section 5).
  Its DiT embeds (t, r), ours (t, t - r).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import average_velocity
from ..conventions import at_least_fp32, broadcast_like, interpolate, null_class_id
from ..jvp import Derivative
from ..samplers import AverageVelocitySampler, Sampler
from ..validation import check_number, check_positive
from .base import NoiseTimeObjective, check_num_classes, default_of
from .guidance import GuidedVelocity, drop_labels, rows_the_gradient_forward_predicts
from .loss import LossOutput, loss_output
from .meanflow import MeanFlow, MeanFlowSettings
from .schedules import Ramp, RampShape
from .targets import predict_without_grad

# The knobs alpha-Flow shares with MeanFlow, validated by MeanFlowSettings.
_SHARED = ("distribution", "mu", "sigma", "fraction_r_neq_t", "mask_mode", "p", "c", "derivative",
           "finite_difference_step", "omega", "kappa", "t_min", "t_max", "class_dropout")


@dataclass(frozen=True, kw_only=True)
class AlphaFlowSettings:
    """The knobs of :class:`AlphaFlow` (``objective.alpha_flow.*``).

    Curriculum of alpha over training progress: ``alpha_schedule`` (a
    :class:`~meanflow.objectives.schedules.RampShape`; 'sigmoid' is the official one) from
    ``alpha_start`` (1: trajectory flow matching) to ``alpha_end`` (0: MeanFlow) over
    ``[alpha_begin, alpha_finish]``, sigmoid ``alpha_steepness``; below ``alpha_threshold`` alpha
    is 0 (the exact JVP target, Eq. 6) and above ``1 - alpha_threshold`` it is 1.
    ``target_clamp``: the F-3 target is clipped to [-target_clamp, target_clamp] (None: not).
    The rest are MeanFlow's, with its defaults: the time law (``distribution``, ``mu``,
    ``sigma``, ``fraction_r_neq_t``, ``mask_mode``), the adaptive weight ``p``, ``c`` (scaled by
    alpha on the rows with r != t), the derivative of the alpha = 0 target (``derivative``,
    ``finite_difference_step``) and guidance in the target (``omega``, ``kappa``, ``t_min``,
    ``t_max``, ``class_dropout``).
    """

    alpha_schedule: str = RampShape.SIGMOID.value
    alpha_start: float = 1.0
    alpha_end: float = 0.0
    alpha_begin: float = 0.0
    alpha_finish: float = 1.0
    alpha_steepness: float = 25.0
    alpha_threshold: float = 0.005
    target_clamp: Optional[float] = None
    distribution: str = default_of(MeanFlowSettings, "distribution")
    mu: float = default_of(MeanFlowSettings, "mu")
    sigma: float = default_of(MeanFlowSettings, "sigma")
    fraction_r_neq_t: float = default_of(MeanFlowSettings, "fraction_r_neq_t")
    mask_mode: str = default_of(MeanFlowSettings, "mask_mode")
    p: float = default_of(MeanFlowSettings, "p")
    c: float = default_of(MeanFlowSettings, "c")
    derivative: str = default_of(MeanFlowSettings, "derivative")
    finite_difference_step: float = default_of(MeanFlowSettings, "finite_difference_step")
    omega: float = default_of(MeanFlowSettings, "omega")
    kappa: float = default_of(MeanFlowSettings, "kappa")
    t_min: float = default_of(MeanFlowSettings, "t_min")
    t_max: float = default_of(MeanFlowSettings, "t_max")
    class_dropout: float = default_of(MeanFlowSettings, "class_dropout")

    def __post_init__(self) -> None:
        self.curriculum().check_values("alpha", 0.0, 1.0)
        check_number("alpha_threshold", self.alpha_threshold, 0.0, 0.5, high_open=True)
        if self.target_clamp is not None:
            check_positive("target_clamp", self.target_clamp)
        self.meanflow_settings()  # validates the knobs shared with MeanFlow

    def curriculum(self) -> Ramp:
        """alpha over training progress, before the threshold snaps it."""
        return Ramp(shape=self.alpha_schedule, start=self.alpha_start, end=self.alpha_end, begin=self.alpha_begin,
                    finish=self.alpha_finish, steepness=self.alpha_steepness)

    def meanflow_settings(self) -> MeanFlowSettings:
        """MeanFlow's settings for the shared knobs (its target is the alpha = 0 one)."""
        return MeanFlowSettings(**{name: getattr(self, name) for name in _SHARED})

    def to_dict(self) -> dict:
        return asdict(self)


class AlphaFlow(NoiseTimeObjective):
    """Train ``u_theta(z_t, r, t)`` on the alpha-Flow target (F-3) with alpha on a curriculum
    (module docstring). Built on a :class:`~meanflow.objectives.meanflow.MeanFlow` of the shared
    settings, which supplies the time law, the guided velocity and the alpha = 0 target.

    :meth:`prediction_and_target` is the deterministic core for explicit (x, noise, r, t, labels)
    and an explicit ``alpha`` (used as given: 0 is MeanFlow's target) or ``progress`` (alpha
    from the curriculum and its threshold). The F-3 network call runs on the bare module without
    gradient, in fp32 with autocast off, on the rows with r < t only.
    """

    name = "alpha_flow"
    Settings = AlphaFlowSettings

    def __init__(self, settings: AlphaFlowSettings | None = None, num_classes: Optional[int] = None):
        self.settings = settings or AlphaFlowSettings()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.meanflow = MeanFlow.from_settings(self.settings.meanflow_settings(), num_classes)
        self.weighting = self.meanflow.weighting
        self.class_dropout = self.meanflow.class_dropout
        self.curriculum = self.settings.curriculum()

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "AlphaFlow":
        return cls(cls.parse_settings(settings), num_classes)

    @property
    def sampler(self) -> Sampler:
        """The network is an average velocity: Eq. 3 steps, one NFE each."""
        return AverageVelocitySampler()

    def check_parallel(self, data_parallel: bool, sharded: bool) -> None:
        if data_parallel and not sharded and self.meanflow.derivative is Derivative.JVP:
            raise ValueError("objective.alpha_flow.derivative='jvp' cannot run through DistributedDataParallel; "
                             "use --set objective.alpha_flow.derivative=two_pass (the default)")

    def alpha_at(self, progress: float) -> float:
        """alpha at training ``progress``: the curriculum, snapped to 0 below the threshold and to
        1 above one minus it (``get_ratio`` of the official code)."""
        alpha = self.curriculum(progress)
        threshold = self.settings.alpha_threshold
        if alpha < threshold:
            return 0.0
        return 1.0 if alpha > 1.0 - threshold else alpha

    def sample_times(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator],
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        return self.meanflow.sample_times(batch_size, like, generator, progress)

    # ------------------------------------------------------------------------- the loss

    def loss(self, model, batch, labels=None, *, generator=None, progress=0.0) -> LossOutput:
        """Draw noise, times and label dropout for ``x`` (B, ...); the loss at alpha(progress)."""
        x, labels, noise, r, t = self.draw(batch, labels, generator, progress)
        if labels is not None:
            labels = drop_labels(labels, self.class_dropout, null_class_id(self.num_classes), generator)
        alpha = self.alpha_at(progress)
        u, u_tgt = self.compute(model, x, noise, r, t, labels, alpha=alpha)  # our draws: no checks
        return self.loss_output(u, u_tgt, noise - x, r, t, alpha)

    def loss_at(self, model, x, noise, r, t, labels=None, *, alpha: Optional[float] = None,
                progress: Optional[float] = None) -> LossOutput:
        """The loss for explicit inputs (see :meth:`prediction_and_target`), all checked."""
        alpha = self.resolve_alpha(alpha, progress)
        u, u_tgt = self.prediction_and_target(model, x, noise, r, t, labels, alpha=alpha)
        return self.loss_output(u, u_tgt, noise - x, r, t, alpha)

    def loss_output(self, u: Tensor, u_tgt: Tensor, v: Tensor, r: Tensor, t: Tensor, alpha: float) -> LossOutput:
        """Eq. 7-8 with the weight of the rows with r < t scaled by alpha (when alpha > 0);
        the metrics of MeanFlow's loss plus ``alpha``."""
        out = loss_output(self.weighting, u, u_tgt, v, r, t)
        if 0.0 < alpha < 1.0:
            weight = torch.full_like(out.per_sample, alpha)  # in the loss's precision: alpha exactly
            scale = torch.where(r < t, weight, torch.ones_like(weight))  # (B,)
            out.per_sample = out.per_sample * scale
            out.loss = out.per_sample.mean()
            out.metrics["loss"] = out.loss.detach()
        out.metrics["alpha"] = torch.full((), alpha, device=u.device)
        return out

    # ----------------------------------------------------------- the deterministic core

    def resolve_alpha(self, alpha: Optional[float], progress: Optional[float]) -> float:
        """An explicit alpha in [0, 1] as given, else alpha at ``progress`` (default 0)."""
        if alpha is not None and progress is not None:
            raise ValueError("give alpha or progress, not both (progress sets alpha through the curriculum)")
        if alpha is None:
            progress = 0.0 if progress is None else progress
            check_number("progress", progress, 0.0, 1.0)
            return self.alpha_at(progress)
        check_number("alpha", alpha, 0.0, 1.0)
        return float(alpha)

    def prediction_and_target(self, model, x, noise, r, t, labels=None, *, alpha: Optional[float] = None,
                              progress: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, r, t), sg(u_tgt))`` for explicit x, noise (B, ...), r, t (B,), labels
        (B,) (the null id = dropped) or None, at an explicit ``alpha`` or training ``progress``."""
        alpha = self.resolve_alpha(alpha, progress)
        labels = self.check_inputs(x, noise, r, t, labels)
        return self.compute(model, x, noise, r, t, labels, alpha=alpha)

    def compute(self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor,
                labels: Optional[Tensor] = None, *, alpha: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, r, t), sg(u_tgt))`` for inputs already checked; alpha None is the
        curriculum's at progress 0. -> two tensors of x's shape, the target in fp32 or wider."""
        alpha = self.alpha_at(0.0) if alpha is None else alpha
        if alpha == 0.0:
            return self.meanflow.compute(model, x, noise, r, t, labels)  # Eq. 6, MeanFlow's own target
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        # As in MeanFlow: the r = t rows' conditional predictions (Eq. 10) come from the gradient forward.
        guided = GuidedVelocity(model, self.meanflow.guidance, self.meanflow.num_classes, z, t, noise - x, labels,
                                rows_the_gradient_forward_predicts(z, r, t))  # Eq. 9-10, final on the r < t rows
        moving = (r < t).nonzero().squeeze(1)
        consistency = None
        if moving.numel():
            consistency = self.consistency_target(model, z, r, t, labels, at_least_fp32(guided.v_hat), moving, alpha)
        u = average_velocity(model(z, r, t, labels))  # (B, ...) the one gradient forward, through any wrapper
        u_tgt = at_least_fp32(guided.complete(u))  # the r = t rows: flow matching onto v_hat
        if consistency is not None:
            u_tgt = u_tgt.index_copy(0, moving, consistency)
        return u, u_tgt.detach()

    def consistency_target(self, model: nn.Module, z: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor],
                           v_hat: Tensor, moving: Tensor, alpha: float) -> Tensor:
        """F-3 on the ``moving`` rows (r < t), clipped by ``target_clamp``. -> (M, ...)"""
        target = v_hat[moving]  # (M, ...) alpha = 1: trajectory flow matching, no network call
        if alpha < 1.0:
            r_m, t_m = r[moving], t[moving]
            delta = alpha * (t_m - r_m)  # (M,) Delta of F-3
            z_s = at_least_fp32(z[moving]) - broadcast_like(delta, target).to(target.dtype) * target
            u_s = predict_without_grad(model, z_s, r_m, t_m - delta, None if labels is None else labels[moving])
            target = alpha * target + (1.0 - alpha) * u_s.to(target.dtype)  # Delta / (t - r) = alpha
        clamp = self.settings.target_clamp
        return target if clamp is None else target.clamp(-clamp, clamp)
