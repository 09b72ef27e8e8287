"""Improved MeanFlow (iMF; Geng et al., arXiv 2512.02012; FAMILY.md section F1).

The network takes the guidance scale omega and the interval [t_min, t_max] as conditions and
returns two fields, the average velocity u and an auxiliary instantaneous velocity v_theta. With
v_c = v_theta(z_t, t | y, omega) and v_u = v_theta(z_t, t | null, 1), both at r = t (h = 0) and
interval [0, 1], without gradient::

    v_g = v + (1 - 1/omega) (v_c - v_u)                                            (F-1)
    V   = u_theta(z_t, r, t) + (t - r) sg(du_theta/dt),   tangent (v_c, dr = 0, dt = 1)  (F-2)
    loss = w(||V - sg(v_g)||^2) + lambda w(||v_theta - sg(v_g)||^2)

where omega acts as 1 outside [t_min, t_max] and v_g = v for dropped labels. The details F1
leaves open follow the official code (Lyy-iiis/imeanflow, ``imf.py``):

- the tangent's v_c is the auxiliary head's output with the row's label *before* dropout and
  omega masked to 1 outside the interval (``guidance_fn``, lines 317-319; ``forward``, 373);
- every row gets guidance, the r = t rows with the interval [0, 1] (lines 163-179, 313-323);
- the guided target is built before label dropout, which then sets v_g = v and the label to
  null; dropped rows keep their omega and interval as inputs (lines 358-367);
- the u call gets the sampled omega unmasked and the sampled interval (line 367);
- omega law: ``exp(U log(1 + s_max))`` for beta = 1, else density ~ omega^-beta on
  [1, 1 + s_max] (``sample_cfg_scale``, lines 141-161);
- loss: the two adaptive-weighted terms are summed, then averaged over the batch (380-393).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import GUIDANCE_INTERVAL, GUIDANCE_SCALE, Conditions, as_output
from ..conventions import at_least_fp32, autocast_off, broadcast_like, interpolate, null_class_id
from ..jvp import Derivative, finite_difference_along_flow, one_pass_along_flow, one_pass_tangent, tangent_along_flow
from ..samplers import ImfSampler, Sampler
from ..validation import check_number, check_positive, parse_enum
from ..wrappers import is_data_parallel, unwrap
from .base import NoiseTimeObjective, check_num_classes, default_of
from .loss import AdaptiveWeighting, LossOutput, squared_error
from .time_sampling import MaskMode, TimeSampler


@dataclass(frozen=True, kw_only=True)
class ImfSettings:
    """The knobs of :class:`ImprovedMeanFlow` (``objective.imf.*``); defaults are the official ones.

    Times: logit-normal ``mu``, ``sigma``; ``fraction_r_neq_t`` (0.5: half the rows have r = t);
    ``mask_mode`` picks the r = t rows and the dropped labels ('random', or 'prefix' as in the
    JAX code). Guidance scale: ``s_max`` and ``beta`` (omega in [1, 1 + s_max] with density
    ~ omega^-beta; beta = 1 is log-uniform). Interval: t_min ~ U(t_min_low, t_min_high), t_max ~
    U(t_max_low, t_max_high). ``class_dropout``; adaptive weight ``p``, ``c``;
    ``auxiliary_weight`` of the v-head term; ``derivative`` and ``finite_difference_step``;
    ``sample_omega`` and ``sample_interval``: the guidance the run's sampler uses by default (the
    authors' per-size settings in the ImageNet presets; ``--omega`` / ``--interval`` pick others).
    """

    mu: float = -0.4
    sigma: float = 1.0
    fraction_r_neq_t: float = 0.5
    mask_mode: str = MaskMode.RANDOM.value
    s_max: float = 7.0
    beta: float = 1.0
    t_min_low: float = 0.0
    t_min_high: float = 0.5
    t_max_low: float = 0.5
    t_max_high: float = 1.0
    class_dropout: float = 0.1
    p: float = default_of(AdaptiveWeighting, "p")
    c: float = default_of(AdaptiveWeighting, "c")
    auxiliary_weight: float = 1.0
    derivative: str = Derivative.TWO_PASS.value
    finite_difference_step: float = 1e-3
    sample_omega: float = 1.0
    sample_interval: tuple = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.time_sampler(), self.weighting()  # each record validates its fields
        check_positive("s_max", self.s_max)
        check_number("beta", self.beta)
        check_number("t_min_low", self.t_min_low, 0.0, 1.0)
        check_number("t_min_high", self.t_min_high, self.t_min_low, 1.0)
        check_number("t_max_low", self.t_max_low, self.t_min_high, 1.0)  # so that t_min <= t_max
        check_number("t_max_high", self.t_max_high, self.t_max_low, 1.0)
        check_number("class_dropout", self.class_dropout, 0.0, 1.0, high_open=True)
        check_positive("auxiliary_weight", self.auxiliary_weight)
        # The run's sampling default (its sampler in the run record), validated by the sampler.
        object.__setattr__(self, "sample_interval", ImfSampler(self.sample_omega, self.sample_interval).interval)
        parse_enum(Derivative, self.derivative, "derivative")
        check_positive("finite_difference_step", self.finite_difference_step)

    def time_sampler(self) -> TimeSampler:
        return TimeSampler(mu=self.mu, sigma=self.sigma, fraction_r_neq_t=self.fraction_r_neq_t,
                           mask_mode=self.mask_mode)

    def weighting(self) -> AdaptiveWeighting:
        return AdaptiveWeighting(p=self.p, c=self.c)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImfTerms:
    """The terms of the iMF loss for one batch, each (B, ...) with x's shape.

    u: the average velocity (gradient); V: u + (t - r) sg(du/dt) (F-2, gradient through u);
    v: the auxiliary head's instantaneous velocity (gradient); target: sg(v_g) (F-1), fp32.
    """

    u: Tensor
    V: Tensor
    v: Tensor
    target: Tensor


class ImprovedMeanFlow(NoiseTimeObjective):
    """Train a guidance-conditioned two-head network on the iMF loss (module docstring).

    Per row the loss draws (r, t), omega, [t_min, t_max] (the r = t rows get [0, 1]) and label
    dropout; :meth:`prediction_and_target` is the same computation for explicit inputs. Only
    rows with r != t pay for the derivative; the guidance forward, the derivative and the target
    run in fp32 with autocast off, on the bare module without gradient.
    """

    name = "imf"
    Settings = ImfSettings

    def __init__(self, settings: ImfSettings | None = None, num_classes: Optional[int] = None):
        self.settings = settings or ImfSettings()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.time_sampler = self.settings.time_sampler()
        self.weighting = self.settings.weighting()
        self.class_dropout = self.settings.class_dropout if num_classes is not None else 0.0
        self.derivative = parse_enum(Derivative, self.settings.derivative, "derivative")

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "ImprovedMeanFlow":
        return cls(cls.parse_settings(settings), num_classes)

    @property
    def sampler(self) -> Sampler:
        """Average-velocity steps with omega and the interval as the network's conditions."""
        return ImfSampler(self.settings.sample_omega, self.settings.sample_interval)

    @property
    def required_conditions(self) -> frozenset[str]:
        return super().required_conditions | {GUIDANCE_SCALE, GUIDANCE_INTERVAL}

    def check_model(self, model: nn.Module) -> None:
        """Refuse a network lacking the guidance conditions or the auxiliary velocity head."""
        super().check_model(model)
        if not getattr(unwrap(model), "auxiliary_velocity", False):
            raise ValueError(f"objective 'imf' regresses an auxiliary velocity head, which the network "
                             f"{type(unwrap(model)).__name__} does not declare (auxiliary_velocity = True); "
                             "for the MLP set model.options.auxiliary_velocity=true")

    def check_parallel(self, data_parallel: bool, sharded: bool) -> None:
        if data_parallel and not sharded and self.derivative is Derivative.JVP:
            raise ValueError("objective.imf.derivative='jvp' cannot run through DistributedDataParallel; use "
                             "--set objective.imf.derivative=two_pass (the default)")

    # ----------------------------------------------------------------- drawing the conditions

    def sample_times(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator],
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        return self.time_sampler.sample(batch_size, like.device, like.dtype, generator)

    def sample_guidance_scale(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """omega in [1, 1 + s_max] with density ~ omega^-beta (imf.py ``sample_cfg_scale``). -> (B,)"""
        uniform = torch.rand(batch_size, device=like.device, dtype=torch.float32, generator=generator)
        s_max, beta = self.settings.s_max, self.settings.beta
        if beta == 1.0:
            omega = torch.exp(uniform * math.log1p(s_max))
        else:  # inverse CDF of omega^-beta: ((1 + s_max)^(1-beta) - 1) U + 1 = omega^(1-beta)
            base = math.expm1((1.0 - beta) * math.log1p(s_max))
            omega = torch.exp(torch.log1p(uniform * base) / (1.0 - beta))
        return omega.to(like.dtype)

    def sample_interval(self, r: Tensor, t: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """[t_min, t_max] per row, [0, 1] on the r = t rows (imf.py ``sample_cfg_interval``). -> (B, 2)"""
        s = self.settings
        start = s.t_min_low + (s.t_min_high - s.t_min_low) * torch.rand(t.shape, device=t.device, dtype=t.dtype,
                                                                        generator=generator)
        end = s.t_max_low + (s.t_max_high - s.t_max_low) * torch.rand(t.shape, device=t.device, dtype=t.dtype,
                                                                      generator=generator)
        resting = r == t
        interval = torch.stack([start.masked_fill(resting, 0.0), end.masked_fill(resting, 1.0)], dim=1)
        return interval

    def sample_dropped(self, batch_size: int, device, generator: Optional[torch.Generator]) -> Tensor:
        """(B,) bool, the rows whose label is dropped; 'prefix' drops the first Binomial(B, p) rows
        (imf.py ``cond_drop``)."""
        drawn = torch.rand(batch_size, device=device, generator=generator) < self.class_dropout
        if self.time_sampler.mask_mode is MaskMode.PREFIX:
            return torch.arange(batch_size, device=device) < drawn.sum()
        return drawn

    # ------------------------------------------------------------------------- the loss

    def loss(self, model, batch, labels=None, *, generator=None, progress=0.0) -> LossOutput:
        """Draw noise, times, omega, interval and label dropout for ``x`` (B, ...); the loss."""
        x, labels, noise, r, t = self.draw(batch, labels, generator, progress)
        omega = self.sample_guidance_scale(x.shape[0], x, generator)
        interval = self.sample_interval(r, t, generator)
        dropped = None if labels is None else self.sample_dropped(x.shape[0], x.device, generator)
        terms = self.compute_terms(model, x, noise, r, t, labels, omega, interval, dropped)
        return self.loss_output(terms, noise - x, r, t)

    def loss_at(self, model, x, noise, r, t, labels=None, omega=None, interval=None, dropped=None) -> LossOutput:
        """The loss for explicit inputs (see :meth:`prediction_and_target`), all checked."""
        terms = self.prediction_and_target(model, x, noise, r, t, labels, omega, interval, dropped)
        return self.loss_output(terms, noise - x, r, t)

    def loss_output(self, terms: ImfTerms, v: Tensor, r: Tensor, t: Tensor) -> LossOutput:
        """w(||V - v_g||^2) + lambda w(||v_theta - v_g||^2), batch mean, in fp32; plus metrics."""
        error_u = squared_error(terms.V, terms.target)  # (B,)
        error_v = squared_error(terms.v, terms.target)  # (B,)
        per_sample = self.weighting(error_u) + self.settings.auxiliary_weight * self.weighting(error_v)
        loss = per_sample.mean()
        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "unweighted_error": error_u.detach().mean(),
                "auxiliary_error": error_v.detach().mean(),
                "velocity_error": squared_error(terms.u.detach(), v).mean(),
                "fraction_r_neq_t": (r != t).float().mean(),
            }
        return LossOutput(loss=loss, per_sample=per_sample, metrics=metrics)

    # ----------------------------------------------------------- the deterministic core

    def prediction_and_target(self, model, x, noise, r, t, labels=None, omega=None, interval=None,
                              dropped=None) -> ImfTerms:
        """The terms for explicit inputs, checked: x, noise (B, ...); r, t (B,); labels (B,)
        (the null id = no label at all) or None; omega (B,) >= 1 (default 1); interval (B, 2)
        with 0 <= t_min <= t_max <= 1 (default [0, 1]); dropped (B,) bool, rows whose label is
        dropped after the tangent is built (default none)."""
        labels = self.check_inputs(x, noise, r, t, labels)
        batch = x.shape[0]
        omega = torch.ones_like(t) if omega is None else omega
        interval = torch.stack([torch.zeros_like(t), torch.ones_like(t)], 1) if interval is None else interval
        if omega.shape != (batch,) or interval.shape != (batch, 2):
            raise ValueError(f"omega must be ({batch},) and interval ({batch}, 2); got {tuple(omega.shape)}, "
                             f"{tuple(interval.shape)}")
        if not bool((omega >= 1).all()) or not bool(torch.isfinite(omega).all()):
            raise ValueError("the guidance scale omega must be a finite number >= 1 in every row")
        if not bool(((0 <= interval[:, 0]) & (interval[:, 0] <= interval[:, 1]) & (interval[:, 1] <= 1)).all()):
            raise ValueError("every guidance interval must satisfy 0 <= t_min <= t_max <= 1")
        if dropped is not None and (dropped.shape != (batch,) or dropped.dtype != torch.bool):
            raise ValueError(f"dropped must be a ({batch},) bool tensor")
        if dropped is not None and labels is None:
            raise ValueError("dropped rows need labels: the objective is unconditional")
        return self.compute_terms(model, x, noise, r, t, labels, omega, interval, dropped)

    def compute(self, model, x, noise, r, t, labels=None) -> tuple[Tensor, Tensor]:
        """``(V, sg(v_g))`` at omega = 1 and interval [0, 1] (no guidance); see :meth:`compute_terms`."""
        terms = self.compute_terms(model, x, noise, r, t, labels, torch.ones_like(t),
                                   torch.stack([torch.zeros_like(t), torch.ones_like(t)], 1), None)
        return terms.V, terms.target

    def compute_terms(self, model: nn.Module, x: Tensor, noise: Tensor, r: Tensor, t: Tensor,
                      labels: Optional[Tensor], omega: Tensor, interval: Tensor,
                      dropped: Optional[Tensor]) -> ImfTerms:
        """The iMF terms for inputs already checked (module docstring, F-1 and F-2)."""
        z = interpolate(x, noise, t)  # (B, ...) Eq. 1
        v = noise - x  # (B, ...) Eq. 1
        inputs = Conditions(labels=self._input_labels(labels, dropped), guidance_scale=omega,
                            guidance_interval=interval)
        moving = (r < t).nonzero().squeeze(1)  # the rows that pay for the derivative
        v_c, v_g = self.guided_velocity(model, z, t, v, labels, omega, interval, dropped, moving)
        if self.derivative is Derivative.JVP:
            u, v_theta, dudt = self._single_pass(model, z, r, t, inputs, v_c, moving)
        elif (self.derivative is Derivative.TWO_PASS and one_pass_tangent(model)
              and not torch.is_autocast_enabled(z.device.type)):
            # One call: both heads with gradient and the no-grad tangent of the moving rows
            # (meanflow.jvp; under autocast the tangent runs apart in fp32, spec section 8).
            out, dudt = one_pass_along_flow(model, z, r, t, inputs, v_c, moving)
            u, v_theta = out.u, out.v
        else:
            dudt = self._derivative_without_grad(model, z, r, t, inputs, v_c, moving)
            out = as_output(model(z, r, t, inputs))  # the one gradient forward, through any wrapper
            u, v_theta = out.u, out.v
        V = at_least_fp32(u)
        if moving.numel():
            dudt = at_least_fp32(dudt).to(V.dtype).detach()
            gap = broadcast_like((t - r)[moving], dudt).to(V.dtype)
            V = V.index_add(0, moving, gap * dudt)  # F-2 on the r != t rows; gradient through u only
        return ImfTerms(u=u, V=V, v=v_theta, target=v_g.detach())

    def guided_velocity(self, model: nn.Module, z: Tensor, t: Tensor, v: Tensor, labels: Optional[Tensor],
                        omega: Tensor, interval: Tensor, dropped: Optional[Tensor],
                        moving: Tensor) -> tuple[Tensor, Tensor]:
        """``(v_c, v_g)``: the tangent velocity on the ``moving`` rows (M, ...) and F-1 (B, ...), fp32.

        omega acts as 1 outside [t_min, t_max]; v_c keeps the row's label before dropout; v_g = v
        where the label is dropped or null, or omega acts as 1. One no-grad forward of the rows
        that need v_c and of the guided rows' unconditional branch.
        """
        inside = (t >= interval[:, 0]) & (t <= interval[:, 1])
        omega_in = torch.where(inside, omega, torch.ones_like(omega))  # (B,) imf.py line 317
        guided = omega_in > 1
        if labels is None:
            guided = torch.zeros_like(guided)  # no class to guide towards: every row is "dropped"
        else:
            guided = guided & (labels != null_class_id(self.num_classes))
            if dropped is not None:
                guided = guided & ~dropped
        guided_rows = guided.nonzero().squeeze(1)
        conditional_rows = torch.cat([moving, guided_rows])
        target = at_least_fp32(v)
        if conditional_rows.numel() == 0:
            return z.new_zeros((0, *z.shape[1:])), target
        null = None if labels is None else torch.full_like(guided_rows, null_class_id(self.num_classes))
        branch_labels = None if labels is None else torch.cat([labels[conditional_rows], null])
        rows = torch.cat([conditional_rows, guided_rows])
        z_b, t_b = at_least_fp32(z[rows]), at_least_fp32(t[rows])
        scale = torch.cat([omega_in[conditional_rows], torch.ones_like(omega_in[guided_rows])])
        full = torch.tensor([0.0, 1.0], device=z.device, dtype=t_b.dtype).expand(rows.numel(), 2)
        with torch.no_grad(), autocast_off(z):
            out = as_output(unwrap(model)(z_b, t_b, t_b, Conditions(labels=branch_labels,
                                                                    guidance_scale=at_least_fp32(scale),
                                                                    guidance_interval=full)))
        if out.v is None:
            raise ValueError("the network returned no auxiliary velocity v (ModelOutput.v); iMF needs one")
        v_branch = out.v.to(target.dtype)
        count_m, count_g = moving.numel(), guided_rows.numel()
        v_c_moving = v_branch[:count_m]
        v_c_guided = v_branch[count_m:count_m + count_g]
        v_u_guided = v_branch[count_m + count_g:]
        weight = broadcast_like(1.0 - 1.0 / omega_in[guided_rows], v_c_guided).to(target.dtype)
        mixed = target[guided_rows] + weight * (v_c_guided - v_u_guided)  # F-1
        return v_c_moving, target.index_copy(0, guided_rows, mixed)

    def _input_labels(self, labels: Optional[Tensor], dropped: Optional[Tensor]) -> Optional[Tensor]:
        """The labels the u call sees: the null id on the dropped rows."""
        if labels is None or dropped is None:
            return labels
        return torch.where(dropped, torch.full_like(labels, null_class_id(self.num_classes)), labels)

    def _derivative_without_grad(self, model, z, r, t, inputs: Conditions, v_c: Tensor, moving: Tensor) -> Tensor:
        """du/dt along (v_c, 0, 1) on the ``moving`` rows, bare module, no gradient. -> (M, ...)"""
        if moving.numel() == 0:
            return z.new_zeros((0, *z.shape[1:]))
        rows = (*[at_least_fp32(tensor[moving]) for tensor in (z, r, t)], _fp32_conditions(inputs.rows(moving)), v_c)
        with torch.no_grad(), autocast_off(z):
            if self.derivative is Derivative.TWO_PASS:
                return tangent_along_flow(unwrap(model), *rows)
            return finite_difference_along_flow(unwrap(model), *rows, step=self.settings.finite_difference_step)

    def _single_pass(self, model, z, r, t, inputs: Conditions, v_c: Tensor, moving: Tensor):
        """(u, v_theta) for the batch and du/dt on the ``moving`` rows from one torch.func.jvp."""
        if is_data_parallel(model):
            raise ValueError("derivative='jvp' cannot run through DistributedDataParallel; use 'two_pass'")
        resting = (r == t).nonzero().squeeze(1)
        bare = unwrap(model)
        conditions = _fp32_conditions(inputs.rows(moving))

        def heads(z_: Tensor, r_: Tensor, t_: Tensor) -> tuple[Tensor, Tensor]:
            out = as_output(bare(z_, r_, t_, conditions))
            return out.u, out.v

        z_m, r_m, t_m = (at_least_fp32(tensor[moving]) for tensor in (z, r, t))
        with autocast_off(z):
            u_m, dudt, v_m = torch.func.jvp(heads, (z_m, r_m, t_m), (v_c, torch.zeros_like(r_m), torch.ones_like(t_m)),
                                            has_aux=True)
        rest = as_output(model(z[resting], r[resting], t[resting], inputs.rows(resting)))
        order = torch.cat([moving, resting]).argsort()  # back to batch order
        u = torch.cat([u_m.to(rest.u.dtype), rest.u])[order]
        v_theta = torch.cat([v_m.to(rest.v.dtype), rest.v])[order]
        return u, v_theta, dudt


def _fp32_conditions(conditions: Conditions) -> Conditions:
    """The guidance inputs promoted to fp32 with the data (labels unchanged)."""
    return Conditions(labels=conditions.labels, guidance_scale=at_least_fp32(conditions.guidance_scale),
                      guidance_interval=at_least_fp32(conditions.guidance_interval))

