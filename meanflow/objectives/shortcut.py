"""Shortcut models (Frans, Hafner, Levine, Abbeel; ICLR 2025; FAMILY.md section F3).

The network is conditioned on a step size; ours take (z, r, t), so the step is t - r and no new
network is needed. A share of the batch bootstraps a double step 2d from two half steps of the
network itself, without gradient (F-4)::

    z_m = z_t - d u(z_t, t - d, t),
    u_tgt(z_t, t - 2d, t) = sg( [u(z_t, t - d, t) + u(z_m, t - 2d, t - d)] / 2 ),

and the other rows are flow matching at d = 0 (r = t, target v = e - x). No JVP.

**Time convention.** The official code (kvfrans/shortcut-models, MIT) runs time the other way:
its t' = 0 is noise and t' = 1 data, x_t' = (1 - t') x_0 + t' x_1 with x_0 the noise, velocity
x_1 - x_0 and steps x_t' + d v. Ours is t = 1 - t', z_t = (1 - t) x + t e, v = e - x = -(its
velocity) and steps z_t - d u, so its step from t' to t' + 2d is ours from t = 1 - t' down to
r = t - 2d. Everything below is stated in ours.

What the FAMILY page leaves open follows the official code (``targets_shortcut.py`` and
``train.py`` at commit 6010043):

- Step sizes: the network is conditioned on the dyadic set {1/2^k, ..., 1/2, 1} (k = 7:
  ``denoise_timesteps`` 128, train.py line 54). Bootstrap rows take the double steps
  2d in {2/2^k, ..., 1/2, 1}, the same number of rows for each (remainder: step 1), finest first
  (``bootstrap_dt_bias`` 0, targets_shortcut.py lines 10-14, 23-25). The smallest step 1/2^k
  is the flow-matching level: the flow rows and the finest half steps share its conditioning
  (lines 24, 96-97). Our flow rows are at d = 0, so by default the finest half steps are
  evaluated at d = 0 too (``smallest_step_is_velocity``: the target of the finest double step
  is two Euler steps of the velocity); False evaluates F-4 literally at d = 1/2^k.
- Times: a bootstrap row's t lies on the grid of its step, t in {2d, 4d, ..., 1} (its start
  t' = i 2d, lines 28-30); a flow row's t on the grid of the smallest step, t in {1/2^k, ..., 1}
  (``randint(0, 128) / 128``, lines 85-86). 'uniform' draws t ~ U(2d, 1) and U(0, 1] instead.
  The official code draws both laws from one random key and a tiny sigma_min (1e-5, lines 38,
  94-95); we draw them independently and keep the exact linear path.
- Bootstrap share: a quarter of the batch (the paper; FAMILY F3). The code's default
  ``bootstrap_every`` is 8, an eighth (train.py line 63), which its README commands keep.
  Bootstrap rows are the first rows of the batch (the code shuffles the batch first, line 208;
  our batch sources do), flow rows the rest.
- Labels: class dropout (0.1, train.py line 52) applies to the flow rows only; bootstrap rows
  keep their labels (targets_shortcut.py lines 39, 80-82, 106).
- Guidance in the target (``bootstrap_cfg``, lines 48-69): classifier-free guidance at scale w
  (``cfg_scale``; the ImageNet recipe: 1.5) on both half steps, u_unc + w (u_cond - u_unc), of the
  rows of the finest double step only (``num_dt_cfg`` rows, the first level, line 15); larger
  steps inherit guidance by bootstrapping. The guided step z_m uses the guided first half.
- Clipping: z_m and the target are clipped to [-4, 4] (lines 45, 62, 71): ``clip``.
- Loss: the plain squared error, every row weighted equally (train.py lines 237-239; their
  mean over dimensions is our sum divided by a constant): p = 0.
- Not reproduced: the official targets come from an EMA of the weights (``bootstrap_ema`` 1,
  decay ``target_update_rate`` 0.999; train.py lines 56, 64, 265; targets_shortcut.py line 40).
  An objective here sees only the online network (the trainer owns the EMA), so the targets use
  the online weights (the code's ``bootstrap_ema`` 0). The official network embeds the step as
  log2(1/d) and t' with two sinusoidal embedders (model.py lines 249-264); ours embed (r, t).

Sampling: k uniform average-velocity steps of size 1/k are Shortcut's k-step sampler (the
official ``helper_inference.py`` lines 99-125: k Euler steps of the step-conditioned network).
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import average_velocity
from ..conventions import at_least_fp32, interpolate, null_class_id
from ..samplers import AverageVelocitySampler, Sampler
from ..validation import check_bool, check_fraction, check_integer, check_positive, parse_enum
from .base import NoiseTimeObjective, check_num_classes, default_of
from .guidance import drop_labels, guided_velocity
from .loss import AdaptiveWeighting, LossOutput, loss_output
from .targets import predict_without_grad, split_average_velocity

# Above 2^-20 steps the dyadic grid stops being exact in float32 arithmetic near t = 1.
_MAX_EXPONENT = 20


class ShortcutTimes(str, enum.Enum):
    """How t is drawn for a row: on the grid of its step (the official code), or uniformly."""

    GRID = "grid"
    UNIFORM = "uniform"


class GuidedSteps(str, enum.Enum):
    """Which bootstrap rows get guidance in their target: the finest double step (the official
    code; larger steps inherit it through bootstrapping), or every double step."""

    SMALLEST = "smallest"
    ALL = "all"


@dataclass(frozen=True, kw_only=True)
class ShortcutSettings:
    """The knobs of :class:`Shortcut` (``objective.shortcut.*``); the module docstring says where
    each default comes from.

    Steps: ``smallest_step_exponent`` k (smallest step 1/2^k; double steps 2/2^k, ..., 1);
    ``smallest_step_is_velocity`` (the finest half steps are evaluated at d = 0).
    Batch: ``bootstrap_fraction`` (the share of rows that bootstrap). Times: ``bootstrap_times``
    and ``flow_matching_times`` ('grid' or 'uniform'). Labels and guidance:
    ``class_dropout`` (flow rows), ``guidance_scale`` w (1: none) on ``guided_steps``.
    ``clip`` bounds z_m and the target (None: no clipping). Loss: adaptive weight ``p``, ``c``.
    """

    smallest_step_exponent: int = 7
    smallest_step_is_velocity: bool = True
    bootstrap_fraction: float = 0.25
    bootstrap_times: str = ShortcutTimes.GRID.value
    flow_matching_times: str = ShortcutTimes.GRID.value
    class_dropout: float = 0.1
    guidance_scale: float = 1.0
    guided_steps: str = GuidedSteps.SMALLEST.value
    clip: Optional[float] = 4.0
    p: float = 0.0
    c: float = default_of(AdaptiveWeighting, "c")

    def __post_init__(self) -> None:
        check_integer("smallest_step_exponent", self.smallest_step_exponent)
        if self.smallest_step_exponent > _MAX_EXPONENT:
            raise ValueError(f"smallest_step_exponent must be at most {_MAX_EXPONENT} (a smallest step of "
                             f"1/2^{_MAX_EXPONENT}), got {self.smallest_step_exponent}")
        check_bool("smallest_step_is_velocity", self.smallest_step_is_velocity)
        check_fraction("bootstrap_fraction", self.bootstrap_fraction)
        parse_enum(ShortcutTimes, self.bootstrap_times, "bootstrap_times")
        parse_enum(ShortcutTimes, self.flow_matching_times, "flow_matching_times")
        check_fraction("class_dropout", self.class_dropout)
        check_positive("guidance_scale", self.guidance_scale, allow_zero=True)
        parse_enum(GuidedSteps, self.guided_steps, "guided_steps")
        if self.clip is not None:
            check_positive("clip", self.clip)
        self.weighting()  # validates p and c

    @property
    def smallest_step(self) -> float:
        """1/2^k: the flow-matching level of the official code."""
        return 2.0 ** -self.smallest_step_exponent

    @property
    def double_steps(self) -> tuple[float, ...]:
        """The bootstrap rows' steps 2d, finest first: (2/2^k, ..., 1/2, 1)."""
        return tuple(2.0 ** -exponent for exponent in range(self.smallest_step_exponent - 1, -1, -1))

    def weighting(self) -> AdaptiveWeighting:
        return AdaptiveWeighting(p=self.p, c=self.c)

    def to_dict(self) -> dict:
        return asdict(self)


class Shortcut(NoiseTimeObjective):
    """Train ``u_theta(z_t, r, t)`` on Shortcut's targets (module docstring, F-4).

    Rows with r = t are flow matching (target v); rows with r < t bootstrap the double step
    2d = t - r, which must be one of ``settings.double_steps``. The target of a bootstrap row
    takes two no-grad forwards of the bootstrap rows (the guided rows' unconditional branch rides
    along in the same forwards), in fp32 on the bare module; then one gradient forward of the
    whole batch gives the prediction.
    """

    name = "shortcut"
    Settings = ShortcutSettings

    def __init__(self, settings: ShortcutSettings | None = None, num_classes: Optional[int] = None):
        self.settings = settings or ShortcutSettings()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.weighting = self.settings.weighting()
        self.class_dropout = self.settings.class_dropout if num_classes is not None else 0.0
        self.guidance_scale = self.settings.guidance_scale if num_classes is not None else 1.0
        self.bootstrap_times = parse_enum(ShortcutTimes, self.settings.bootstrap_times, "bootstrap_times")
        self.flow_matching_times = parse_enum(ShortcutTimes, self.settings.flow_matching_times, "flow_matching_times")
        self.guided_steps = parse_enum(GuidedSteps, self.settings.guided_steps, "guided_steps")

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "Shortcut":
        return cls(cls.parse_settings(settings), num_classes)

    @property
    def sampler(self) -> Sampler:
        """k uniform average-velocity steps (Eq. 3): Shortcut's k-step sampler, 1 NFE a step."""
        return AverageVelocitySampler()

    # ----------------------------------------------------------------- drawing the rows

    def bootstrap_count(self, batch_size: int) -> int:
        """How many leading rows of a batch bootstrap (the official ``batch_size // bootstrap_every``)."""
        return math.floor(self.settings.bootstrap_fraction * batch_size)

    def bootstrap_steps(self, count: int, like: Tensor) -> Tensor:
        """The double step 2d of each bootstrap row: count // k rows per level, finest first, the
        remainder at step 1 (targets_shortcut.py lines 13-14). -> (count,)"""
        levels = torch.tensor(self.settings.double_steps, device=like.device, dtype=like.dtype)
        steps = levels.repeat_interleave(count // levels.numel())
        return torch.cat([steps, torch.ones(count - steps.numel(), device=like.device, dtype=like.dtype)])

    def sample_times(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator],
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        """(r, t), each (B,): bootstrap rows first (r = t - 2d), then flow rows (r = t)."""
        count = self.bootstrap_count(batch_size)
        step = self.bootstrap_steps(count, like)  # (M,)
        t_boot = self._times(step, self.bootstrap_times, like, generator)
        smallest = torch.full((batch_size - count,), self.settings.smallest_step, device=like.device, dtype=like.dtype)
        t_flow = self._times(smallest, self.flow_matching_times, like, generator, low=0.0)
        t = torch.cat([t_boot, t_flow])
        return torch.cat([(t_boot - step).clamp_min(0.0), t_flow]), t

    @staticmethod
    def _times(step: Tensor, law: ShortcutTimes, like: Tensor, generator: Optional[torch.Generator],
               low: Optional[float] = None) -> Tensor:
        """t in {step, 2 step, ..., 1} ('grid'), or uniform on [step, 1] (on (low, 1] when given). (N,)"""
        uniform = torch.rand(step.shape, device=like.device, dtype=like.dtype, generator=generator)
        if law is ShortcutTimes.GRID:
            cells = torch.round(1.0 / step)  # 1/step is a power of two: exact
            return (torch.floor(uniform * cells) + 1.0) * step
        start = step if low is None else torch.full_like(step, low)
        return 1.0 - uniform * (1.0 - start)  # (start, 1]; 1 - U avoids t = start = 0 for flow rows

    def loss(self, model, batch, labels=None, *, generator=None, progress=0.0) -> LossOutput:
        """Draw noise, times and class dropout (flow rows only) for ``x`` (B, ...); the loss."""
        x, labels, noise, r, t = self.draw(batch, labels, generator, progress)
        if labels is not None:
            dropped = drop_labels(labels, self.class_dropout, null_class_id(self.num_classes), generator)
            labels = torch.where(r == t, dropped, labels)  # bootstrap rows keep their labels
        u, u_tgt = self.compute(model, x, noise, r, t, labels)  # times and noise are ours: no checks
        return loss_output(self.weighting, u, u_tgt, noise - x, r, t)

    # ----------------------------------------------------------- the deterministic core

    def check_inputs(self, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor]):
        """Besides the common checks: every row with r < t must span one of the double steps."""
        labels = super().check_inputs(x, noise, r, t, labels)
        gap = (t - r)[r < t].double()
        steps = torch.tensor(self.settings.double_steps, dtype=torch.float64, device=gap.device)
        if gap.numel() and not bool(((gap[:, None] - steps).abs() <= 1e-6).any(dim=1).all()):
            raise ValueError(f"every row with r < t must bootstrap a double step t - r in {list(self.settings.double_steps)} "
                             f"(smallest_step_exponent={self.settings.smallest_step_exponent}); got t - r = "
                             f"{sorted(set(gap.tolist()))}")
        return labels

    def compute(
        self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """``(u_theta(z_t, r, t), sg(u_tgt))``, each of x's shape: v on the r = t rows, F-4 on the others.

        x, noise: (B, ...); r, t: (B,); labels: (B,) (null id = no class) or None.
        """
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        u_tgt = at_least_fp32(noise - x)  # (B, ...) flow matching: v = e - x
        rows = (r < t).nonzero().squeeze(1)
        if rows.numel():
            row_labels = None if labels is None else labels[rows]
            target = self.bootstrap_target(model, z[rows], r[rows], t[rows], row_labels)
            u_tgt = u_tgt.index_copy(0, rows, target.to(u_tgt.dtype))
        u = average_velocity(model(z, r, t, labels))  # (B, ...) the one gradient forward, through any wrapper
        return u, u_tgt.detach()

    def bootstrap_target(self, model: nn.Module, z: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """F-4 for bootstrap rows, no gradient, fp32: z (M, ...); r, t (M,) with t - r = 2d. -> (M, ...)"""
        z, r, t = at_least_fp32(z), at_least_fp32(r), at_least_fp32(t)
        finest = (t - r) < 3.0 * self.settings.smallest_step  # (M,) the double step 2/2^k
        guided = self._guided_rows(finest, labels)  # (M,)
        at_velocity = finest if self.settings.smallest_step_is_velocity else torch.zeros_like(finest)

        def velocity(z_q: Tensor, r_q: Tensor, t_q: Tensor) -> Tensor:
            r_q = torch.where(at_velocity, t_q, r_q)  # the finest halves at d = 0 (the flow level)
            return self.guided_prediction(model, z_q, r_q, t_q, labels, guided)

        s = (r + t) / 2  # (M,) the midpoint t - d
        target = split_average_velocity(velocity, z, r, s, t, clip=self.settings.clip)  # (u1 + u2) / 2
        return target if self.settings.clip is None else target.clamp(-self.settings.clip, self.settings.clip)

    def _guided_rows(self, finest: Tensor, labels: Optional[Tensor]) -> Tensor:
        """(M,) bool: the rows whose half steps get classifier-free guidance."""
        if labels is None or self.guidance_scale == 1.0:
            return torch.zeros_like(finest)
        guided = labels != null_class_id(self.num_classes)  # the null class has nothing to guide towards
        return guided & finest if self.guided_steps is GuidedSteps.SMALLEST else guided

    def guided_prediction(self, model: nn.Module, z: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor],
                          guided: Tensor) -> Tensor:
        """u without gradient, with u_unc + w (u_cond - u_unc) on the ``guided`` rows: one forward of
        the rows followed by the guided rows' unconditional branch. -> (M, ...)"""
        rows = guided.nonzero().squeeze(1)
        if rows.numel() == 0:
            return predict_without_grad(model, z, r, t, labels)
        null = torch.full_like(labels[rows], null_class_id(self.num_classes))
        both = predict_without_grad(model, torch.cat([z, z[rows]]), torch.cat([r, r[rows]]), torch.cat([t, t[rows]]),
                                    torch.cat([labels, null]))
        u, u_unc = both[: z.shape[0]], both[z.shape[0]:]
        mixed = guided_velocity(u[rows], u_unc, None, self.guidance_scale, 0.0)  # u_unc + w (u_cond - u_unc)
        return u.index_copy(0, rows, mixed)
