"""A small MLP average-velocity model for low-dimensional data (the 2-D toys).

It declares an explicit tangent (:meth:`MLP.forward_with_tangent`): the MeanFlow and iMF targets
need du/dt along (v, 0, 1) (Eq. 5, F-2), and on these small batches ``torch.func.jvp`` spends most
of its time in per-op overhead. Along a tangent (dz, dr, dt) only ``z``, ``t`` and ``t - r`` move;
the labels and the guidance inputs (omega, [t_min, t_max]) are constants, so their embeddings
have zero tangent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from ..conditions import (GUIDANCE_INTERVAL, GUIDANCE_SCALE, ConditionsLike, ModelOutput, Tangent, as_conditions,
                          check_tangent_rows)
from .base import AverageVelocityNetwork, ConfigRecord
from .embeddings import ScalarEmbedder, TimeConditioning
from .tangent import linear_with_tangent, silu_with_tangent


@dataclass(frozen=True)
class MLPConfig(ConfigRecord):
    """Hyper-parameters of :class:`MLP`.

    data_dim: size of each sample (2 for the toys); hidden_size: width; depth: hidden layers;
    num_classes: None for unconditional data; frequency_size: sinusoidal features per time;
    condition_blocks: also add a learned projection of the conditioning vector inside every
    block (not only at the input); guidance_conditions: also take the guidance scale omega and
    interval [t_min, t_max] as conditions (Improved MeanFlow); auxiliary_velocity: also return
    an instantaneous velocity from a second head (``ModelOutput(u, v)``, Improved MeanFlow).
    """

    data_dim: int = 2
    hidden_size: int = 256
    depth: int = 4
    num_classes: Optional[int] = None
    frequency_size: int = 64
    condition_blocks: bool = True
    guidance_conditions: bool = False
    auxiliary_velocity: bool = False

    def __post_init__(self) -> None:
        for name in ("condition_blocks", "guidance_conditions", "auxiliary_velocity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MLPConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("data_dim", "hidden_size", "depth", "frequency_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLPConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"MLPConfig.num_classes must be >= 1 or None, got {self.num_classes}")


class MLP(AverageVelocityNetwork):
    """``u(z, r, t, conditions)`` for flat data. z: (B, D) -> (B, D).

    The conditioning vector c = embed(t) + embed(t - r) [+ embed(y)] is added to the first hidden
    layer and, with ``condition_blocks``, a per-block projection of SiLU(c) enters every residual
    block: u(z, 0, 1) (the whole transport map) and u(z, t, t) (a local velocity) are very
    different functions of z, and conditioning at the input only leaves the deeper layers blind
    to which one is asked for. The last layer starts at zero, so a fresh model predicts u = 0.

    With ``guidance_conditions`` the conditioning vector also holds embed(1 - 1/omega) +
    embed(t_min) + embed(t_max) (the official imfDiT embeds the scale as 1 - 1/omega, which maps
    [1, inf) to [0, 1)); with ``auxiliary_velocity`` a second small head reads the same trunk and
    the call returns ``ModelOutput(u, v)``, v an instantaneous velocity (zero at start too).

    Called with ``tangent=Tangent(dz, dr, dt)`` for its leading rows it returns ``ModelOutput(u, v,
    du)`` in one pass (:meth:`forward_with_tangent`).
    """

    @property
    def explicit_tangent(self) -> bool:
        """True for this class: :meth:`forward_with_tangent` differentiates :meth:`forward`'s ``u``.
        False for a subclass that overrides ``forward`` (its ``u`` may be another function, and its
        ``forward`` may not take ``tangent=``), so the objectives fall back to ``torch.func.jvp``."""
        return type(self).forward is MLP.forward

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.conditioning = TimeConditioning(width, config.num_classes, config.frequency_size)
        self.input = nn.Linear(config.data_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(config.depth - 1)
        )
        self.block_conditioning = nn.ModuleList(
            nn.Linear(width, width) for _ in range(config.depth - 1 if config.condition_blocks else 0)
        )
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(width, config.data_dim))
        nn.init.zeros_(self.output[1].weight)
        nn.init.zeros_(self.output[1].bias)
        self.guidance_embedders = nn.ModuleList(
            ScalarEmbedder(width, config.frequency_size) for _ in range(3 if config.guidance_conditions else 0)
        )  # 1 - 1/omega, t_min, t_max
        self.velocity_head = None
        if config.auxiliary_velocity:
            self.velocity_head = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                               nn.Linear(width, config.data_dim))
            nn.init.zeros_(self.velocity_head[3].weight)
            nn.init.zeros_(self.velocity_head[3].bias)

    @property
    def accepted_conditions(self) -> frozenset[str]:
        guidance = {GUIDANCE_SCALE, GUIDANCE_INTERVAL} if self.config.guidance_conditions else set()
        return super().accepted_conditions | guidance

    @property
    def auxiliary_velocity(self) -> bool:
        """True if the call returns an auxiliary instantaneous velocity ``v`` beside ``u``."""
        return self.config.auxiliary_velocity

    def forward(self, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike = None,
                tangent: Tangent | None = None) -> Tensor | ModelOutput:
        """z: (B, D); r, t: (B,); conditions: labels (B,), a Conditions record or None.

        Returns u (B, D), or ``ModelOutput(u, v)`` (each (B, D)) with ``auxiliary_velocity``; with a
        ``tangent`` (dz, dr, dt) of the leading rows, ``ModelOutput(u, v, du)`` from :meth:`forward_with_tangent`.
        """
        if tangent is not None:
            return self.forward_with_tangent(z, r, t, conditions, tangent.dz, tangent.dr, tangent.dt)
        c = self.conditioning(r, t, self.read_labels(conditions))  # (B, W)
        if self.guidance_embedders:
            c = c + self._guidance_embedding(as_conditions(conditions))  # (B, W)
        h = self.input(z) + c  # (B, W)
        c = nn.functional.silu(c)
        for index, block in enumerate(self.blocks):
            if self.block_conditioning:
                h = h + block(h + self.block_conditioning[index](c))  # (B, W) residual
            else:
                h = h + block(h)
        u = self.output(h)  # (B, D)
        if self.velocity_head is None:
            return u
        return ModelOutput(u=u, v=self.velocity_head(h))  # v: (B, D)

    def forward_with_tangent(self, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike, dz: Tensor,
                             dr: Tensor, dt: Tensor) -> ModelOutput:
        """(u, v, du): :meth:`forward`'s outputs over the batch and the derivative of u's leading
        M rows along (dz, dr, dt), in one pass (see :mod:`meanflow.models.tangent`).

        ``u`` and ``v`` (the auxiliary head, None without one; it needs no tangent) are recorded
        by autograd as in :meth:`forward` (the same ops, so the same values); ``du`` is computed
        without gradient. The conditioning vector moves through embed(t) and
        embed(t - r) (by dt and dt - dr); the label and guidance embeddings are constant. With
        (v, 0, 1) this is d/dt u of Eq. 5. It reads the layers' weights directly, so an FSDP2-sharded
        MLP differentiates through ``torch.func.jvp`` instead (:func:`meanflow.jvp.one_pass_tangent`).

        Args:
            z: (B, D) the state; dz: (M, D) the tangent of its first M rows.
            r, t: (B,) the times; dr, dt: (M,) their tangents.
            conditions: as in :meth:`forward`.
        Returns:
            ModelOutput: u, v (B, D) each (v None without the head); du (M, D).
        """
        check_tangent_rows(z, dz, dr, dt)
        labels = self.read_labels(conditions)
        c, dc = self.conditioning.forward_with_tangent(r, t, labels, dr, dt)  # (B, W), (M, W)
        if self.guidance_embedders:
            c = c + self._guidance_embedding(as_conditions(conditions))  # a constant: primal only
        h, dh = linear_with_tangent(z, dz, self.input.weight, self.input.bias)
        h, dh = h + c, dh + dc
        c, dc = silu_with_tangent(c, dc)
        for index, block in enumerate(self.blocks):
            a, da = h, dh
            if self.block_conditioning:
                conditioning = self.block_conditioning[index]
                a, da = linear_with_tangent(c, dc, conditioning.weight, conditioning.bias)
                a, da = h + a, dh + da  # h + projection(SiLU(c)), as forward adds them
            a, da = silu_with_tangent(a, da)
            a, da = linear_with_tangent(a, da, block[1].weight, block[1].bias)
            h, dh = h + a, dh + da  # (B, W) residual
        v = None if self.velocity_head is None else self.velocity_head(h)  # (B, D)
        h, dh = silu_with_tangent(h, dh)
        u, du = linear_with_tangent(h, dh, self.output[1].weight, self.output[1].bias)  # (B, D), (M, D)
        return ModelOutput(u=u, v=v, du=du)

    def _guidance_embedding(self, conditions) -> Tensor:
        """embed(1 - 1/omega) + embed(t_min) + embed(t_max). -> (B, W)"""
        omega, interval = conditions.guidance_scale, conditions.guidance_interval
        if omega is None or interval is None:
            raise ValueError("this MLP is conditioned on the guidance scale and interval (guidance_conditions=True): "
                             "pass Conditions(guidance_scale=(B,), guidance_interval=(B, 2))")
        dtype = self.input.weight.dtype
        scale, start, end = self.guidance_embedders
        return scale(1.0 - 1.0 / omega.to(dtype)) + start(interval[:, 0].to(dtype)) + end(interval[:, 1].to(dtype))
