"""A diffusion transformer (DiT) that predicts the average velocity u(z_t, r, t, conditions).

The network cuts the latent into patches, runs a stack of transformer blocks whose LayerNorms are
modulated by the conditioning vector (adaLN-Zero), and reassembles the patches. The conditioning
vector embeds ``(t, t - r)`` and the class label (spec section 4) through
:class:`~meanflow.models.embeddings.TimeConditioning`; self-attention goes through
:func:`~meanflow.models.attention.attention`, so the same model runs on the fused kernel in an
ordinary forward and under ``torch.func.jvp`` for the MeanFlow target (Eq. 5).
:meth:`DiT.forward_with_tangent` computes that JVP explicitly, primal and tangent together, from
the pieces of :mod:`~meanflow.models.tangent`: about half the cost of ``torch.func.jvp`` (see
``benchmarks/jvp_speed.py``).

adaLN-Zero: every modulation linear and the output linear start at zero, so each residual branch
is gated shut and a fresh model outputs exactly zero; training opens the gates gradually.

Presets for the paper's ImageNet 256 models (32x32x4 SD-VAE latents, spec section 7) are in
:data:`DIT_PRESETS`; :func:`dit_preset` returns one with optional field overrides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..conditions import ConditionsLike, ModelOutput, Tangent
from .attention import attention
from .base import AverageVelocityNetwork, ConfigRecord
from .embeddings import TimeConditioning
from .tangent import (
    attention_with_tangent,
    gated_residual_with_tangent,
    gelu_tanh_with_tangent,
    layer_norm_with_tangent,
    linear_with_tangent,
    modulate_with_tangent,
    pair,
    silu_with_tangent,
)


@dataclass(frozen=True)
class DiTConfig(ConfigRecord):
    """The architecture of a :class:`DiT`; plain data, saved with checkpoints as JSON.

    Attributes:
        input_size: the spatial size H = W of the input.
        in_channels: the number of channels C of the input (and of the output).
        patch_size: the side of a square patch; ``input_size`` must be a multiple of it.
        hidden_size: the token width; a multiple of ``num_heads`` and of 4 (the 2-D sin-cos
            positional embedding splits it into four equal parts).
        depth: the number of transformer blocks.
        num_heads: the number of attention heads.
        mlp_ratio: the MLP's hidden width as a multiple of ``hidden_size``.
        num_classes: the number of classes of a class-conditional model (the null class id
            ``num_classes`` is added on top), or None for an unconditional model.
        frequency_size: the number of sinusoidal features per time embedding (even).
    """

    input_size: int
    in_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    frequency_size: int = 256

    def __post_init__(self) -> None:
        for name in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                     "frequency_size"):
            _require_positive_int(name, getattr(self, name))
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size must be a multiple of 4 for the 2-D sin-cos positional embedding, "
                f"got {self.hidden_size}"
            )
        if self.frequency_size % 2:
            raise ValueError(f"frequency_size must be even, got {self.frequency_size}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) \
                or not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive finite number, got {self.mlp_ratio!r}")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio ({self.mlp_ratio}) times hidden_size ({self.hidden_size}) must be at least 1"
            )
        if self.num_classes is not None:
            _require_positive_int("num_classes", self.num_classes, extra=" or None for an unconditional model")

    @property
    def grid_size(self) -> int:
        """The number of patches along each side: ``input_size // patch_size``."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """The number of tokens N: ``grid_size ** 2``."""
        return self.grid_size**2


def _require_positive_int(name: str, value: Any, extra: str = "") -> None:
    # bool is an int subclass; True as a depth is a typo, not a choice.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")


def sincos_position_embedding_2d(hidden_size: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos embedding of a square grid of patch positions.

    Half of the channels encode the row index and half the column index, each as
    ``[sin(pos * f_k), cos(pos * f_k)]`` with ``f_k = 10000^(-k / (hidden_size / 4))``.

    Args:
        hidden_size: the token width, a multiple of 4.
        grid_size: the number of patches along each side.
    Returns:
        (grid_size ** 2, hidden_size), tokens in row-major order (the order of ``flatten(2)``).
    """
    quarter = hidden_size // 4
    frequencies = 1.0 / 10_000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    positions = torch.arange(grid_size, dtype=torch.float64)  # (G,)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")  # (G, G) each

    def encode(coordinate: Tensor) -> Tensor:
        angles = coordinate.reshape(-1, 1) * frequencies[None, :]  # (G*G, D/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (G*G, D/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).to(torch.float32)  # (G*G, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive LayerNorm modulation ``x * (1 + scale) + shift``. x: (B, N, D); shift, scale: (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens. (B, N, D) -> (B, N, D)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)  # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D/H)
        out = attention(q, k, v)  # (B, H, N, D/H); fused kernel unless under forward-mode AD
        out = out.transpose(1, 2).reshape(batch, tokens, width)  # (B, N, D)
        return self.proj(out)  # (B, N, D)

    def forward_with_tangent(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """x, dx: (B, N, D) -> the output and its tangent, (B, N, D) each. No gradient recording."""
        batch, tokens, width = x.shape
        heads = self.num_heads
        qkv, dqkv = linear_with_tangent(x, dx, self.qkv.weight, self.qkv.bias)  # (B, N, 3D) each
        q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D/H)
        dq, dk, dv = dqkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        out, dout = attention_with_tangent(q, dq, k, dk, v, dv)  # (B, H, N, D/H) each
        both = pair(out, dout).transpose(2, 3).reshape(2, batch, tokens, width)  # (2, B, N, D), one copy
        return linear_with_tangent(both[0], both[1], self.proj.weight, self.proj.bias)  # (B, N, D) each


class DiTBlock(nn.Module):
    """A transformer block whose two LayerNorms are modulated and whose branches are gated by c.

    ``c`` (B, D) is mapped to six vectors: shift, scale and gate for the attention branch and for
    the MLP branch. With the modulation linear at zero the gates are zero and the block is the
    identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, N, D) tokens, c: (B, D) conditioning -> (B, N, D)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate_a[:, None, :] * self.attn(modulate(self.norm1(x), shift_a, scale_a))  # (B, N, D)
        x = x + gate_m[:, None, :] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)
        return x

    def forward_with_tangent(
        self, x: Tensor, dx: Tensor, silu_c: Tensor, dsilu_c: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The block and its derivative; call without gradient recording.

        Args:
            x, dx: (B, N, D) tokens and their tangent.
            silu_c, dsilu_c: (B, D) SiLU(c), the input of the modulation linear, and its tangent:
                the same for every block, so the caller computes it once.
        Returns:
            (B, N, D) the block's output and its tangent.
        """
        linear = self.modulation[1]
        modulation, dmodulation = linear_with_tangent(silu_c, dsilu_c, linear.weight, linear.bias)  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, dim=1)  # 6 x (B, D)
        dshift_a, dscale_a, dgate_a, dshift_m, dscale_m, dgate_m = dmodulation.chunk(6, dim=1)

        h, dh = layer_norm_with_tangent(x, dx, self.norm1.eps)  # (B, N, D)
        h, dh = modulate_with_tangent(h, dh, shift_a, dshift_a, scale_a, dscale_a)
        h, dh = self.attn.forward_with_tangent(h, dh)
        x, dx = gated_residual_with_tangent(x, dx, h, dh, gate_a, dgate_a)

        fc1, fc2 = self.mlp[0], self.mlp[2]
        h, dh = layer_norm_with_tangent(x, dx, self.norm2.eps)
        h, dh = modulate_with_tangent(h, dh, shift_m, dshift_m, scale_m, dscale_m)
        h, dh = linear_with_tangent(h, dh, fc1.weight, fc1.bias)  # (B, N, mlp_hidden)
        h, dh = gelu_tanh_with_tangent(h, dh)
        h, dh = linear_with_tangent(h, dh, fc2.weight, fc2.bias)  # (B, N, D)
        return gated_residual_with_tangent(x, dx, h, dh, gate_m, dgate_m)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its patch's values.

    (B, N, D), (B, D) -> (B, N, patch_size * patch_size * C).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, N, D), c: (B, D) -> (B, N, p * p * C)."""
        shift, scale = self.modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p * p * C)

    def forward_with_tangent(
        self, x: Tensor, dx: Tensor, silu_c: Tensor, dsilu_c: Tensor
    ) -> tuple[Tensor, Tensor]:
        """x, dx: (B, N, D); SiLU(c) and its tangent: (B, D) -> (B, N, p * p * C) twice. No gradient recording."""
        linear = self.modulation[1]
        modulation, dmodulation = linear_with_tangent(silu_c, dsilu_c, linear.weight, linear.bias)  # (B, 2D)
        shift, scale = modulation.chunk(2, dim=1)  # 2 x (B, D)
        dshift, dscale = dmodulation.chunk(2, dim=1)
        h, dh = layer_norm_with_tangent(x, dx, self.norm.eps)
        h, dh = modulate_with_tangent(h, dh, shift, dshift, scale, dscale)
        return linear_with_tangent(h, dh, self.linear.weight, self.linear.bias)  # (B, N, p * p * C)


class DiT(AverageVelocityNetwork):
    """A diffusion transformer predicting the average velocity ``u(z, r, t, conditions)`` (Eq. 2).

    Called as ``model(z, r, t, conditions)`` like every model of the project (see
    :mod:`meanflow.conventions`). A fresh model outputs exactly zero (adaLN-Zero). It declares an
    explicit tangent: ``model(z, r, t, conditions, tangent=Tangent(dz, dr, dt))`` returns a
    :class:`~meanflow.conditions.ModelOutput` with ``u`` and its exact derivative ``du``
    (:meth:`forward_with_tangent`), through the module call that DDP / FSDP2 / compile wrap.
    """

    explicit_tangent = True

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.patch_embed = nn.Conv2d(
            config.in_channels, hidden, kernel_size=config.patch_size, stride=config.patch_size
        )
        # Fixed, not trained, and rebuilt from the config on load, so it stays out of state_dict.
        self.register_buffer(
            "position_embedding",
            sincos_position_embedding_2d(hidden, config.grid_size)[None],  # (1, N, D)
            persistent=False,
        )
        self.conditioning = TimeConditioning(hidden, config.num_classes, config.frequency_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(hidden, config.patch_size, config.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The adaLN-Zero initialisation: modulation and output linears zero, so the output is 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch embedding is a linear map on flattened patches; initialise it as one.
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Small normal weights for the conditioning embeddings (biases stay zero).
        for embedder in (self.conditioning.t_embedder, self.conditioning.gap_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.conditioning.label_embedder is not None:
            nn.init.normal_(self.conditioning.label_embedder.table.weight, std=0.02)
        # Zero: every gate closed, final modulation neutral, output linear silent.
        zero_linears = [block.modulation[-1] for block in self.blocks]
        zero_linears += [self.final_layer.modulation[-1], self.final_layer.linear]
        for linear in zero_linears:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, z: Tensor, r: Tensor, t: Tensor, conditions: ConditionsLike = None, tangent: Tangent | None = None
    ) -> Tensor | ModelOutput:
        """The average velocity over [r, t].

        Args:
            z: (B, C, H, W) the noisy state z_t, with C = in_channels and H = W = input_size.
            r: (B,) the earlier time, ``r <= t``.
            t: (B,) the current time.
            conditions: (B,) int64 labels in ``[0, num_classes]`` (``num_classes`` is the null
                class), or a Conditions record with them, for a class-conditional model; None
                for an unconditional one.
            tangent: a direction (dz, dr, dt); when given, the output is a ModelOutput whose
                ``du`` is the derivative of ``u`` along it (no gradient recorded).
        Returns:
            (B, C, H, W) the predicted average velocity u(z, r, t, y), or, with a tangent, the
            ModelOutput (u, du).
        """
        y = self.read_labels(conditions)
        if tangent is not None:
            u, du = self.forward_with_tangent(z, r, t, y, tangent.dz, tangent.dr, tangent.dt)
            return ModelOutput(u=u, du=du)
        config = self.config
        self._check_input(z)
        batch, p, g = z.shape[0], config.patch_size, config.grid_size

        x = self.patch_embed(z)  # (B, D, G, G), G = H / p
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), N = G * G, row-major
        x = x + self.position_embedding  # (B, N, D)
        c = self.conditioning(r, t, y)  # (B, D) from t, t - r and the label
        for block in self.blocks:
            x = block(x, c)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p * p * C)
        x = x.reshape(batch, g, g, p, p, config.in_channels)  # (B, G, G, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, G, p, G, p)
        return x.reshape(batch, config.in_channels, g * p, g * p)  # (B, C, H, W)

    def forward_with_tangent(
        self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None, dz: Tensor, dr: Tensor, dt: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(u, du): u = self(z, r, t, y) and du = the directional derivative along (dz, dr, dt).

        The forward-mode derivative written out by hand: primal and tangent travel together, each
        linear layer multiplies both in one GEMM (see :mod:`meanflow.models.tangent`). With the
        tangent (v, 0, 1) it is d/dt u of Eq. 5, what ``torch.func.jvp`` of :meth:`forward` gives,
        at about half its cost. The labels and the positional embedding are constant.

        Runs without gradient: it is meant for the stop-gradient MeanFlow target (Eq. 6), and its
        outputs never carry a gradient.

        Args:
            z, dz: (B, C, H, W) the state z_t and its tangent (v for Eq. 5).
            r, t, dr, dt: (B,) the times and their tangents (0 and 1 for Eq. 5).
            y: (B,) int64 labels or None, as in :meth:`forward`.
        Returns:
            u, du: (B, C, H, W) each.
        """
        config = self.config
        self._check_input(z)
        if dz.shape != z.shape:
            raise ValueError(f"dz must have z's shape {tuple(z.shape)}, got {tuple(dz.shape)}")
        batch, p, g = z.shape[0], config.patch_size, config.grid_size
        with torch.no_grad():
            # The patch embedding is linear: a linear map of each flattened patch, so one GEMM.
            weight = self.patch_embed.weight.flatten(1)  # (D, C * p * p)
            x, dx = linear_with_tangent(_patchify(z, p), _patchify(dz, p), weight)  # (B, N, D) each
            x.add_(self.patch_embed.bias + self.position_embedding[0])  # constants: primal only
            c, dc = self.conditioning.forward_with_tangent(r, t, y, dr, dt)  # (B, D) each
            silu_c, dsilu_c = silu_with_tangent(c, dc)  # every modulation's input: computed once
            for block in self.blocks:
                x, dx = block.forward_with_tangent(x, dx, silu_c, dsilu_c)  # (B, N, D) each
            x, dx = self.final_layer.forward_with_tangent(x, dx, silu_c, dsilu_c)  # (B, N, p * p * C)
            both = pair(x, dx).view(2, batch, g, g, p, p, config.in_channels)  # (2, B, G, G, p, p, C)
            both = both.permute(0, 1, 6, 2, 4, 3, 5)  # (2, B, C, G, p, G, p)
            both = both.reshape(2, batch, config.in_channels, g * p, g * p)  # (2, B, C, H, W), one copy
            return both[0], both[1]

    def _check_input(self, z: Tensor) -> None:
        config = self.config
        expected = (config.in_channels, config.input_size, config.input_size)
        if z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"z must have shape (B, {', '.join(map(str, expected))}), got {tuple(z.shape)}")


def _patchify(z: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C * p * p): row-major patches, each flattened like a conv kernel (C, p, p)."""
    batch, channels, height, width = z.shape
    p = patch_size
    patches = z.reshape(batch, channels, height // p, p, width // p, p)  # (B, C, G, p, G, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, G, G, C, p, p)
    return patches.reshape(batch, (height // p) * (width // p), channels * p * p)  # (B, N, C * p * p)


def _imagenet_latent_preset(patch_size: int, depth: int, hidden_size: int, num_heads: int) -> DiTConfig:
    # SD-VAE latents of ImageNet 256 images: 32x32x4, 1000 classes (spec section 7).
    return DiTConfig(
        input_size=32, in_channels=4, patch_size=patch_size, hidden_size=hidden_size,
        depth=depth, num_heads=num_heads, num_classes=1000,
    )


DIT_PRESETS: dict[str, DiTConfig] = {
    "DiT-B/4": _imagenet_latent_preset(patch_size=4, depth=12, hidden_size=768, num_heads=12),
    "DiT-B/2": _imagenet_latent_preset(patch_size=2, depth=12, hidden_size=768, num_heads=12),
    "DiT-M/2": _imagenet_latent_preset(patch_size=2, depth=16, hidden_size=1024, num_heads=16),
    "DiT-L/2": _imagenet_latent_preset(patch_size=2, depth=24, hidden_size=1024, num_heads=16),
    "DiT-XL/2": _imagenet_latent_preset(patch_size=2, depth=28, hidden_size=1152, num_heads=16),
}
"""The paper's ImageNet 256 backbones on 32x32x4 latents (spec section 7), by name."""


def dit_preset(name: str, **overrides: Any) -> DiTConfig:
    """The preset ``name`` from :data:`DIT_PRESETS`, with fields replaced by ``overrides``.

    Example: ``dit_preset("DiT-B/4", num_classes=None)`` for an unconditional B/4. Unknown names
    and unknown fields raise a ValueError listing the valid ones.
    """
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; valid names are {sorted(DIT_PRESETS)}")
    valid = [field.name for field in dataclasses.fields(DiTConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; valid fields are {valid}")
    return dataclasses.replace(DIT_PRESETS[name], **overrides)
