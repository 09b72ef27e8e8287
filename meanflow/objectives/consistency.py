"""Consistency training on the flow map (iCT / ECT / sCT; FAMILY.md section F5).

A consistency model is the flow map to data, and MeanFlow's network at r = 0 is one::

    f(z_t, t) = z_t - t u(z_t, 0, t)                                                  (CT-1)

(one Eq. 3 step from t to 0). The boundary condition f(z_0, 0) = z_0, which EDM-style
consistency models enforce with c_skip / c_out, holds here by construction.

Two modes (``ConsistencySettings.mode``):

- **discrete** (iCT, Song & Dhariwal 2023; ECT, Geng et al. 2024): on the same noise e,
  z_t = (1 - t) x + t e and z_t' = (1 - t') x + t' e with t' < t, ::

      loss = lambda(t, t') d( f_theta(z_t, t), sg f_theta(z_t', t') )                  (CT-2)

  with d the pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) (iCT), and
  the teacher the same network without EMA (iCT section 3.2), evaluated with the student's dropout
  masks (iCT section 3.1; ECT ``training/loss.py`` l. 66-73 restores the RNG state between the
  two calls). t' comes from iCT's discretisation curriculum or from ECT's mapping.
- **continuous** (sCT, Lu & Song 2024): the limit t' -> t. With v = e - x the conditional
  velocity (dz/dt along the path), the total derivative along the flow is (one JVP) ::

      df/dt = (v - u) - t du/dt,   du/dt along the tangent (v, dr = 0, dt = 1)           (CT-3)

  and the loss regresses u onto ``sg(u + g / (||g|| + c))`` with ``g = (v - u) - w t du/dt``
  (tangent normalisation, c = 0.1), the warm-up factor w rising linearly from 0 to 1 over
  ``tangent_warmup`` of training (sCT's tangent warm-up). Its gradient is ``-2 g_n . grad u =
  (2 / t) g_n . grad f``: the direction of the discrete loss's gradient in the limit t' -> t
  (continuous-time consistency training, Song et al. 2023). Named limits: w = 0 without normalisation is flow matching at r = 0 (target v);
  w = 1 without normalisation is MeanFlow's target at r = 0, ``v - t du/dt`` (Eq. 6), so the
  MeanFlow loss on its r = 0 rows *is* continuous consistency training on the linear path.

**The mapping to the papers' EDM parametrisation** (x_sigma = x + sigma e, sigma in
[sigma_min, sigma_max]): z_t = (1 - t)(x + sigma e) with ::

    sigma = t / (1 - t),    t = sigma / (1 + sigma),    log sigma = logit t.

Both parametrisations' consistency functions predict the same x, so d(., .) is unchanged; and
sigma -> t is increasing, so the papers' times keep their order. What it does to the formulas:

- the lognormal law log sigma ~ N(P_mean, P_std^2) is exactly the logit-normal law
  t = sigmoid(N(P_mean, P_std^2)) (ECT, sCT: drawn with TimeSampler's logit-normal);
- iCT's discrete law p(sigma_i) ∝ erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log
  sigma_i - P_mean) / (sqrt 2 P_std)) is the logit-normal mass of [t_i, t_{i+1}];
- the Karras grid sigma_i = (sigma_min^(1/rho) + (i - 1)/(N - 1) (sigma_max^(1/rho) -
  sigma_min^(1/rho)))^rho (rho = 7, sigma in [0.002, 80]) maps to t_i = sigma_i / (1 + sigma_i),
  so training covers t in [0.002, 0.9877]; sampling starts at t = 1 (sigma = inf), where z_1 = e is
  what the papers approximate by sigma_max e (the data's share at t_max is 1.2%);
- lambda = 1 / (sigma_{i+1} - sigma_i) (iCT; ECT's ``loss / (t - r)``, l. 92) is kept in sigma
  units: ``sigma_gap`` = 1 / (sigma(t) - sigma(t')) = (1 - t)(1 - t') / (t - t');
  ``time_gap`` = 1 / (t - t') is the same idea in our time;
- ECT's mapping r = t (1 - q^-(stage + 1) n(t)), n(t) = 1 + k sigmoid(-b t), clamped at 0
  (``t_to_r_sigmoid``, l. 45-50), acts on sigma and becomes t' = rho t / ((1 - t) + rho t) with
  rho = max(0, 1 - q^-(stage + 1) n(sigma(t))) (no infinity at t = 1); t' = 0 gives f = x;
- sCT's TrigFlow tangent g = -cos^2 t (sigma_d F - dx_t/dt) - w cos t sin t (x_t + sigma_d
  dF/dt) = cos t df/dt with the warm-up w on the part carrying the network's tangent (NVlabs/FastGen
  ``methods/consistency_model/sCM.py``, ``_scm_pred_to_loss``: g = g1 + r g2) becomes CT-3: our
  f = z - t u has no coefficient on z to differentiate, so the warmed part is -t du/dt alone.

What we took from where (no code copied):

- iCT: Song & Dhariwal, arXiv 2310.14189 (no official code): N(k) = min(s0 2^floor(k/K'), s1) + 1,
  K' = floor(K / (floor(log2 floor(s1/s0)) + 1)), s0 = 10, s1 = 1280 (section 3.4); the erf law with
  P_mean = -1.1, P_std = 2.0 (section 3.5); lambda = 1/(sigma_{i+1} - sigma_i) (section 3.1);
  pseudo-Huber c = 0.00054 sqrt(d) (section 3.3); 2-step time sigma = 0.821. With progress
  p = k / K the stage is floor(p (floor(log2 floor(s1/s0)) + 1)): iCT's exactly when K is a
  multiple of the number of stages (400k and 8 for CIFAR-10).
- ECT: locuslab/ect ``training/loss.py`` (l. 13: P_mean -1.1, P_std 2.0, q 2, c 0, k 8, b 1; l. 45-50
  the mapping; l. 61-79 one noise for both times, shared dropout, r = 0 -> target x; l. 81-92
  sqrt(||.||^2 + c^2) - c over the gap t - r); ``training/ct_training_loop.py`` l. 241, 383: stage
  = tick // double_ticks, so with ``run_ecm.sh`` (25.6 Mimg at batch 128, double every 250 ticks
  of 12.8 kimg) 8 stages of 25k iterations; 2-step ``mid_t`` 0.821 (``ct_train.py`` l. 99). Our
  stage is floor(p * ect_stages).
- sCT: Lu & Song, arXiv 2410.11081: tangent normalisation g / (||g|| + c), c = 0.1, and tangent
  warm-up; defaults as in NVlabs/FastGen (Apache-2.0) ``configs/methods/config_scm.py``: 10k
  warm-up iterations, c 0.1, P_mean -1.0, P_std 1.4; its ``g_norm_spatial_invariance`` (the norm
  divided by sqrt(dim)) is our ``tangent_normalisation='rms'``. Not implemented: sCT's learnt
  adaptive weight w_phi(t) (a second network) and prior weight; the project's AdaptiveWeighting
  (p, c) stands in, by default off: each row's error is ||g_n||^2 < 1 already.
- Guidance: none of the three papers puts classifier-free guidance in the target, so neither do
  we. Labels pass through (with class dropout) so class-conditional data trains, and the
  sampler's inference-time CFG (linear in u, hence in f) stays available.

Why the same-noise pair is a target only in expectation: z_t and z_t' = z_t - (t - t') v lie on
the straight line of ONE (x, e) pair, not on the probability-flow trajectory through z_t, which
moves with the marginal velocity E[v | z_t]. f(z_t', t') equals f(z_t, t) only when z_t' is the
flow map image of z_t; with the pair it is right to first order in (t - t') in expectation
(E[v | z_t] is the flow's velocity), which is why the curriculum shrinks t - t'.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..conditions import average_velocity
from ..conventions import at_least_fp32, autocast_off, broadcast_like, interpolate, null_class_id
from ..jvp import Derivative, finite_difference_along_flow, jvp_along_flow, tangent_along_flow
from ..samplers import ConsistencySampler, Renoise, Sampler
from ..validation import check_bool, check_integer, check_number, check_positive, parse_enum
from ..wrappers import is_data_parallel, unwrap
from .base import NoiseTimeObjective, check_num_classes
from .guidance import drop_labels
from .loss import AdaptiveWeighting, LossOutput, squared_error
from .time_sampling import TimeSampler

ICT_HUBER_SCALE = 0.00054  # iCT section 3.3: c = 0.00054 sqrt(d)


class ConsistencyMode(str, enum.Enum):
    DISCRETE = "discrete"  # iCT / ECT: a pair of times on one noise (CT-2)
    CONTINUOUS = "continuous"  # sCT: the tangent df/dt (CT-3)


class Discretisation(str, enum.Enum):
    ICT = "ict"  # t, t' adjacent points of a Karras grid of N(progress) points
    ECT = "ect"  # t logit-normal, t' from ECT's mapping at stage(progress)


class Distance(str, enum.Enum):
    PSEUDO_HUBER = "pseudo_huber"  # sqrt(||a - b||^2 + c^2) - c (iCT; c = 0: ECT's ||a - b||)
    SQUARED = "squared"  # ||a - b||^2 (the original consistency training)


class GapWeighting(str, enum.Enum):
    SIGMA_GAP = "sigma_gap"  # 1 / (sigma(t) - sigma(t')): iCT's lambda, ECT's 1 / (t - r)
    TIME_GAP = "time_gap"  # 1 / (t - t')
    UNIFORM = "uniform"  # 1


class TangentNormalisation(str, enum.Enum):
    L2 = "l2"  # g / (||g|| + c): sCT as written
    RMS = "rms"  # g / (||g|| / sqrt(dim) + c): FastGen's g_norm_spatial_invariance
    NONE = "none"


# --------------------------------------------------------------------------- the laws


def sigma_of_time(t: Tensor) -> Tensor:
    """EDM's noise level of our time: sigma = t / (1 - t) (infinite at t = 1)."""
    return t / (1.0 - t)


def time_of_sigma(sigma: float | Tensor) -> float | Tensor:
    """Our time of EDM's noise level: t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)


def ict_stage_count(initial_steps: int, final_steps: int) -> int:
    """floor(log2 floor(s1 / s0)) + 1: the number of doublings of iCT's curriculum, plus one."""
    return int(math.floor(math.log2(final_steps // initial_steps))) + 1


def ict_discretisation_steps(progress: float, initial_steps: int = 10, final_steps: int = 1280) -> int:
    """iCT's N(k) = min(s0 2^stage, s1) + 1 with stage = floor(progress * stages) (module docstring)."""
    stages = ict_stage_count(initial_steps, final_steps)
    stage = min(int(math.floor(progress * stages)), stages - 1)
    return min(initial_steps * 2**stage, final_steps) + 1


def karras_sigmas(num_points: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The Karras grid sigma_1 < ... < sigma_N, float64 on the CPU. -> (N,)"""
    fraction = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (low + fraction * (high - low)) ** rho


def ict_interval_probabilities(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """iCT's p(sigma_i) ∝ erf((log sigma_{i+1} - P_mean)/(sqrt 2 P_std)) - erf((log sigma_i - P_mean)/(sqrt 2 P_std)),
    normalised. sigmas: (N,) increasing -> (N - 1,) float64."""
    scaled = (torch.log(sigmas.double()) - p_mean) / (math.sqrt(2.0) * p_std)
    mass = torch.special.erf(scaled[1:]) - torch.special.erf(scaled[:-1])
    return mass / mass.sum()


def ect_stage(progress: float, stages: int) -> int:
    """ECT's stage floor(progress * stages), the last one at the end of training."""
    return min(int(math.floor(progress * stages)), stages - 1)


def ect_previous_time(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping on sigma, in our time: t' = rho t / ((1 - t) + rho t) with
    rho = max(0, 1 - q^-(stage + 1) (1 + k sigmoid(-b sigma(t)))). t: (B,) -> (B,)."""
    sigma = t / (1.0 - t).clamp_min(torch.finfo(t.dtype).tiny)
    shrink = (1.0 + k * torch.sigmoid(-b * sigma)) / q ** (stage + 1)
    rho = (1.0 - shrink).clamp_min(0.0)
    return rho * t / ((1.0 - t) + rho * t)


def gap_weight(t: Tensor, t_prime: Tensor, weighting: GapWeighting) -> Tensor:
    """lambda(t, t') for t' < t (module docstring). -> (B,)"""
    if weighting is GapWeighting.UNIFORM:
        return torch.ones_like(t)
    gap = t - t_prime
    if weighting is GapWeighting.TIME_GAP:
        return 1.0 / gap
    return (1.0 - t) * (1.0 - t_prime) / gap  # 1 / (sigma(t) - sigma(t')), without forming infinities


def pseudo_huber(squared: Tensor, c: float) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c from the per-sample ||a - b||^2 (B,). With c = 0 it is ||a - b||;
    the clamp keeps its gradient finite where a = b."""
    return torch.sqrt((squared + c * c).clamp_min(torch.finfo(squared.dtype).tiny)) - c


def tangent_warmup_factor(progress: float, warmup: float) -> float:
    """sCT's warm-up w = min(1, progress / warmup); 1 throughout when warmup = 0."""
    return 1.0 if warmup == 0 else min(1.0, progress / warmup)


def normalise_tangent(g: Tensor, mode: TangentNormalisation, c: float) -> Tensor:
    """g / (||g|| + c) per sample (sCT), ||g|| / sqrt(dim) for 'rms', g for 'none'. (B, ...) -> (B, ...)"""
    if mode is TangentNormalisation.NONE:
        return g
    norm = g.flatten(1).norm(dim=1)  # (B,)
    if mode is TangentNormalisation.RMS:
        norm = norm / math.sqrt(g[0].numel())
    return g / broadcast_like(norm + c, g)


def consistency_tangent(v: Tensor, u: Tensor, dudt: Tensor, t: Tensor, warmup: float) -> Tensor:
    """g = (v - u) - w t du/dt: df/dt of CT-3 at w = 1. All (B, ...) but t (B,)."""
    return (v - u) - warmup * broadcast_like(t, dudt) * dudt


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True, kw_only=True)
class ConsistencySettings:
    """The knobs of :class:`ConsistencyTraining` (``objective.consistency.*``); defaults are iCT's.

    ``mode``: 'discrete' or 'continuous'. Times: log sigma ~ N(``p_mean``, ``p_std``^2), i.e. t
    logit-normal (iCT / ECT -1.1, 2.0; sCT -1.0, 1.4). Discrete: ``discretisation`` 'ict'
    (``sigma_min``, ``sigma_max``, ``rho``, ``initial_steps`` s0, ``final_steps`` s1) or 'ect'
    (``ect_q``, ``ect_k``, ``ect_b``, ``ect_stages``); ``distance`` with ``huber_c`` (None: iCT's
    0.00054 sqrt(dim)); ``gap_weighting``; ``shared_dropout`` (teacher and student draw the same
    dropout masks). Continuous: ``derivative`` of du/dt and ``finite_difference_step``;
    ``tangent_normalisation`` with ``tangent_c``; ``tangent_warmup`` (share of training over which
    the warm-up factor rises to 1); adaptive weight ``p``, ``c`` (p = 0: plain squared error).
    ``class_dropout`` for class-conditional data. Sampling defaults of the run: ``sample_two_step_time``
    (iCT / ECT: sigma 0.821) and ``sample_renoise`` (:class:`meanflow.samplers.ConsistencySampler`).
    Knobs of the mode not chosen are validated and unused.
    """

    mode: str = ConsistencyMode.DISCRETE.value
    p_mean: float = -1.1
    p_std: float = 2.0
    discretisation: str = Discretisation.ICT.value
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    initial_steps: int = 10
    final_steps: int = 1280
    ect_q: float = 2.0
    ect_k: float = 8.0
    ect_b: float = 1.0
    ect_stages: int = 8
    distance: str = Distance.PSEUDO_HUBER.value
    huber_c: Optional[float] = None
    gap_weighting: str = GapWeighting.SIGMA_GAP.value
    shared_dropout: bool = True
    derivative: str = Derivative.TWO_PASS.value
    finite_difference_step: float = 1e-3
    tangent_normalisation: str = TangentNormalisation.L2.value
    tangent_c: float = 0.1
    tangent_warmup: float = 0.025  # sCT: 10k of 400k iterations
    p: float = 0.0
    c: float = 1e-3
    class_dropout: float = 0.1
    sample_two_step_time: float = 0.821 / 1.821  # sigma_mid = 0.821 (iCT, ECT)
    sample_renoise: str = Renoise.DERIVED.value

    def __post_init__(self) -> None:
        for kind, field in ((ConsistencyMode, "mode"), (Discretisation, "discretisation"), (Distance, "distance"),
                            (GapWeighting, "gap_weighting"), (Derivative, "derivative"),
                            (TangentNormalisation, "tangent_normalisation")):
            parse_enum(kind, getattr(self, field), field)
        check_number("p_mean", self.p_mean)
        check_positive("p_std", self.p_std)
        self.time_sampler(), self.weighting(), self.sampler()  # each record validates its fields
        check_positive("sigma_min", self.sigma_min)
        check_number("sigma_max", self.sigma_max, self.sigma_min, low_open=True)
        check_positive("rho", self.rho)
        check_integer("initial_steps", self.initial_steps, minimum=1)
        check_integer("final_steps", self.final_steps, minimum=self.initial_steps)
        check_number("ect_q", self.ect_q, 1.0, low_open=True)
        check_positive("ect_k", self.ect_k, allow_zero=True)
        check_positive("ect_b", self.ect_b, allow_zero=True)
        check_integer("ect_stages", self.ect_stages, minimum=1)
        if self.huber_c is not None:
            check_positive("huber_c", self.huber_c, allow_zero=True)
        check_bool("shared_dropout", self.shared_dropout)
        check_positive("finite_difference_step", self.finite_difference_step)
        check_positive("tangent_c", self.tangent_c, allow_zero=True)
        check_number("tangent_warmup", self.tangent_warmup, 0.0, 1.0)
        check_number("class_dropout", self.class_dropout, 0.0, 1.0, high_open=True)

    def time_sampler(self) -> TimeSampler:
        """The logit-normal law of t (= the lognormal law of sigma)."""
        return TimeSampler(mu=self.p_mean, sigma=self.p_std)

    def weighting(self) -> AdaptiveWeighting:
        return AdaptiveWeighting(p=self.p, c=self.c)

    def sampler(self) -> ConsistencySampler:
        return ConsistencySampler(self.sample_two_step_time, self.sample_renoise)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ConsistencyTerms:
    """One batch's terms. prediction: f_theta(z_t, t) (discrete) or u_theta(z_t, 0, t) (continuous),
    (B, ...) with gradient; target: its stop-gradient target, fp32; weight: (B,) lambda(t, t')
    (discrete; None otherwise); tangent_norm: (B,) ||g|| before normalisation (continuous)."""

    prediction: Tensor
    target: Tensor
    weight: Optional[Tensor] = None
    tangent_norm: Optional[Tensor] = None


# --------------------------------------------------------------------------- the objective


class ConsistencyTraining(NoiseTimeObjective):
    """Consistency training of ``f(z_t, t) = z_t - t u(z_t, 0, t)`` (module docstring, CT-1 to CT-3).

    The pair of times is (r, t) in the :class:`NoiseTimeObjective` protocol: discrete mode draws
    (t', t) and evaluates the teacher at t' (the network's own r is always 0); continuous mode
    draws (0, t). :meth:`discrete_prediction_and_target` and
    :meth:`continuous_prediction_and_target` are the deterministic entry points.
    """

    name = "consistency"
    Settings = ConsistencySettings

    def __init__(self, settings: ConsistencySettings | None = None, num_classes: Optional[int] = None):
        self.settings = settings or ConsistencySettings()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        s = self.settings
        self.mode = parse_enum(ConsistencyMode, s.mode, "mode")
        self.discretisation = parse_enum(Discretisation, s.discretisation, "discretisation")
        self.distance = parse_enum(Distance, s.distance, "distance")
        self.gap_weighting = parse_enum(GapWeighting, s.gap_weighting, "gap_weighting")
        self.derivative = parse_enum(Derivative, s.derivative, "derivative")
        self.tangent_normalisation = parse_enum(TangentNormalisation, s.tangent_normalisation, "tangent_normalisation")
        self.time_sampler = s.time_sampler()
        self.weighting = s.weighting()
        self.class_dropout = s.class_dropout if num_classes is not None else 0.0

    @classmethod
    def from_settings(cls, settings, num_classes: Optional[int]) -> "ConsistencyTraining":
        return cls(cls.parse_settings(settings), num_classes)

    @property
    def sampler(self) -> Sampler:
        """The flow map at t = 1 (1 NFE), re-noised and applied again for more steps."""
        return self.settings.sampler()

    def check_parallel(self, data_parallel: bool, sharded: bool) -> None:
        if (data_parallel and not sharded and self.mode is ConsistencyMode.CONTINUOUS
                and self.derivative is Derivative.JVP):
            raise ValueError("objective.consistency.derivative='jvp' cannot run through DistributedDataParallel; use "
                             "--set objective.consistency.derivative=two_pass (the default)")

    # ------------------------------------------------------------------- times

    def sample_times(self, batch_size: int, like: Tensor, generator: Optional[torch.Generator],
                     progress: float = 0.0) -> tuple[Tensor, Tensor]:
        """(t', t) in discrete mode, (0, t) in continuous mode; each (B,) with like's dtype and device."""
        if self.mode is ConsistencyMode.DISCRETE and self.discretisation is Discretisation.ICT:
            return self._ict_pair(batch_size, like, generator, progress)
        t = self.time_sampler.draw(batch_size, self.time_sampler.mu, self.time_sampler.sigma, like.device,
                                   like.dtype, generator)
        if self.mode is ConsistencyMode.CONTINUOUS:
            return torch.zeros_like(t), t
        return self.previous_time(t, progress), t

    def grid_times(self, progress: float) -> Tensor:
        """iCT's grid at this progress as our times t_1 < ... < t_N, float64 on the CPU. -> (N,)"""
        s = self.settings
        steps = ict_discretisation_steps(progress, s.initial_steps, s.final_steps)
        return time_of_sigma(karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho))

    def _ict_pair(self, batch_size, like, generator, progress) -> tuple[Tensor, Tensor]:
        """Adjacent grid times (t_i, t_{i+1}), i drawn from iCT's erf law by inverse CDF."""
        s = self.settings
        steps = ict_discretisation_steps(progress, s.initial_steps, s.final_steps)
        sigmas = karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho)
        cdf = torch.cumsum(ict_interval_probabilities(sigmas, s.p_mean, s.p_std), 0)
        cdf = cdf.to(device=like.device, dtype=torch.float32)
        uniform = torch.rand(batch_size, device=like.device, generator=generator) * cdf[-1]
        index = torch.searchsorted(cdf, uniform, right=True).clamp_max(steps - 2)  # (B,) in [0, N - 2]
        times = time_of_sigma(sigmas).to(device=like.device, dtype=like.dtype)
        return times[index], times[index + 1]

    def previous_time(self, t: Tensor, progress: float) -> Tensor:
        """The teacher's time t' for t at this progress: ECT's mapping, or the iCT grid point below
        t (0 below the grid: the boundary f(z_0, 0) = x). t: (B,) -> (B,)."""
        if self.discretisation is Discretisation.ECT:
            s = self.settings
            return ect_previous_time(t, ect_stage(progress, s.ect_stages), s.ect_q, s.ect_k, s.ect_b)
        grid = self.grid_times(progress).to(device=t.device, dtype=t.dtype)
        below = torch.searchsorted(grid, t, right=False) - 1  # the last grid time strictly below t
        return torch.where(below >= 0, grid[below.clamp_min(0)], torch.zeros_like(t))

    # ------------------------------------------------------------------- the terms

    def flow_map(self, model: nn.Module, z: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """f(z_t, t) = z_t - t u(z_t, 0, t) (CT-1), fp32 or wider. z: (B, ...), t: (B,)."""
        u = at_least_fp32(average_velocity(model(z, torch.zeros_like(t), t, labels)))
        return at_least_fp32(z) - broadcast_like(at_least_fp32(t), u) * u

    def discrete_terms(self, model: nn.Module, x: Tensor, noise: Tensor, t_prime: Tensor, t: Tensor,
                       labels: Optional[Tensor]) -> ConsistencyTerms:
        """CT-2 for inputs already checked: student f_theta(z_t, t) through ``model`` (gradient),
        teacher f(z_t', t') on the bare module without gradient, with the student's dropout masks."""
        z_t, z_prime = interpolate(x, noise, t), interpolate(x, noise, t_prime)  # one noise (Eq. 1)
        state = _rng_state(x.device) if self.settings.shared_dropout else None
        prediction = self.flow_map(model, z_t, t, labels)
        if state is not None:
            _restore_rng_state(x.device, state)
        with torch.no_grad():
            target = self.flow_map(unwrap(model), z_prime, t_prime, labels)
        weight = gap_weight(at_least_fp32(t), at_least_fp32(t_prime), self.gap_weighting)
        return ConsistencyTerms(prediction, target.detach(), weight=weight)

    def continuous_terms(self, model: nn.Module, x: Tensor, noise: Tensor, t: Tensor, labels: Optional[Tensor],
                         progress: float = 1.0) -> ConsistencyTerms:
        """CT-3 for inputs already checked: (u_theta(z_t, 0, t), sg(u + g_n)), g_n the normalised,
        warmed-up tangent; du/dt in fp32 with autocast off."""
        z, v = interpolate(x, noise, t), noise - x  # Eq. 1
        r = torch.zeros_like(t)
        if self.derivative is Derivative.JVP:
            if is_data_parallel(model):
                raise ValueError("derivative='jvp' cannot run through DistributedDataParallel; use 'two_pass'")
            with autocast_off(z):
                u, dudt = jvp_along_flow(unwrap(model), *_fp32_rows(z, r, t), labels, at_least_fp32(v))
        else:
            dudt = self.velocity_tangent(model, z, t, labels, v)
            u = average_velocity(model(z, r, t, labels))  # the one gradient forward, through any wrapper
        u32 = at_least_fp32(u).detach()
        warmup = tangent_warmup_factor(progress, self.settings.tangent_warmup)
        g = consistency_tangent(at_least_fp32(v).to(u32.dtype), u32, at_least_fp32(dudt).to(u32.dtype).detach(),
                                at_least_fp32(t).to(u32.dtype), warmup)
        normalised = normalise_tangent(g, self.tangent_normalisation, self.settings.tangent_c)
        return ConsistencyTerms(u, (u32 + normalised).detach(), tangent_norm=g.flatten(1).norm(dim=1))

    def velocity_tangent(self, model: nn.Module, z: Tensor, t: Tensor, labels: Optional[Tensor],
                         velocity: Tensor) -> Tensor:
        """du/dt of u(z, 0, t) along (velocity, dr = 0, dt = 1) on the bare module, no gradient, fp32.

        r = 0 enters as a tensor of zeros with a zero tangent, so meanflow.jvp applies as it is.
        """
        rows = (*_fp32_rows(z, torch.zeros_like(t), t), labels, at_least_fp32(velocity))
        with torch.no_grad(), autocast_off(z):
            if self.derivative is Derivative.FINITE_DIFFERENCE:
                return finite_difference_along_flow(unwrap(model), *rows, step=self.settings.finite_difference_step)
            return tangent_along_flow(unwrap(model), *rows)

    def flow_map_derivative(self, model: nn.Module, z: Tensor, t: Tensor, labels: Optional[Tensor],
                            velocity: Tensor) -> Tensor:
        """df/dt along dz/dt = velocity (CT-3 at w = 1), no gradient. z, velocity: (B, ...); t: (B,)."""
        with torch.no_grad():
            u = at_least_fp32(average_velocity(unwrap(model)(z, torch.zeros_like(t), t, labels)))
            dudt = self.velocity_tangent(model, z, t, labels, velocity).to(u.dtype)
        return consistency_tangent(at_least_fp32(velocity).to(u.dtype), u, dudt, at_least_fp32(t).to(u.dtype), 1.0)

    def terms(self, model, x, noise, r, t, labels, progress: float = 1.0) -> ConsistencyTerms:
        """Either mode's terms; in discrete mode r is the teacher's time t'."""
        if self.mode is ConsistencyMode.DISCRETE:
            return self.discrete_terms(model, x, noise, r, t, labels)
        return self.continuous_terms(model, x, noise, t, labels, progress)

    def compute(self, model, x, noise, r, t, labels=None) -> tuple[Tensor, Tensor]:
        """(prediction, sg(target)) with the warm-up finished (progress 1)."""
        terms = self.terms(model, x, noise, r, t, labels)
        return terms.prediction, terms.target

    # ------------------------------------------------------------------- deterministic entry points

    def discrete_prediction_and_target(self, model: nn.Module, x: Tensor, noise: Tensor, t: Tensor,
                                       labels: Optional[Tensor] = None, *, t_prime: Optional[Tensor] = None,
                                       progress: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """(f_theta(z_t, t), sg f(z_t', t')) on the same noise, checked. x, noise: (B, ...); t: (B,);
        exactly one of ``t_prime`` (B,) with 0 <= t' < t, or ``progress`` in [0, 1] (t' from the
        curriculum, :meth:`previous_time`); labels (B,) (null id allowed) or None."""
        if (t_prime is None) == (progress is None):
            raise ValueError("give exactly one of t_prime (the teacher's times) and progress (t' from the curriculum)")
        if progress is not None:
            check_number("progress", progress, 0.0, 1.0)
            t_prime = self.previous_time(t, progress)
        labels = self.check_pair(x, noise, t_prime, t, labels)
        terms = self.discrete_terms(model, x, noise, t_prime, t, labels)
        return terms.prediction, terms.target

    def continuous_prediction_and_target(self, model: nn.Module, x: Tensor, noise: Tensor, t: Tensor,
                                         labels: Optional[Tensor] = None, *,
                                         progress: float = 1.0) -> tuple[Tensor, Tensor]:
        """(u_theta(z_t, 0, t), sg(u + g_n)) for explicit inputs, checked; ``progress`` sets the
        warm-up factor (default 1: finished)."""
        check_number("progress", progress, 0.0, 1.0)
        labels = self.check_pair(x, noise, torch.zeros_like(t), t, labels)
        terms = self.continuous_terms(model, x, noise, t, labels, progress)
        return terms.prediction, terms.target

    def prediction_and_target(self, model, x, noise, r, t, labels=None) -> tuple[Tensor, Tensor]:
        """The protocol's entry: r is t' (discrete mode) or must be 0 (continuous mode)."""
        if self.mode is ConsistencyMode.DISCRETE:
            return self.discrete_prediction_and_target(model, x, noise, t, labels, t_prime=r)
        self.check_pair(x, noise, r, t, labels)
        return self.continuous_prediction_and_target(model, x, noise, t, labels)

    def check_pair(self, x: Tensor, noise: Tensor, r: Tensor, t: Tensor, labels: Optional[Tensor]) -> Optional[Tensor]:
        """The base checks, then t' < t (discrete) or r = 0 (continuous); returns the labels."""
        labels = self.check_inputs(x, noise, r, t, labels)
        if self.mode is ConsistencyMode.DISCRETE and not bool((r < t).all()):
            raise ValueError("the teacher's time t' must be strictly below t in every row (t' < t)")
        if self.mode is ConsistencyMode.CONTINUOUS and not bool((r == 0).all()):
            raise ValueError("continuous consistency training evaluates the network at r = 0; pass r = 0")
        return labels

    # ------------------------------------------------------------------- the loss

    def loss(self, model, batch, labels=None, *, generator=None, progress=0.0) -> LossOutput:
        """Draw noise, the times of the curriculum and label dropout for ``x`` (B, ...); the loss."""
        x, labels, noise, r, t = self.draw(batch, labels, generator, progress)
        if labels is not None:
            labels = drop_labels(labels, self.class_dropout, null_class_id(self.num_classes), generator)
        return self.loss_output(self.terms(model, x, noise, r, t, labels, progress), x, noise, r, t, progress)

    def loss_at(self, model, x, noise, r, t, labels=None, *, progress: float = 1.0) -> LossOutput:
        """The loss for explicit inputs (r: t' or 0, see :meth:`prediction_and_target`), checked."""
        check_number("progress", progress, 0.0, 1.0)
        labels = self.check_pair(x, noise, r, t, labels)
        return self.loss_output(self.terms(model, x, noise, r, t, labels, progress), x, noise, r, t, progress)

    def loss_output(self, terms: ConsistencyTerms, x: Tensor, noise: Tensor, r: Tensor, t: Tensor,
                    progress: float) -> LossOutput:
        """CT-2 (lambda d) or the weighted squared error of CT-3, batch mean in fp32, plus metrics:
        the curriculum's N (iCT) / stage (ECT) / warm-up factor (continuous)."""
        error = squared_error(terms.prediction, terms.target)  # (B,)
        if self.mode is ConsistencyMode.DISCRETE:
            per_sample = terms.weight.to(error.dtype) * self.discrete_distance(error, x)
        else:
            per_sample = self.weighting(error)
        loss = per_sample.mean()
        with torch.no_grad():
            metrics = {"loss": loss.detach(), "unweighted_error": error.detach().mean()}
            metrics.update(self.curriculum_metrics(terms, noise - x, r, t, progress))
        return LossOutput(loss=loss, per_sample=per_sample, metrics=metrics)

    def discrete_distance(self, error: Tensor, x: Tensor) -> Tensor:
        """d of CT-2 from the per-sample squared error (B,); x sets iCT's default c."""
        if self.distance is Distance.SQUARED:
            return error
        c = self.settings.huber_c
        return pseudo_huber(error, ICT_HUBER_SCALE * math.sqrt(x[0].numel()) if c is None else c)

    def curriculum_metrics(self, terms: ConsistencyTerms, v: Tensor, r: Tensor, t: Tensor,
                           progress: float) -> dict[str, Tensor]:
        """0-d tensors: where the curriculum stands, and the mean gap t - t' (discrete) or the
        tangent norm and velocity error (continuous)."""
        s = self.settings
        if self.mode is ConsistencyMode.CONTINUOUS:
            return {"tangent_warmup": t.new_tensor(tangent_warmup_factor(progress, s.tangent_warmup)),
                    "tangent_norm": terms.tangent_norm.mean(),
                    "velocity_error": squared_error(terms.prediction.detach(), v).mean()}
        if self.discretisation is Discretisation.ICT:
            where = {"discretisation_steps": t.new_tensor(float(ict_discretisation_steps(progress, s.initial_steps,
                                                                                         s.final_steps)))}
        else:
            where = {"ect_stage": t.new_tensor(float(ect_stage(progress, s.ect_stages)))}
        return {**where, "time_gap": (t - r).mean()}


def _rng_state(device: torch.device) -> tuple:
    """The generator states a dropout layer on ``device`` draws from (CPU, and the CUDA device's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_rng_state(device: torch.device, state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _fp32_rows(z: Tensor, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return at_least_fp32(z), at_least_fp32(r), at_least_fp32(t)

