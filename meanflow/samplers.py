"""How a trained network is sampled, as an object an objective declares and a run record stores.

An objective knows how its network is meant to be sampled: MeanFlow's network is an average
velocity, stepped with Eq. 3 (one step = 1 NFE); flow matching's is an instantaneous velocity,
integrated as an ODE. A :class:`Sampler` wraps the pure functions of :mod:`meanflow.sampling`
with that choice, counts the true number of network evaluations (NFE), and round-trips through
JSON (``to_dict`` / :func:`sampler_from_dict`) so ``meanflow sample`` and ``meanflow eval`` use
the run's own sampler without being told.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .conditions import Conditions, ConditionsLike, as_conditions
from .conventions import as_time, broadcast_like
from .sampling import OdeMethod, guided_prediction, sample, sample_ode
from .validation import check_known_keys, check_number, parse_enum


class Sampler:
    """Base of the samplers: ``sampler(model, noise, conditions, num_steps=...)`` -> samples."""

    def with_guidance(self, omega: Optional[float] = None, interval: Optional[Sequence[float]] = None) -> "Sampler":
        """This sampler at a learnt guidance setting; only networks conditioned on one (iMF) have it."""
        if omega is None and interval is None:
            return self
        raise ValueError(f"this run's {self.name} sampler has no learnt guidance to set (--omega / --interval are "
                         "for iMF runs); classifier-free guidance at inference is --guidance-scale")

    name: ClassVar[str]
    default_steps: ClassVar[int]

    def __call__(self, model: nn.Module, noise: Tensor, conditions: ConditionsLike = None, *, num_steps: int,
                 intermediate: Optional[float] = None, guidance_scale: float = 1.0,
                 null_label: Optional[int] = None) -> Tensor:
        raise NotImplementedError

    def nfe(self, num_steps: int, guidance_scale: float = 1.0) -> int:
        """Network evaluations per sample for ``num_steps`` steps (CFG at inference doubles them)."""
        return self.evaluations(num_steps) * (2 if guidance_scale != 1.0 else 1)

    def evaluations(self, num_steps: int) -> int:
        return num_steps

    def describe(self, num_steps: int, intermediate: Optional[float] = None) -> str:
        """A short name for file names and tables, e.g. ``steps2_t0.3`` or ``heun8``."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


@dataclass(frozen=True)
class AverageVelocitySampler(Sampler):
    """``z_r = z_t - (t - r) u(z_t, r, t)`` on a decreasing grid (Eq. 3): 1 NFE per step."""

    name: ClassVar[str] = "average_velocity"
    default_steps: ClassVar[int] = 1

    def __call__(self, model, noise, conditions=None, *, num_steps, intermediate=None, guidance_scale=1.0,
                 null_label=None):
        return sample(model, noise, conditions, num_steps=num_steps, intermediate=intermediate,
                      guidance_scale=guidance_scale, null_label=null_label)

    def describe(self, num_steps: int, intermediate: Optional[float] = None) -> str:
        return f"steps{num_steps}" + (f"_t{intermediate:g}" if intermediate is not None and num_steps == 2 else "")


@dataclass(frozen=True)
class VelocityOdeSampler(Sampler):
    """Integrates the instantaneous velocity ``u(z, t, t)`` (Euler: 1 NFE a step; Heun: 2, one on the last)."""

    method: OdeMethod = OdeMethod.EULER
    name: ClassVar[str] = "velocity_ode"
    default_steps: ClassVar[int] = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_enum(OdeMethod, self.method, "sampler method"))

    def __call__(self, model, noise, conditions=None, *, num_steps, intermediate=None, guidance_scale=1.0,
                 null_label=None):
        if intermediate is not None:
            raise ValueError("an intermediate time applies to the average-velocity sampler only, not to an ODE")
        return sample_ode(model, noise, conditions, num_steps=num_steps, method=self.method,
                          guidance_scale=guidance_scale, null_label=null_label)

    def evaluations(self, num_steps: int) -> int:
        return 2 * num_steps - 1 if self.method is OdeMethod.HEUN else num_steps

    def describe(self, num_steps: int, intermediate: Optional[float] = None) -> str:
        return f"{self.method.value}{num_steps}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method.value}


@dataclass(frozen=True)
class ImfSampler(Sampler):
    """Average-velocity steps (Eq. 3) of a network conditioned on a guidance scale and interval
    (Improved MeanFlow). ``omega`` and ``interval`` ([t_min, t_max]) reach the network as its
    conditions, the same for every sample and step; they are the run's defaults, stored in its
    record, and :meth:`with_guidance` picks others at inference. Guidance is learnt, not computed:
    1 NFE per step whatever the setting, and no classifier-free (two-pass) guidance on top.
    """

    omega: float = 1.0
    interval: tuple = (0.0, 1.0)
    name: ClassVar[str] = "imf"
    default_steps: ClassVar[int] = 1

    def __post_init__(self) -> None:
        check_number("omega (the guidance scale an iMF network is conditioned on)", self.omega, 1.0)
        if not isinstance(self.interval, (list, tuple)) or len(self.interval) != 2:
            raise ValueError(f"the guidance interval must be two times [t_min, t_max], got {self.interval!r}")
        t_min, t_max = self.interval
        check_number("interval start t_min", t_min, 0.0, 1.0)
        check_number("interval end t_max", t_max, t_min, 1.0)
        object.__setattr__(self, "interval", (float(t_min), float(t_max)))
        object.__setattr__(self, "omega", float(self.omega))

    def with_guidance(self, omega: Optional[float] = None, interval: Optional[Sequence[float]] = None) -> "ImfSampler":
        """The same sampler at another guidance scale and / or interval (None keeps the current one)."""
        return ImfSampler(self.omega if omega is None else omega, self.interval if interval is None else interval)

    def __call__(self, model, noise, conditions=None, *, num_steps, intermediate=None, guidance_scale=1.0,
                 null_label=None):
        if guidance_scale != 1.0:
            raise ValueError("an iMF network learns its guidance: choose it with omega (--omega) and the interval "
                             "(--interval), not with classifier-free guidance (--guidance-scale)")
        batch = noise.shape[0]
        record = Conditions(labels=as_conditions(conditions).labels,
                            guidance_scale=torch.full((batch,), self.omega, device=noise.device, dtype=noise.dtype),
                            guidance_interval=torch.tensor([list(self.interval)], device=noise.device,
                                                           dtype=noise.dtype).expand(batch, 2))
        return sample(model, noise, record, num_steps=num_steps, intermediate=intermediate)

    def nfe(self, num_steps: int, guidance_scale: float = 1.0) -> int:
        return num_steps

    def describe(self, num_steps: int, intermediate: Optional[float] = None) -> str:
        t_min, t_max = self.interval
        return f"{AverageVelocitySampler().describe(num_steps, intermediate)}_w{self.omega:g}_i{t_min:g}-{t_max:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "omega": self.omega, "interval": list(self.interval)}


class Renoise(str, enum.Enum):
    """Where a multistep consistency sampler takes the noise it re-noises with (see
    :class:`ConsistencySampler`)."""

    DERIVED = "derived"  # fresh noise, a pseudo-random function of the sample's own noise
    INITIAL = "initial"  # the sample's own starting noise again


def derived_noise(noise: Tensor, step: int) -> Tensor:
    """Fresh standard normal noise for re-noising step ``step`` (>= 1), a function of each row of
    ``noise`` alone. noise: (B, ...) -> (B, ...), same dtype and device.

    Row i is drawn by numpy's PCG64 seeded with the 128-bit BLAKE2b digest of row i's bytes and
    ``step``: independent of the batch it sits in, of the device and of the process, so the API,
    ``meanflow sample`` and ``meanflow eval`` (which all start from :func:`meanflow.noise.sample_noise`)
    re-noise identically. A digest is a pseudo-random function of the row: the fresh noise behaves
    as independent of it, which re-using the starting noise does not (see ConsistencySampler).
    """
    rows = noise.detach().cpu().contiguous().numpy()
    draw_dtype = np.float64 if rows.dtype == np.float64 else np.float32  # half precision: drawn in fp32
    fresh = []
    for row in rows:
        digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
        words = np.frombuffer(digest, dtype=np.uint32).tolist()
        fresh.append(np.random.default_rng([*words, int(step)]).standard_normal(row.shape, dtype=draw_dtype))
    stacked = np.stack(fresh) if fresh else np.zeros(rows.shape, dtype=draw_dtype)
    return torch.from_numpy(stacked).to(device=noise.device, dtype=noise.dtype)


@torch.no_grad()
def sample_consistency(model: nn.Module, noise: Tensor, conditions: ConditionsLike, times: Sequence[float],
                       renoise: Renoise = Renoise.DERIVED, guidance_scale: float = 1.0,
                       null_label: Optional[int] = None) -> Tensor:
    """Multistep consistency sampling with the flow map ``f(z_t, t) = z_t - t u(z_t, 0, t)``.

    ``times`` = (1, t_1, ..., t_{k-1}), decreasing in (0, 1]: ``x = f(e, 1)``, then for each
    t_i: ``z = (1 - t_i) x + t_i e_i`` (Eq. 1) and ``x = f(z, t_i)``. ``e_i`` is the sample's own
    noise (``Renoise.INITIAL``) or :func:`derived_noise` (``Renoise.DERIVED``). One NFE per time
    (two with inference-time CFG, which is linear in u and therefore in f). noise: (B, ...) -> (B, ...).
    """
    renoise = parse_enum(Renoise, renoise, "renoise")
    batch = noise.shape[0]
    x = noise
    for index, time in enumerate(times):
        if index == 0:
            z = noise
        else:
            e = noise if renoise is Renoise.INITIAL else derived_noise(noise, index)
            z = (1.0 - time) * x + time * e  # Eq. 1 at t_i
        t = as_time(time, batch, z)
        u = guided_prediction(model, z, torch.zeros_like(t), t, conditions, guidance_scale, null_label)
        x = z - broadcast_like(t, z) * u.to(z.dtype)  # f(z_t, t): one step to data
    return x


@dataclass(frozen=True)
class ConsistencySampler(Sampler):
    """Consistency-model sampling of an average-velocity network at r = 0 (FAMILY.md F5).

    One step is ``x = f(e, 1) = e - u(e, 0, 1)`` (1 NFE); k steps re-noise the estimate to the
    times t_1 > ... > t_{k-1} and apply f again (Song et al. 2023, Algorithm 1), 1 NFE each.
    Times: for 2 steps ``two_step_time`` (or the ``intermediate`` of a call), for k > 2 the inner
    points of the uniform grid, (k - 1)/k, ..., 1/k.

    ``renoise`` 'derived' (the default) re-noises with fresh noise derived deterministically from
    each sample's own noise (:func:`derived_noise`); 'initial' re-uses the starting noise. Both are
    deterministic given ``noise``. Only fresh noise is faithful: for Gaussian data N(mu, s^2) and
    the exact flow map, x = mu + s e, and re-noising with the same e gives z_t = (1 - t) mu +
    ((1 - t) s + t) e, whose std (1 - t) s + t exceeds the marginal's b_t = sqrt((1 - t)^2 s^2 + t^2)
    for every s > 0 and 0 < t < 1 (by the cross term 2 t (1 - t) s); the second step then returns
    std s ((1 - t) s + t) / b_t > s (too wide), where fresh noise returns the data law exactly
    (tests/test_consistency.py pins both).
    """

    two_step_time: float = 0.5
    renoise: Renoise = Renoise.DERIVED
    name: ClassVar[str] = "consistency"
    default_steps: ClassVar[int] = 1

    def __post_init__(self) -> None:
        check_number("two_step_time (the re-noising time of 2-step consistency sampling)", self.two_step_time,
                     0.0, 1.0, low_open=True, high_open=True)
        object.__setattr__(self, "two_step_time", float(self.two_step_time))
        object.__setattr__(self, "renoise", parse_enum(Renoise, self.renoise, "renoise"))

    def times(self, num_steps: int, intermediate: Optional[float] = None) -> list[float]:
        """The k evaluation times (1, t_1, ..., t_{k-1}) for ``num_steps`` = k."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if intermediate is not None:
            if num_steps != 2:
                raise ValueError(f"an intermediate time applies to 2-step sampling only, got num_steps={num_steps}")
            check_number("the intermediate time", intermediate, 0.0, 1.0, low_open=True, high_open=True)
            return [1.0, float(intermediate)]
        if num_steps == 2:
            return [1.0, self.two_step_time]
        return [1.0 - index / num_steps for index in range(num_steps)]

    def __call__(self, model, noise, conditions=None, *, num_steps, intermediate=None, guidance_scale=1.0,
                 null_label=None):
        return sample_consistency(model, noise, conditions, self.times(num_steps, intermediate), self.renoise,
                                  guidance_scale, null_label)

    def describe(self, num_steps: int, intermediate: Optional[float] = None) -> str:
        times = self.times(num_steps, intermediate)
        middle = f"_t{times[1]:g}" if num_steps == 2 else ""
        return f"cm{num_steps}{middle}" + ("_same-noise" if self.renoise is Renoise.INITIAL else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "two_step_time": self.two_step_time, "renoise": self.renoise.value}


SAMPLERS: dict[str, type[Sampler]] = {
    AverageVelocitySampler.name: AverageVelocitySampler,
    VelocityOdeSampler.name: VelocityOdeSampler,
    ImfSampler.name: ImfSampler,
    ConsistencySampler.name: ConsistencySampler,
}


def sampler_from_dict(data: dict[str, Any]) -> Sampler:
    """The sampler a run record stores (``{"name": ..., **settings}``)."""
    if not isinstance(data, dict) or data.get("name") not in SAMPLERS:
        raise ValueError(f"unknown sampler {data!r}; valid sampler names are {sorted(SAMPLERS)}")
    kind = SAMPLERS[data["name"]]
    settings = {key: value for key, value in data.items() if key != "name"}
    check_known_keys(f"settings of sampler {data['name']!r}", settings, getattr(kind, "__dataclass_fields__", {}))
    return kind(**settings)


def ode_sampler(method: Optional[str]) -> Optional[Sampler]:
    """The velocity-ODE sampler for an ``--ode euler|heun`` choice, or None when not given."""
    return None if method is None else VelocityOdeSampler(method)
