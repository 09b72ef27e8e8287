"""The Improved MeanFlow transformer (imfDiT): in-context conditioning, a shared trunk, u and v heads.

Follows the official model of Lyy-iiis/imeanflow (``models/imfDiT.py``, JAX on ``main`` and
PyTorch on the ``torch`` branch; FAMILY.md F1). Unlike the DiT of :mod:`meanflow.models.dit`
there is no adaLN: every condition is embedded and added to a few learned tokens, and those
tokens are put in front of the patch tokens::

    [class x8 | omega x4 | t_min x2 | t_max x2 | time x4 | patches x N]

The time tokens embed only ``h = t - r`` (``t`` reaches the network through ``z_t``), the omega
tokens embed the guidance scale as ``1 - 1/omega``. Blocks are pre-norm with RMSNorm, attention
without biases, an RMSNorm on queries and keys per head followed by a 1-D rotary embedding over
the whole sequence (adjacent channel pairs rotated), a SwiGLU MLP of width ``int(8/3 H)``, and
residual branches scaled by per-channel vectors that start at zero. The first
``depth - aux_head_depth`` blocks are shared; then the sequence goes through two heads of
``aux_head_depth`` blocks each: ``u`` (average velocity) and ``v`` (the auxiliary instantaneous
velocity). The conditioning tokens are dropped before each head's final layer (RMSNorm, then a
zero-initialised linear), so a fresh model outputs exactly zero.

Parameter names are the official PyTorch state-dict keys without the ``net.`` prefix and the
``._flax_linear`` / ``._flax_embedding`` wrapper segments (docs/imf.md lists them), so the
official files load through a rename table.

The explicit tangent. iMF's target needs du/dt of the ``u`` head along (v_c, dr = 0, dt = 1)
(F-2; official ``imf.py`` lines 366-373: ``jax.jvp`` of ``u_fn(z_t, t, r)`` with tangents
``(v_c, 1, 0)``, where ``u_fn`` passes ``h = t - r``). ``model(z, r, t, conditions,
tangent=Tangent(dz, dr, dt))`` computes it by hand (:meth:`ImfDiT.forward_with_tangent`), primal
and tangent together from the pieces of :mod:`~meanflow.models.tangent`, one GEMM per linear
layer for both. What moves along the tangent, read off the official ``__call__``
(``models/imfDiT.py`` lines 325-343, "we don't explicitly condition on time t, only on h"):
``z`` (by ``dz``) and ``h = t - r`` (by ``dt - dr``), so the patch tokens and the time tokens
carry tangents; the class, omega and interval tokens are constants (zero tangent), as are the
RoPE angles. RoPE is linear in its input: the tangent gets the same rotation. The call runs the
trunk and the ``u`` head only and returns ``ModelOutput(u, du)`` with ``v = None``: the target
needs no ``v``, and its head would cost ``aux_head_depth`` more blocks. ``torch.func.jvp`` through
:meth:`ImfDiT.forward` still works (the attention switches to its math path under forward-mode
AD) and is what ``derivative='jvp'`` uses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditions import (
    GUIDANCE_INTERVAL,
    GUIDANCE_SCALE,
    LABELS,
    ConditionsLike,
    ModelOutput,
    Tangent,
    as_conditions,
    check_accepted,
    check_tangent_rows,
)
from ..validation import check_integer
from .attention import attention
from .base import AverageVelocityNetwork, ConfigRecord
from .dit import patchify
from .embeddings import ScalarEmbedder
from .tangent import (
    attention_with_tangent,
    gated_residual_with_tangent,
    linear_map_with_tangent,
    linear_with_tangent,
    rms_norm_with_tangent,
    swiglu_with_tangent,
)


@dataclass(frozen=True)
class ImfDiTConfig(ConfigRecord):
    """The architecture of an :class:`ImfDiT`; plain data, saved with checkpoints as JSON.

    Attributes:
        input_size: the spatial size H = W of the input.
        in_channels: the number of channels C of the input (and of each output).
        patch_size: the side of a square patch; ``input_size`` must be a multiple of it.
        hidden_size: the token width; a multiple of ``num_heads`` with an even head width (RoPE
            rotates channel pairs).
        depth: the number of transformer blocks on the ``u`` path: shared trunk plus ``u`` head.
        num_heads: the number of attention heads.
        num_classes: the number of classes (the null class id ``num_classes`` is added on top).
        aux_head_depth: the blocks of each head after the split (official: 8).
        mlp_ratio: the SwiGLU hidden width as a multiple of ``hidden_size`` (official: 8/3).
        num_class_tokens, num_cfg_tokens, num_interval_tokens, num_time_tokens: the conditioning
            tokens per condition (official: 8, 4, 2 each for t_min and t_max, 4).
        auxiliary_head: build the ``v`` head's blocks. False is the official ``eval_mode``: the
            ``v`` blocks are absent, the ``v`` final layer is kept (the released files hold it),
            and the output has ``v = None``.
        frequency_size: sinusoidal features per scalar embedding (even; official: 256).
        rope_theta: the base of the rotary frequencies (official: 10^4).
        token_init_constant, embedding_init_constant, weight_init_constant: the official
            initialisation scales (std = constant / sqrt(fan-in)): 1.0, 1.0, 0.32.
    """

    input_size: int
    in_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    num_classes: int
    aux_head_depth: int = 8
    mlp_ratio: float = 8 / 3
    num_class_tokens: int = 8
    num_cfg_tokens: int = 4
    num_interval_tokens: int = 2
    num_time_tokens: int = 4
    auxiliary_head: bool = True
    frequency_size: int = 256
    rope_theta: float = 10_000.0
    token_init_constant: float = 1.0
    embedding_init_constant: float = 1.0
    weight_init_constant: float = 0.32

    def __post_init__(self) -> None:
        for name in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                     "num_classes", "aux_head_depth", "num_class_tokens", "num_cfg_tokens",
                     "num_interval_tokens", "num_time_tokens", "frequency_size"):
            check_integer(name, getattr(self, name))
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"the head width hidden_size / num_heads must be even for RoPE, got "
                             f"{self.hidden_size // self.num_heads}")
        if self.aux_head_depth > self.depth:
            raise ValueError(f"aux_head_depth ({self.aux_head_depth}) must be at most depth ({self.depth})")
        if self.frequency_size % 2:
            raise ValueError(f"frequency_size must be even, got {self.frequency_size}")
        if not isinstance(self.auxiliary_head, bool):
            raise ValueError(f"auxiliary_head must be a bool, got {self.auxiliary_head!r}")
        for name in ("mlp_ratio", "rope_theta", "token_init_constant", "embedding_init_constant",
                     "weight_init_constant"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.mlp_hidden_size < 1:
            raise ValueError(
                f"mlp_ratio ({self.mlp_ratio}) times hidden_size ({self.hidden_size}) must be at least 1"
            )

    @property
    def grid_size(self) -> int:
        """The number of patches along each side: ``input_size // patch_size``."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """The number of patch tokens N: ``grid_size ** 2``."""
        return self.grid_size**2

    @property
    def prefix_tokens(self) -> int:
        """The number of conditioning tokens P in front of the patches."""
        return self.num_class_tokens + self.num_cfg_tokens + 2 * self.num_interval_tokens + self.num_time_tokens

    @property
    def mlp_hidden_size(self) -> int:
        """The SwiGLU hidden width, ``int(hidden_size * mlp_ratio)`` as the official code rounds it."""
        return int(self.hidden_size * self.mlp_ratio)


def _normal_fan_in(weight: Tensor, constant: float) -> None:
    """The official ``scaled_variance`` init: normal with std = constant / sqrt(fan-in)."""
    nn.init.normal_(weight, std=constant / math.sqrt(weight.shape[1]))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in plain ops (forward-mode AD safe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps) * self.weight

    def forward_with_tangent(self, x: Tensor, dx: Tensor | None) -> tuple:
        """x: (B, ..., D), dx: (M, ..., D) or None -> the output and its tangent (tangent module)."""
        return rms_norm_with_tangent(x, dx, self.weight, self.eps)


def rope_angles(head_dim: int, length: int, theta: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles ``position * theta^(-2i / head_dim)``, as the official
    ``precompute_rope_freqs`` (float32). Returns (L, head_dim / 2) twice."""
    frequencies = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), frequencies)  # (L, hd/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each adjacent channel pair ``(x[2i], x[2i+1])`` of position ``n`` by its angle.

    The official code views the pairs as complex numbers and multiplies by ``exp(i angle)``; this
    is the same rotation in real arithmetic (forward-mode AD has no trouble with it).
    x: (B, H, L, hd); cos, sin: (L, hd / 2) -> (B, H, L, hd), at least float32 precision.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(dtype).unflatten(-1, (-1, 2))  # (B, H, L, hd/2, 2)
    real, imag = pairs.unbind(-1)  # (B, H, L, hd/2) each
    cos, sin = cos.to(dtype), sin.to(dtype)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)  # (B, H, L, hd/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (B, H, L, hd)


class RoPEAttention(nn.Module):
    """Self-attention without biases, QK RMSNorm per head, then RoPE. (B, L, D) -> (B, L, D)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (B, L, D); cos, sin: (L, hd / 2) -> (B, L, D)."""
        batch, length, width = x.shape
        heads = self.num_heads

        def split(projection: nn.Linear) -> Tensor:
            return projection(x).view(batch, length, heads, width // heads).transpose(1, 2)  # (B, H, L, hd)

        q = apply_rope(self.q_norm(split(self.q_proj)), cos, sin)  # (B, H, L, hd)
        k = apply_rope(self.k_norm(split(self.k_proj)), cos, sin)  # (B, H, L, hd)
        out = attention(q, k, split(self.v_proj))  # (B, H, L, hd); fused unless under forward-mode AD
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))  # (B, L, D)

    def forward_with_tangent(self, x: Tensor, dx: Tensor | None, cos: Tensor, sin: Tensor) -> tuple:
        """x: (B, L, D), dx: (M, L, D) the tangent of the leading rows or None; cos, sin: (L, hd / 2)
        -> the output (B, L, D) and its tangent (M, L, D) or None (see :mod:`meanflow.models.tangent`).

        The tangent materialises the (L, L) scores of its M rows
        (:func:`~meanflow.models.tangent.attention_with_tangent`).
        """
        length, width = x.shape[1], x.shape[2]
        heads = self.num_heads

        def split(y: Tensor | None) -> Tensor | None:  # (n, L, D) -> (n, H, L, hd)
            return None if y is None else y.view(y.shape[0], length, heads, width // heads).transpose(1, 2)

        def project(projection: nn.Linear) -> tuple:
            y, dy = linear_with_tangent(x, dx, projection.weight)
            return split(y), split(dy)

        def rotate(both: Tensor) -> Tensor:
            return apply_rope(both, cos, sin)  # linear, so the tangent turns alike

        def merge(out: Tensor | None) -> Tensor | None:  # (n, H, L, hd) -> (n, L, D)
            return None if out is None else out.transpose(1, 2).reshape(out.shape[0], length, width)

        q, dq = linear_map_with_tangent(*self.q_norm.forward_with_tangent(*project(self.q_proj)), rotate)
        k, dk = linear_map_with_tangent(*self.k_norm.forward_with_tangent(*project(self.k_proj)), rotate)
        out, dout = attention_with_tangent(q, dq, k, dk, *project(self.v_proj))  # (B, H, L, hd)
        return linear_with_tangent(merge(out), merge(dout), self.out_proj.weight)  # (B, L, D)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases. (B, L, D) -> (B, L, D)."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, mlp_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, mlp_hidden_size, bias=False)
        self.w2 = nn.Linear(mlp_hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward_with_tangent(self, x: Tensor, dx: Tensor | None) -> tuple:
        """x: (B, L, D), dx: (M, L, D) or None -> the output and its tangent (tangent module)."""
        return swiglu_with_tangent(x, dx, self.w1.weight, self.w3.weight, self.w2.weight)


class TransformerBlock(nn.Module):
    """Pre-norm block whose two residual branches are scaled by per-channel vectors, zero at init."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_size: int):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = RoPEAttention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, mlp_hidden_size)
        self.attn_scale = nn.Parameter(torch.zeros(hidden_size))
        self.mlp_scale = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale  # (B, L, D)
        return x + self.mlp(self.norm2(x)) * self.mlp_scale  # (B, L, D)

    def forward_with_tangent(self, x: Tensor, dx: Tensor | None, cos: Tensor, sin: Tensor) -> tuple:
        """x: (B, L, D), dx: (M, L, D) or None -> the block's output and its tangent (tangent module).

        The residual scales are parameters, constant along the tangent: dy = dx + scale * dbranch.
        """
        h, dh = self.attn.forward_with_tangent(*self.norm1.forward_with_tangent(x, dx), cos, sin)
        x, dx = gated_residual_with_tangent(x, dx, h, dh, self.attn_scale)
        h, dh = self.mlp.forward_with_tangent(*self.norm2.forward_with_tangent(x, dx))
        return gated_residual_with_tangent(x, dx, h, dh, self.mlp_scale)


class FinalLayer(nn.Module):
    """RMSNorm, then a linear (zero at init) from each token to its patch. (B, N, D) -> (B, N, p * p * C)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))

    def forward_with_tangent(self, x: Tensor, dx: Tensor | None) -> tuple:
        """x: (B, N, D), dx: (M, N, D) or None -> (B, N, p * p * C) and (M, N, p * p * C) or None."""
        h, dh = self.norm.forward_with_tangent(x, dx)
        return linear_with_tangent(h, dh, self.linear.weight, self.linear.bias)


class PatchEmbedder(nn.Module):
    """(B, C, H, W) -> (B, N, D): a strided convolution, tokens in row-major order."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, z: Tensor) -> Tensor:
        return self.proj(z).flatten(2).transpose(1, 2)  # (B, D, G, G) -> (B, N, D)


class ClassEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null class. (B,) -> (B, D)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class ImfDiT(AverageVelocityNetwork):
    """The iMF transformer: ``model(z, r, t, conditions) -> ModelOutput(u, v)``.

    Takes (and requires) the conditions ``labels`` (B,), ``guidance_scale`` (B,) omega and
    ``guidance_interval`` (B, 2) ``[t_min, t_max]``. ``u`` is the average velocity over [r, t],
    ``v`` the auxiliary head's instantaneous velocity at t (None with ``auxiliary_head=False``).
    A fresh model outputs exactly zero (zero final linears and residual scales). It declares an
    explicit tangent: ``model(z, r, t, conditions, tangent=Tangent(dz, dr, dt))`` returns
    ``ModelOutput(u, du)`` (:meth:`forward_with_tangent`), through the module call that DDP /
    compile wrap.
    """

    checkpointable = True

    @property
    def explicit_tangent(self) -> bool:
        """True for this class; False for a subclass that overrides ``forward`` (its ``u`` may be
        another function), which the objectives then differentiate with ``torch.func.jvp``."""
        return type(self).forward is ImfDiT.forward

    def __init__(self, config: ImfDiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = PatchEmbedder(config.in_channels, hidden, config.patch_size)
        self.h_embedder = ScalarEmbedder(hidden, config.frequency_size)
        self.omega_embedder = ScalarEmbedder(hidden, config.frequency_size)
        self.cfg_t_start_embedder = ScalarEmbedder(hidden, config.frequency_size)
        self.cfg_t_end_embedder = ScalarEmbedder(hidden, config.frequency_size)
        self.y_embedder = ClassEmbedder(config.num_classes, hidden)
        self.time_tokens = nn.Parameter(torch.empty(config.num_time_tokens, hidden))
        self.class_tokens = nn.Parameter(torch.empty(config.num_class_tokens, hidden))
        self.omega_tokens = nn.Parameter(torch.empty(config.num_cfg_tokens, hidden))
        self.t_min_tokens = nn.Parameter(torch.empty(config.num_interval_tokens, hidden))
        self.t_max_tokens = nn.Parameter(torch.empty(config.num_interval_tokens, hidden))
        # Fixed, rebuilt from the config, so they stay out of state_dict (as in the official model).
        cos, sin = rope_angles(hidden // config.num_heads, config.prefix_tokens + config.num_patches,
                               config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)

        def blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(hidden, config.num_heads, config.mlp_hidden_size) for _ in range(count)
            )

        self.shared_blocks = blocks(config.depth - config.aux_head_depth)
        self.u_heads = blocks(config.aux_head_depth)
        self.v_heads = blocks(config.aux_head_depth if config.auxiliary_head else 0)
        self.u_final_layer = FinalLayer(hidden, config.patch_size, config.in_channels)
        self.v_final_layer = FinalLayer(hidden, config.patch_size, config.in_channels)
        self.reset_parameters()

    @property
    def accepted_conditions(self) -> frozenset[str]:
        return frozenset({LABELS, GUIDANCE_SCALE, GUIDANCE_INTERVAL})

    @property
    def auxiliary_velocity(self) -> bool:
        """True when the output carries the auxiliary head's velocity ``v``."""
        return self.config.auxiliary_head

    def reset_parameters(self) -> None:
        """The official initialisation (std = constant / sqrt(fan-in) unless said otherwise)."""
        config = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _normal_fan_in(module.weight, config.weight_init_constant)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, TransformerBlock):
                nn.init.zeros_(module.attn_scale)
                nn.init.zeros_(module.mlp_scale)
        for embedder in (self.h_embedder, self.omega_embedder, self.cfg_t_start_embedder,
                         self.cfg_t_end_embedder):
            _normal_fan_in(embedder.mlp[0].weight, config.embedding_init_constant)
            _normal_fan_in(embedder.mlp[2].weight, config.embedding_init_constant)
        table = self.y_embedder.embedding_table.weight
        nn.init.normal_(table, std=config.embedding_init_constant / math.sqrt(config.hidden_size))
        for tokens in (self.time_tokens, self.class_tokens, self.omega_tokens, self.t_min_tokens,
                       self.t_max_tokens):
            nn.init.normal_(tokens, std=config.token_init_constant / math.sqrt(config.hidden_size))
        # Xavier-uniform over the flattened patch (fan-in C * p * p), as a linear on patches.
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for final in (self.u_final_layer, self.v_final_layer):
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike = None,
                tangent: Tangent | None = None) -> ModelOutput:
        """The average velocity over [r, t] and the auxiliary velocity at t.

        Args:
            z: (B, C, H, W) the noisy state z_t.
            r, t: (B,) the times, ``r <= t``; only ``h = t - r`` is embedded.
            conditions: a Conditions record with ``labels`` (B,) int64 in ``[0, num_classes]``,
                ``guidance_scale`` (B,) omega > 0 and ``guidance_interval`` (B, 2) [t_min, t_max].
            tangent: a direction (dz, dr, dt) of the leading M <= B rows; when given, the call runs
                :meth:`forward_with_tangent` and returns ``ModelOutput(u, v, du)``.
        Returns:
            ModelOutput with ``u`` and ``v``, (B, C, H, W) each (``v`` None without the head), or
            with a tangent ``u`` and its derivative ``du`` along it.
        """
        if tangent is not None:
            return self.forward_with_tangent(z, r, t, conditions, tangent.dz, tangent.dr, tangent.dt)
        config = self.config
        y, omega, interval = self._read_conditions(conditions, z)
        prefix = config.prefix_tokens

        h = t - r  # (B,)
        seq = torch.cat([
            *self._condition_tokens(y, omega, interval, self.h_embedder(h)),  # (B, P, D) in all
            self.x_embedder(z),  # (B, N, D)
        ], dim=1)  # (B, P + N, D)
        cos, sin = self.rope_cos, self.rope_sin
        for block in self.shared_blocks:
            seq = self.run_block(partial(block, cos=cos, sin=sin), (seq,), ())  # (B, P + N, D)

        def head(blocks: nn.ModuleList, final: FinalLayer) -> Tensor:
            x = seq
            for block in blocks:
                x = self.run_block(partial(block, cos=cos, sin=sin), (x,), ())  # (B, P + N, D)
            return self._unpatchify(final(x[:, prefix:]))  # (B, C, H, W): the conditioning tokens dropped

        u = head(self.u_heads, self.u_final_layer)
        v = head(self.v_heads, self.v_final_layer) if config.auxiliary_head else None
        return ModelOutput(u=u, v=v)

    def forward_with_tangent(self, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike, dz: Tensor,
                             dr: Tensor, dt: Tensor) -> ModelOutput:
        """(u, v, du): :meth:`forward`'s outputs over the batch and the derivative of u's leading M
        rows along (dz, dr, dt), by hand, in one pass (see :mod:`meanflow.models.tangent`).

        With the tangent (v_c, 0, 1) it is du/dt of F-2, what ``torch.func.jvp`` of the ``u`` head
        gives. Only ``z`` and ``h = t - r`` move (module docstring): the patch tokens by the patch
        embedding of ``dz``, the time tokens by the tangent of the ``h`` embedding along
        ``dt - dr``; the class, omega and interval tokens are constant. ``u`` and ``v`` (the
        auxiliary head, which needs no tangent: iMF differentiates u alone) are recorded by autograd
        like :meth:`forward`'s; ``du`` has no gradient.
        It reads the blocks' weights directly, so an FSDP2-sharded model differentiates through
        ``torch.func.jvp`` instead (:func:`meanflow.jvp.one_pass_tangent`).

        Args:
            z: (B, C, H, W) the state z_t; dz: (M, C, H, W) the tangent of its first M rows.
            r, t: (B,) the times; dr, dt: (M,) their tangents.
            conditions: as in :meth:`forward` (constant along the tangent).
        Returns:
            ModelOutput: u, v (B, C, H, W) each (v None without the head); du (M, C, H, W).
        """
        config = self.config
        y, omega, interval = self._read_conditions(conditions, z)
        check_tangent_rows(z, dz, dr, dt)
        prefix, constant = config.prefix_tokens, config.prefix_tokens - config.num_time_tokens
        e_h, de_h = self.h_embedder.forward_with_tangent(t - r, dt - dr)  # (B, D), (M, D)
        x = self.x_embedder(z)  # (B, N, D)
        seq = torch.cat([*self._condition_tokens(y, omega, interval, e_h), x], dim=1)  # (B, P + N, D)
        with torch.no_grad(), torch.autocast(device_type=dz.device.type, enabled=False):
            # The patch embedding is linear: its tangent is the same map of dz without the bias (a
            # GEMM over the flattened patches, which compiles for a symbolic number of rows).
            weight = self.x_embedder.proj.weight.to(dz.dtype).flatten(1)  # (D, C * p * p)
            dx = F.linear(patchify(dz, config.patch_size), weight)  # (M, N, D)
            dseq = dz.new_zeros((dz.shape[0], seq.shape[1], seq.shape[2]))  # class, omega, interval: constants
            dseq[:, constant:prefix] = de_h[:, None, :]  # the time tokens move with h
            dseq[:, prefix:] = dx
        cos, sin = self.rope_cos, self.rope_sin
        for block in self.shared_blocks:
            seq, dseq = self.run_block(partial(block.forward_with_tangent, cos=cos, sin=sin), (seq,), (dseq,))
        v = None
        if config.auxiliary_head:
            trunk = seq
            for block in self.v_heads:
                trunk = self.run_block(partial(block, cos=cos, sin=sin), (trunk,), ())
            v = self._unpatchify(self.v_final_layer(trunk[:, prefix:]))  # (B, C, H, W)
        for block in self.u_heads:
            seq, dseq = self.run_block(partial(block.forward_with_tangent, cos=cos, sin=sin), (seq,), (dseq,))
        x, dx = self.u_final_layer.forward_with_tangent(seq[:, prefix:], dseq[:, prefix:])  # (n, N, p * p * C)
        return ModelOutput(u=self._unpatchify(x), v=v, du=self._unpatchify(dx))

    def _condition_tokens(self, y: Tensor, omega: Tensor, interval: Tensor, h_embedding: Tensor) -> list[Tensor]:
        """The conditioning tokens, each learned base plus its condition's embedding, in the official
        order [class | omega | t_min | t_max | time]: (B, K, D) each, P tokens in all."""
        def tokens(base: Tensor, embedding: Tensor) -> Tensor:
            return base[None] + embedding[:, None, :]  # (B, K, D)

        return [
            tokens(self.class_tokens, self.y_embedder(y)),
            tokens(self.omega_tokens, self.omega_embedder(1 - 1 / omega)),
            tokens(self.t_min_tokens, self.cfg_t_start_embedder(interval[:, 0])),
            tokens(self.t_max_tokens, self.cfg_t_end_embedder(interval[:, 1])),
            tokens(self.time_tokens, h_embedding),
        ]

    def _unpatchify(self, x: Tensor) -> Tensor:
        """(..., N, p * p * C) patch values -> (..., C, H, W) images, N = G * G in row-major order."""
        config = self.config
        p, g, channels = config.patch_size, config.grid_size, config.in_channels
        lead = x.shape[:-2]
        n = len(lead)
        x = x.reshape(*lead, g, g, p, p, channels)  # (..., G, G, p, p, C)
        x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)  # (..., C, G, p, G, p)
        return x.reshape(*lead, channels, g * p, g * p)  # (..., C, H, W)

    def _read_conditions(self, conditions: ConditionsLike, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        config = self.config
        expected = (config.in_channels, config.input_size, config.input_size)
        if z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"z must have shape (B, {', '.join(map(str, expected))}), got {tuple(z.shape)}")
        conditions = as_conditions(conditions)
        check_accepted(conditions, self.accepted_conditions, type(self).__name__)
        missing = self.accepted_conditions - conditions.present()
        if missing:
            raise ValueError(f"ImfDiT requires the conditions {sorted(self.accepted_conditions)}; "
                             f"missing {sorted(missing)}")
        batch = z.shape[0]
        y, omega, interval = conditions.labels, conditions.guidance_scale, conditions.guidance_interval
        if y.shape != (batch,) or omega.shape != (batch,) or interval.shape != (batch, 2):
            raise ValueError(f"labels and guidance_scale must be ({batch},) and guidance_interval "
                             f"({batch}, 2); got {tuple(y.shape)}, {tuple(omega.shape)}, "
                             f"{tuple(interval.shape)}")
        return y, omega, interval


def _imagenet_latent_preset(depth: int, hidden_size: int, num_heads: int) -> ImfDiTConfig:
    # SD-VAE latents of ImageNet 256 images: 32x32x4, 1000 classes, patch 2 (official configs).
    return ImfDiTConfig(input_size=32, in_channels=4, patch_size=2, hidden_size=hidden_size,
                        depth=depth, num_heads=num_heads, num_classes=1000, aux_head_depth=8)


IMF_DIT_PRESETS: dict[str, ImfDiTConfig] = {
    "iMF-B/2": _imagenet_latent_preset(depth=12, hidden_size=768, num_heads=12),
    "iMF-M/2": _imagenet_latent_preset(depth=24, hidden_size=768, num_heads=12),
    "iMF-L/2": _imagenet_latent_preset(depth=32, hidden_size=1024, num_heads=16),
    "iMF-XL/2": _imagenet_latent_preset(depth=48, hidden_size=1024, num_heads=16),
}
"""The official imfDiT_{B,M,L,XL}_2 configurations (models/imfDiT.py, end of file), by name."""


def imf_dit_preset(name: str, **overrides: Any) -> ImfDiTConfig:
    """The preset ``name`` from :data:`IMF_DIT_PRESETS`, with fields replaced by ``overrides``
    (e.g. ``auxiliary_head=False`` for the released inference files)."""
    if name not in IMF_DIT_PRESETS:
        raise ValueError(f"unknown iMF DiT preset {name!r}; valid names are {sorted(IMF_DIT_PRESETS)}")
    valid = [field.name for field in dataclasses.fields(ImfDiTConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown ImfDiTConfig field(s) {unknown}; valid fields are {valid}")
    return dataclasses.replace(IMF_DIT_PRESETS[name], **overrides)
