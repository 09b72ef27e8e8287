"""A DDPM++-style U-Net for pixel-space MeanFlow models (spec section 7, CIFAR-10 recipe).

The network maps ``(z_t, r, t, y)`` to the average velocity ``u(z_t, r, t)`` (Eq. 2) with
``z_t``'s shape. Layout, top to bottom:

- conditioning: two sinusoidal ``ScalarEmbedder``\\ s, one for ``t`` and one for ``t - r``, whose
  outputs are concatenated (spec section 4, "concatenated (U-Net)") and mapped by a two-layer MLP
  to the embedding width ``4 * base_channels``; a class-conditional model adds a label embedding
  of the same width. The subtraction ``t - r`` happens inside ``forward`` so the MeanFlow JVP with
  tangent ``(dr, dt) = (0, 1)`` (Eq. 5) differentiates through it.
- encoder: a 3x3 input conv, then per resolution level ``num_res_blocks`` residual blocks (each
  followed by self-attention at the resolutions in ``attention_resolutions``) and, between levels,
  a residual block that halves the resolution.
- middle: residual block, self-attention, residual block at the lowest resolution.
- decoder: per level ``num_res_blocks + 1`` residual blocks, each taking the matching encoder
  activation concatenated along channels (the U-Net skips), one self-attention after the last
  block of each level in ``attention_resolutions``, and, between levels, a residual block that
  doubles the resolution.
- output: GroupNorm, SiLU, and a 3x3 conv that starts at zero, so a fresh model predicts
  ``u = 0`` everywhere: training starts from the trivial field rather than from random noise,
  the usual practice for diffusion and flow networks.

Design choices (DDPM++ habits; together they put the CIFAR-10 preset at 56,227,587 parameters,
0.6% above the paper's 55.9M):

- Conditioning enters every residual block as a per-channel bias added after its first conv,
  ``h = conv1(...) + Linear(SiLU(c))``, before the second GroupNorm (the DDPM habit; a
  scale-and-shift variant would add 4.3M parameters to the CIFAR-10 preset).
- Attention at a resolution follows every encoder block of that level but only the last decoder
  block of the level; the middle block always attends. Attention after all five decoder blocks
  of the 16x16 level would add 1.05M parameters (57.3M, 2.5% above the paper's size).
- Each time embedder is ``ScalarEmbedder(base_channels)`` (256 sinusoidal features -> 128 ->
  128); their concatenation (256) goes through Linear-SiLU-Linear to ``4 * base_channels``.
- Residual sums are scaled by ``1/sqrt(2)``, ``(x + F(x)) / sqrt(2)``, in residual and attention
  blocks alike, so activations keep unit scale as depth grows.
- Resampling is residual: a down block average-pools (2x2) and an up block repeats pixels
  (nearest, 2x) in both its skip and its residual branch, with no strided or transposed conv.
- Every level uses ``base_channels * multiplier`` channels, including the input conv's output.
- GroupNorm uses 32 groups; narrow (test) models use fewer so at least 4 channels share a group.
- ``num_heads`` counts attention heads (default 1, one head over all channels, as in DDPM++).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditions import ConditionsLike, ModelOutput, Tangent, check_tangent_rows
from .base import AverageVelocityNetwork, ConfigRecord
from .embeddings import LabelEmbedder, ScalarEmbedder
from .tangent import (
    attention_with_tangent,
    conv2d_with_tangent,
    dropout_with_tangent,
    group_norm_with_tangent,
    linear_map_with_tangent,
    linear_with_tangent,
    silu_with_tangent,
)

_SKIP_SCALE = 1.0 / math.sqrt(2.0)
_MAX_GROUPS = 32


@dataclass(frozen=True)
class UNetConfig(ConfigRecord):
    """Hyper-parameters of :class:`UNet`. Plain data: round-trips through JSON via ``to_dict``.

    Attributes:
        input_size: height and width of the (square) input, in pixels.
        in_channels: channels of the input; the output has the same count.
        base_channels: the unit of width; level ``i`` has ``base_channels * channel_multipliers[i]``
            channels and the conditioning vector has ``4 * base_channels``.
        channel_multipliers: one multiplier per resolution level; the resolution halves between
            consecutive levels, so there are ``len(channel_multipliers) - 1`` down-samplings.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: resolutions (in pixels) whose blocks are followed by
            self-attention; each must be one of the level resolutions.
        dropout: dropout probability inside residual blocks, before the second conv (0.2 in the
            CIFAR-10 recipe).
        num_heads: attention heads; must divide the channel count of every level with attention.
        num_classes: number of classes of a class-conditional model, or None for unconditional.
            The null class id is ``num_classes``.
        frequency_size: number of sinusoidal features per embedded time (even).
    """

    input_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (2, 2, 2)
    num_res_blocks: int = 4
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    num_heads: int = 1
    num_classes: int | None = None
    frequency_size: int = 256

    def __post_init__(self) -> None:
        # Lists (from JSON) become tuples so the config stays hashable and immutable.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        for name in ("input_size", "in_channels", "base_channels", "num_res_blocks", "num_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.channel_multipliers or not all(_is_int(m) and m >= 1 for m in self.channel_multipliers):
            raise ValueError(
                f"channel_multipliers must be a non-empty tuple of positive integers, got {self.channel_multipliers!r}"
            )
        num_downsamples = len(self.channel_multipliers) - 1
        if self.input_size % (2**num_downsamples):
            raise ValueError(
                f"input_size must be divisible by 2**(len(channel_multipliers) - 1) = {2**num_downsamples}, "
                f"got {self.input_size}"
            )
        valid_resolutions = self.resolutions
        for resolution in self.attention_resolutions:
            if resolution not in valid_resolutions:
                raise ValueError(
                    f"attention_resolutions entries must be level resolutions {valid_resolutions}, got {resolution!r}"
                )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        for level, resolution in enumerate(valid_resolutions):
            channels = self.level_channels[level]
            attends = resolution in self.attention_resolutions or level == len(valid_resolutions) - 1
            if attends and channels % self.num_heads:
                raise ValueError(
                    f"num_heads must divide the channel count of every level with attention "
                    f"(level {level} has {channels} channels), got {self.num_heads}"
                )
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None, got {self.num_classes!r}")
        if not _is_int(self.frequency_size) or self.frequency_size < 2 or self.frequency_size % 2:
            raise ValueError(f"frequency_size must be a positive even integer, got {self.frequency_size!r}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The resolution of each level, e.g. (32, 16, 8) for the CIFAR-10 preset."""
        return tuple(self.input_size // 2**level for level in range(len(self.channel_multipliers)))

    @property
    def level_channels(self) -> tuple[int, ...]:
        """The channel count of each level, ``base_channels * multiplier``."""
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def embedding_size(self) -> int:
        """Width of the conditioning vector: 4x the base channels (DDPM++)."""
        return 4 * self.base_channels


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer for narrow models: at least 4 channels share each group.

    One channel per group would be instance norm, which subtracts each channel's mean and so would
    erase the per-channel conditioning bias of :class:`ResidualBlock` entirely.
    """
    groups = max(1, min(_MAX_GROUPS, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResidualBlock(nn.Module):
    """GN-SiLU-conv, plus the conditioning as a per-channel bias, GN-SiLU-dropout-conv, scaled skip.

    Optionally resamples by 2 (``resample="down"``: 2x2 average pooling; ``"up"``: nearest
    repetition) in both branches, before the first conv.

    Shapes: x (B, in_channels, H, W), c (B, embedding_size) -> (B, out_channels, H', W') with
    H' = H / 2, H, or 2H for down, none, up.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_size: int,
        dropout: float,
        resample: Literal["down", "up"] | None = None,
    ):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.resample = resample
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding_projection = nn.Linear(embedding_size, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 conv matches widths on the skip path; identity when they agree.
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _resample(self, x: Tensor, dx: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.resample == "down":
            return linear_map_with_tangent(x, dx, lambda a: F.avg_pool2d(a, 2))
        if self.resample == "up":
            return linear_map_with_tangent(x, dx, lambda a: F.interpolate(a, scale_factor=2.0, mode="nearest"))
        return x, dx

    def forward(self, x: Tensor, c: Tensor, dx: Tensor | None = None,
                dc: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x: (B, C_in, H, W), c: (B, E); dx (M, C_in, H, W), dc (M, E): the tangent of the leading
        rows, or None -> (B, C_out, H', W') and its tangent (M, C_out, H', W') or None."""
        norm1, norm2 = self.norm1, self.norm2
        h, dh = group_norm_with_tangent(x, dx, norm1.num_groups, norm1.weight, norm1.bias, norm1.eps)
        h, dh = silu_with_tangent(h, dh)  # (B, C_in, H, W)
        h, dh = conv2d_with_tangent(*self._resample(h, dh), self.conv1.weight, self.conv1.bias, padding=1)
        e, de = silu_with_tangent(c, dc)
        e, de = linear_with_tangent(e, de, self.embedding_projection.weight, self.embedding_projection.bias)
        h = h + e[:, :, None, None]  # (B, C_out, H', W'), a per-channel bias
        dh = None if dh is None else dh + de[:, :, None, None]
        h, dh = group_norm_with_tangent(h, dh, norm2.num_groups, norm2.weight, norm2.bias, norm2.eps)
        h, dh = silu_with_tangent(h, dh)
        h, dh = dropout_with_tangent(h, dh, self.dropout.p, self.training)
        h, dh = conv2d_with_tangent(h, dh, self.conv2.weight, self.conv2.bias, padding=1)  # (B, C_out, H', W')
        skip, dskip = self._resample(x, dx)
        if isinstance(self.skip, nn.Conv2d):
            skip, dskip = conv2d_with_tangent(skip, dskip, self.skip.weight, self.skip.bias)
        out = (skip + h) * _SKIP_SCALE
        return out, None if dx is None else (dskip + dh) * _SKIP_SCALE


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual with a 1/sqrt(2) scale.

    Uses :func:`meanflow.models.attention.attention`, which falls back to explicit softmax
    attention under forward-mode AD (the MeanFlow JVP). Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, dx: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x: (B, C, H, W), dx: (M, C, H, W) or None -> the output and its tangent (or None)."""
        channels, height, width = x.shape[1:]
        heads = self.num_heads

        def split(qkv: Tensor | None):  # (n, 3C, H, W) -> 3 x (n, heads, N, D)
            if qkv is None:
                return None, None, None
            qkv = qkv.reshape(qkv.shape[0], 3, heads, channels // heads, height * width)  # (n, 3, heads, D, N)
            return qkv.transpose(-2, -1).unbind(dim=1)

        def merge(h: Tensor | None) -> Tensor | None:  # (n, heads, N, D) -> (n, C, H, W)
            return None if h is None else h.transpose(-2, -1).reshape(h.shape[0], channels, height, width)

        norm = self.norm
        h, dh = group_norm_with_tangent(x, dx, norm.num_groups, norm.weight, norm.bias, norm.eps)
        qkv, dqkv = conv2d_with_tangent(h, dh, self.qkv.weight, self.qkv.bias)  # (B, 3C, H, W)
        (q, k, v), (dq, dk, dv) = split(qkv), split(dqkv)
        h, dh = attention_with_tangent(q, dq, k, dk, v, dv)  # (B, heads, N, D)
        h, dh = conv2d_with_tangent(merge(h), merge(dh), self.proj.weight, self.proj.bias)
        return (x + h) * _SKIP_SCALE, None if dx is None else (dx + dh) * _SKIP_SCALE


class UNetConditioning(nn.Module):
    """The conditioning vector: MLP([embed(t), embed(t - r)]) [+ embed(y)]. -> (B, embedding_size).

    The two time embeddings are concatenated, not summed (spec section 4, U-Net variant); the
    subtraction ``t - r`` happens here so a JVP in ``t`` sees it.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        width = config.embedding_size
        self.num_classes = config.num_classes
        self.t_embedder = ScalarEmbedder(config.base_channels, config.frequency_size)
        self.gap_embedder = ScalarEmbedder(config.base_channels, config.frequency_size)
        self.mlp = nn.Sequential(nn.Linear(2 * config.base_channels, width), nn.SiLU(), nn.Linear(width, width))
        self.label_embedder = LabelEmbedder(config.num_classes, width) if config.num_classes else None

    def forward(self, r: Tensor, t: Tensor, y: Tensor | None, dr: Tensor | None = None,
                dt: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """r, t: (B,); y: (B,) int64 in [0, num_classes] or None; dr, dt: (M,) the tangent of the
        leading rows' times, or None -> (B, embedding_size) and its tangent (M, embedding_size) or None.
        The label embedding is constant."""
        e_t, de_t = self.t_embedder.forward_with_tangent(t, dt)
        e_gap, de_gap = self.gap_embedder.forward_with_tangent(t - r, None if dt is None else dt - dr)
        times = torch.cat([e_t, e_gap], dim=-1)  # (B, 2 * base)
        dtimes = None if dt is None else torch.cat([de_t, de_gap], dim=-1)
        first, last = self.mlp[0], self.mlp[2]
        c, dc = linear_with_tangent(*silu_with_tangent(*linear_with_tangent(times, dtimes, first.weight, first.bias)),
                                    last.weight, last.bias)  # (B, width)
        if self.label_embedder is not None:
            if y is None:
                raise ValueError(
                    f"this model is class-conditional ({self.num_classes} classes): pass labels y, "
                    f"or the null class id {self.num_classes} for unconditional predictions"
                )
            if y.shape != t.shape:
                raise ValueError(f"y must have shape {tuple(t.shape)}, got {tuple(y.shape)}")
            c = c + self.label_embedder(y)  # (B, width)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=None) but labels y were given")
        return c, dc


class UNet(AverageVelocityNetwork):
    """DDPM++-style U-Net predicting the average velocity ``u(z_t, r, t)`` (Eq. 2).

    Call as ``model(z, r, t, conditions)`` with z (B, in_channels, input_size, input_size), r and t (B,)
    with ``r <= t``, conditions (B,) int64 labels (or a Conditions record) or None; returns (B, in_channels, input_size, input_size).
    See the module docstring for the architecture and :data:`UNET_PRESETS` for named configs.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        width = config.embedding_size
        channels = config.level_channels
        resolutions = config.resolutions
        attends = [resolution in config.attention_resolutions for resolution in resolutions]

        def block(c_in: int, c_out: int, resample: Literal["down", "up"] | None = None) -> ResidualBlock:
            return ResidualBlock(c_in, c_out, width, config.dropout, resample)

        self.conditioning = UNetConditioning(config)
        self.input_conv = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)

        # Encoder. Every module's output is kept for the decoder; skip_channels tracks their widths.
        self.encoder = nn.ModuleList()
        skip_channels = [channels[0]]
        current = channels[0]
        for level, level_channels in enumerate(channels):
            if level > 0:
                self.encoder.append(block(current, current, resample="down"))
                skip_channels.append(current)
            for _ in range(config.num_res_blocks):
                self.encoder.append(_Stage(block(current, level_channels), attends[level], level_channels, config))
                current = level_channels
                skip_channels.append(current)

        self.middle = nn.ModuleList(
            [block(current, current), AttentionBlock(current, config.num_heads), block(current, current)]
        )

        # Decoder: levels in reverse; each block consumes one encoder output, last in first out.
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(channels))):
            level_channels = channels[level]
            for index in range(config.num_res_blocks + 1):
                c_in = current + skip_channels.pop()
                # Attention once per decoder level, after its last block (see the module docstring).
                attend = attends[level] and index == config.num_res_blocks
                self.decoder.append(_Stage(block(c_in, level_channels), attend, level_channels, config))
                current = level_channels
            if level > 0:
                self.decoder.append(block(current, current, resample="up"))
        assert not skip_channels, "every encoder output must feed one decoder block"

        self.output_norm = _group_norm(current)
        self.output_conv = nn.Conv2d(current, config.in_channels, 3, padding=1)
        # Zero-initialised so a fresh model predicts u = 0 (see the module docstring).
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)

    checkpointable = True
    tangent_compiles = False  # inductor: convolutions over a symbolic batch fail their stride checks
    shard_safe_tangent = True  # the blocks take the tangent through their module calls (FSDP2)

    @property
    def explicit_tangent(self) -> bool:
        """True for this class: :meth:`forward_with_tangent` differentiates :meth:`forward`. False for
        a subclass that overrides ``forward``, which the objectives differentiate with torch.func.jvp."""
        return type(self).forward is UNet.forward

    def forward(self, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike = None,
                tangent: Tangent | None = None) -> Tensor | ModelOutput:
        """Average velocity. z: (B, C, H, W); r, t: (B,); conditions: labels (B,) or None -> (B, C, H, W).

        With ``tangent`` (dz, dr, dt) of the leading M rows: ``ModelOutput(u, du)``, du (M, C, H, W)
        computed in the same pass without gradient (:meth:`forward_with_tangent`).
        """
        y = self.read_labels(conditions)
        if tangent is None:
            return self.forward_with_tangent(z, r, t, y, None, None, None)[0]
        u, du = self.forward_with_tangent(z, r, t, y, tangent.dz, tangent.dr, tangent.dt)
        return ModelOutput(u=u, du=du)

    def forward_with_tangent(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None, dz: Tensor | None,
                             dr: Tensor | None, dt: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(u, du): u over the batch and its derivative along (dz, dr, dt) for the leading M rows.

        Every layer computes its ordinary output (recorded by autograd) and, from its intermediate
        values, the no-grad tangent of the first M rows (:mod:`meanflow.models.tangent`): with
        (v, 0, 1) it is d/dt u of Eq. 5 at the cost of a tangent. Dropout uses one mask for both.
        The blocks take the tangent through their module calls (FSDP2's hooks see it).

        Args:
            z: (B, C, H, W); dz: (M, C, H, W) or None. r, t: (B,); dr, dt: (M,) or None. y: (B,) or None.
        Returns:
            u: (B, C, H, W); du: (M, C, H, W) or None.
        """
        expected = (self.config.in_channels, self.config.input_size, self.config.input_size)
        if z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"z must have shape (B, {', '.join(map(str, expected))}), got {tuple(z.shape)}")
        for name, value in (("r", r), ("t", t)):
            if value.shape != (z.shape[0],):
                raise ValueError(f"{name} must have shape ({z.shape[0]},), got {tuple(value.shape)}")
        check_tangent_rows(z, dz, dr, dt)

        c, dc = self.conditioning(r, t, y, dr, dt)  # (B, 4 * base)
        h, dh = conv2d_with_tangent(z, dz, self.input_conv.weight, self.input_conv.bias, padding=1)  # (B, C0, H, W)
        skips = [(h, dh)]
        for module in self.encoder:
            h, dh = self.run_block(module, (h, c), (dh, dc))  # (B, C_level, H_level, W_level)
            skips.append((h, dh))
        for module in self.middle:
            if isinstance(module, AttentionBlock):
                h, dh = self.run_block(module, (h,), (dh,))
            else:
                h, dh = self.run_block(module, (h, c), (dh, dc))
        for module in self.decoder:
            if isinstance(module, _Stage):
                skip, dskip = skips.pop()
                h = torch.cat([h, skip], dim=1)  # (B, C + C_skip, H_level, W_level)
                dh = None if dh is None else torch.cat([dh, dskip], dim=1)
            h, dh = self.run_block(module, (h, c), (dh, dc))  # (B, C_level, H_level, W_level); up doubles H, W
        norm = self.output_norm
        h, dh = silu_with_tangent(*group_norm_with_tangent(h, dh, norm.num_groups, norm.weight, norm.bias, norm.eps))
        return conv2d_with_tangent(h, dh, self.output_conv.weight, self.output_conv.bias, padding=1)  # (B, C, H, W)


class _Stage(nn.Module):
    """A residual block, optionally followed by self-attention. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, block: ResidualBlock, attend: bool, channels: int, config: UNetConfig):
        super().__init__()
        self.block = block
        self.attention = AttentionBlock(channels, config.num_heads) if attend else None

    def forward(self, x: Tensor, c: Tensor, dx: Tensor | None = None,
                dc: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h, dh = self.block(x, c, dx, dc)
        return self.attention(h, dh) if self.attention is not None else (h, dh)


UNET_PRESETS: dict[str, UNetConfig] = {
    # Spec section 7: unconditional CIFAR-10 at 32x32, about 55.9M parameters, dropout 0.2.
    "unet-cifar10": UNetConfig(
        input_size=32,
        in_channels=3,
        base_channels=128,
        channel_multipliers=(2, 2, 2),
        num_res_blocks=4,
        attention_resolutions=(16,),
        dropout=0.2,
        num_heads=1,
        num_classes=None,
    ),
}


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """The named config of :data:`UNET_PRESETS`, with fields replaced by ``overrides``.

    Raises a ValueError naming the valid presets (or fields) when ``name`` (or a key) is unknown.
    """
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; valid names are {sorted(UNET_PRESETS)}")
    return UNetConfig.from_dict({**UNET_PRESETS[name].to_dict(), **overrides})
