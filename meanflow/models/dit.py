"""A diffusion transformer (DiT) that predicts the average velocity u(z_t, r, t, conditions).

The network cuts the latent into patches, runs a stack of transformer blocks whose LayerNorms are
modulated by the conditioning vector (adaLN-Zero), and reassembles the patches. The conditioning
vector embeds ``(t, t - r)`` and the class label (spec section 4) through
:class:`~meanflow.models.embeddings.TimeConditioning`; self-attention goes through
:func:`~meanflow.models.attention.attention`, so the same model runs on the fused kernel in an
ordinary forward and under ``torch.func.jvp`` for the MeanFlow target (Eq. 5).
Every forward goes through :meth:`DiT.forward_with_tangent`, built from the pieces of
:mod:`~meanflow.models.tangent`: without a tangent it is the plain forward; with the tangent of the
leading rows it also returns that JVP, computed from the primal's own intermediate values, so
the MeanFlow gradient forward carries the target's derivative at the cost of the tangent alone
(one pass; see ``benchmarks/train_step.py`` and ``benchmarks/jvp_speed.py``).

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
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditions import ConditionsLike, ModelOutput, Tangent, check_tangent_rows
from .base import AverageVelocityNetwork, ConfigRecord
from .embeddings import TimeConditioning
from .tangent import (
    attention_with_tangent,
    gated_residual_with_tangent,
    gelu_tanh_with_tangent,
    layer_norm_with_tangent,
    linear_with_tangent,
    modulate_with_tangent,
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


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens. (B, N, D) -> (B, N, D)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return self.forward_with_tangent(x, None)[0]

    def forward_with_tangent(self, x: Tensor, dx: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D); dx: (M, N, D), the tangent of the leading rows, or None -> the output
        (B, N, D) and its tangent (M, N, D) or None (see :mod:`meanflow.models.tangent`)."""
        heads = self.num_heads

        tokens, width = x.shape[1], x.shape[2]

        def split(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # (n, N, 3D) -> 3 x (n, H, N, D/H)
            return qkv.reshape(qkv.shape[0], tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)

        def merge(out: Tensor) -> Tensor:  # (n, H, N, D/H) -> (n, N, D)
            return out.transpose(1, 2).reshape(out.shape[0], tokens, width)

        qkv, dqkv = linear_with_tangent(x, dx, self.qkv.weight, self.qkv.bias)  # (B, N, 3D)
        q, k, v = split(qkv)  # 3 x (B, H, N, D/H)
        dq, dk, dv = (None, None, None) if dqkv is None else split(dqkv)
        out, dout = attention_with_tangent(q, dq, k, dk, v, dv)  # (B, H, N, D/H); fused primal
        return linear_with_tangent(merge(out), None if dout is None else merge(dout), self.proj.weight,
                                   self.proj.bias)  # (B, N, D)


class DiTBlock(nn.Module):
    """A transformer block whose two LayerNorms are modulated and whose branches are gated by c.

    ``c`` (B, D) is mapped to six vectors: shift, scale and gate for the attention branch and for
    the MLP branch; the block takes SiLU(c), which the DiT computes once for all blocks. With the
    modulation linear at zero the gates are zero and the block is the identity.
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

    def forward(
        self, x: Tensor, silu_c: Tensor, dx: Tensor | None = None, dsilu_c: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The block and the tangent of its leading rows (see :mod:`meanflow.models.tangent`).

        The tangent goes through the module call, so FSDP2's per-block hooks gather the
        parameters for it as for the primal.

        Args:
            x: (B, N, D) tokens; dx: (M, N, D) their tangent, or None.
            silu_c: (B, D) SiLU(c), the input of the modulation linear; dsilu_c: (M, D) its tangent
                or None. The same for every block, so the caller computes it once.
        Returns:
            (B, N, D) the block's output and (M, N, D) its tangent, or None.
        """
        linear = self.modulation[1]
        modulation, dmodulation = linear_with_tangent(silu_c, dsilu_c, linear.weight, linear.bias)  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, dim=1)  # 6 x (B, D)
        dshift_a, dscale_a, dgate_a, dshift_m, dscale_m, dgate_m = (
            (None,) * 6 if dmodulation is None else dmodulation.chunk(6, dim=1))

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
        return self.forward_with_tangent(x, None, F.silu(c), None)[0]

    def forward_with_tangent(
        self, x: Tensor, dx: Tensor | None, silu_c: Tensor, dsilu_c: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D), dx: (M, N, D) or None; SiLU(c) (B, D) and its tangent (M, D) or None ->
        (B, N, p * p * C) and (M, N, p * p * C) or None."""
        linear = self.modulation[1]
        modulation, dmodulation = linear_with_tangent(silu_c, dsilu_c, linear.weight, linear.bias)  # (B, 2D)
        shift, scale = modulation.chunk(2, dim=1)  # 2 x (B, D)
        dshift, dscale = (None, None) if dmodulation is None else dmodulation.chunk(2, dim=1)
        h, dh = layer_norm_with_tangent(x, dx, self.norm.eps)
        h, dh = modulate_with_tangent(h, dh, shift, dshift, scale, dscale)
        return linear_with_tangent(h, dh, self.linear.weight, self.linear.bias)  # (B, N, p * p * C)


class DiT(AverageVelocityNetwork):
    """A diffusion transformer predicting the average velocity ``u(z, r, t, conditions)`` (Eq. 2).

    Called as ``model(z, r, t, conditions)`` like every model of the project (see
    :mod:`meanflow.conventions`). A fresh model outputs exactly zero (adaLN-Zero). It declares an
    explicit tangent: ``model(z, r, t, conditions, tangent=Tangent(dz, dr, dt))`` with a tangent
    of the leading M rows returns a :class:`~meanflow.conditions.ModelOutput` with ``u`` (B rows,
    recorded by autograd) and the exact derivative ``du`` of its first M rows (no gradient), in one
    pass (:meth:`forward_with_tangent`), through the module call that DDP / FSDP2 / compile wrap;
    the blocks take the tangent through their own module calls, so FSDP2's hooks see it.
    """

    explicit_tangent = True
    checkpointable = True
    shard_safe_tangent = True  # the blocks take the tangent through their module calls (FSDP2)

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
            tangent: a direction (dz, dr, dt) for the leading M <= B rows; when given, the output
                is a ModelOutput whose ``du`` (M, C, H, W) is the derivative of ``u[:M]`` along it,
                computed in the same pass, without gradient (:meth:`forward_with_tangent`).
        Returns:
            (B, C, H, W) the predicted average velocity u(z, r, t, y), or, with a tangent, the
            ModelOutput (u, du).
        """
        y = self.read_labels(conditions)
        if tangent is None:
            return self.forward_with_tangent(z, r, t, y, None, None, None)[0]
        u, du = self.forward_with_tangent(z, r, t, y, tangent.dz, tangent.dr, tangent.dt)
        return ModelOutput(u=u, du=du)

    def forward_with_tangent(
        self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None, dz: Tensor | None, dr: Tensor | None,
        dt: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """(u, du): u = self(z, r, t, y) over the batch and du its directional derivative along
        (dz, dr, dt) for the leading M rows, in one pass.

        The forward-mode derivative written out by hand (:mod:`meanflow.models.tangent`): every
        layer computes its ordinary output over the B rows, recorded by autograd as in any
        forward, and from its intermediate values the tangent of the first M rows, without
        gradient and in fp32 or wider. With the tangent (v, 0, 1) it is d/dt u of Eq. 5, what
        ``torch.func.jvp`` of :meth:`forward` gives, and the gradient forward pays for the
        tangent alone, not a second primal of those rows. The labels and the positional
        embedding are constant. ``dz`` None: the plain forward (and du None).

        Args:
            z: (B, C, H, W) the state z_t; dz: (M, C, H, W) the tangent of its first M rows, or None.
            r, t: (B,) the times; dr, dt: (M,) their tangents (0 and 1 for Eq. 5), or None.
            y: (B,) int64 labels or None, as in :meth:`forward`.
        Returns:
            u: (B, C, H, W); du: (M, C, H, W) or None.
        """
        self._check_input(z)
        check_tangent_rows(z, dz, dr, dt)
        p = self.config.patch_size
        x = self.patch_embed(z).flatten(2).transpose(1, 2)  # (B, N, D), N = G * G, row-major
        x = x + self.position_embedding  # (B, N, D)
        dx = None
        if dz is not None:
            # The patch embedding is linear: its tangent is the same map of dz without the bias,
            # a GEMM over the flattened patches (a convolution over a batch of symbolic size does
            # not compile under inductor).
            with torch.no_grad(), torch.autocast(device_type=dz.device.type, enabled=False):
                weight = self.patch_embed.weight.to(dz.dtype).flatten(1)  # (D, C * p * p)
                dx = F.linear(patchify(dz, p), weight)  # (M, N, D)
        c, dc = self.conditioning.forward_with_tangent(r, t, y, dr, dt)  # (B, D) from t, t - r and the label
        silu_c, dsilu_c = silu_with_tangent(c, dc)  # every modulation's input: computed once
        for block in self.blocks:
            x, dx = self.run_block(block, (x, silu_c), (dx, dsilu_c))  # (B, N, D)
        x, dx = self.final_layer.forward_with_tangent(x, dx, silu_c, dsilu_c)  # (B, N, p * p * C)
        return self._unpatchify(x), None if dx is None else self._unpatchify(dx)

    def _unpatchify(self, x: Tensor) -> Tensor:
        """(n, N, p * p * C) tokens -> (n, C, H, W) images."""
        config = self.config
        batch, p, g = x.shape[0], config.patch_size, config.grid_size
        x = x.reshape(batch, g, g, p, p, config.in_channels)  # (n, G, G, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (n, C, G, p, G, p)
        return x.reshape(batch, config.in_channels, g * p, g * p)  # (n, C, H, W)

    def _check_input(self, z: Tensor) -> None:
        config = self.config
        expected = (config.in_channels, config.input_size, config.input_size)
        if z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"z must have shape (B, {', '.join(map(str, expected))}), got {tuple(z.shape)}")


def patchify(z: Tensor, patch_size: int) -> Tensor:
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
