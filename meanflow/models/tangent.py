"""Forward-mode differentiation of the networks' building blocks, written out by hand.

The DiT (:mod:`~meanflow.models.dit`), the iMF transformer (:mod:`~meanflow.models.imf_dit`) and
the MLP (:mod:`~meanflow.models.mlp`) compose their forwards from these pieces, one function per
layer kind: linear, LayerNorm, RMSNorm (also the per-head QK-norm), GELU, SiLU, SwiGLU, adaLN
modulation, gated or scaled residuals, softmax attention, sinusoidal embeddings, and any map that
is linear in its input (RoPE), whose tangent is the same map.

The MeanFlow target needs du/dt, one Jacobian-vector product of the network along the tangent
(dz, dr, dt) = (v, 0, 1) (Eq. 5), without gradient (the target is stop-gradient, Eq. 6), and only
for the rows with r != t. Each function here takes a primal ``x`` (B, ...) and a tangent ``dx``
of its LEADING rows, (M, ...) with M <= B, or None, and returns ``(y, dy)``:

- ``y`` is the layer's ordinary output over all B rows, computed by the same ops as the plain
  forward and recorded by autograd like any forward (the gradient pass);
- ``dy`` (M, ...) is the derivative of ``y[:M]`` along ``dx``, computed without gradient and with
  autocast off, in ``dx``'s precision (fp32 or wider), from the primal's own intermediate values
  (``x[:M]``, its statistics, the GELU input, the attention probabilities): the tangent rides on
  the gradient forward instead of repeating the primal of those rows (one pass);
- with ``dx`` None, ``dy`` is None and the function is the plain layer.

Elementwise functions, a LayerNorm without affine parameters and a softmax have symmetric
Jacobians, so their JVP equals their VJP, which PyTorch computes in one fused pass
(``gelu_backward``, ``native_layer_norm_backward``, ``_softmax_backward_data``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attention

_aten = torch.ops.aten
MaybeTensor = Optional[Tensor]


# The tangent is a constant of the loss, in its own precision: every tangent computation runs in
# ``with torch.no_grad(), torch.autocast(device, enabled=False)``, written out at each use (not a
# helper context manager) so that torch.compile traces through it without a graph break.


def lead(x: Tensor, dx: Tensor) -> Tensor:
    """The primal's rows that ``dx`` differentiates, as a constant in dx's dtype. (B, ...) -> (M, ...)"""
    return x[: dx.shape[0]].detach().to(dx.dtype)


def linear_with_tangent(x: Tensor, dx: MaybeTensor, weight: Tensor, bias: MaybeTensor = None) -> tuple:
    """``y = x W^T + b`` and ``dy = dx W^T`` (the tangent of a constant bias is zero).

    Args:
        x: (B, ..., K) the input; dx: (M, ..., K) the tangent of its leading rows, or None.
        weight: (N, K); bias: (N,) or None.
    Returns:
        y: (B, ..., N); dy: (M, ..., N) or None.
    """
    y = F.linear(x, weight, bias)
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        return y, F.linear(dx, weight.to(dx.dtype))


def layer_norm_with_tangent(x: Tensor, dx: MaybeTensor, eps: float) -> tuple:
    """LayerNorm over the last dimension, without affine parameters, and its tangent.

    ``y = (x - mean) * rstd`` and ``dy = rstd * (dx - mean(dx) - y * mean(y * dx))``.

    Args:
        x: (B, ..., D); dx: (M, ..., D) or None. eps: added to the variance, as in ``nn.LayerNorm``.
    Returns:
        y: (B, ..., D); dy: (M, ..., D) or None.
    """
    shape = (x.shape[-1],)
    y = F.layer_norm(x, shape, None, None, eps)
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        rows = lead(x, dx)
        _, mean, rstd = torch.native_layer_norm(rows, shape, None, None, eps)  # the statistics of x[:M]
        # The Jacobian rstd * (I - 1 1^T / D - y y^T / D) is symmetric, so the tangent J dx equals
        # the cotangent J^T dx that the fused backward kernel computes from the saved mean and rstd.
        dy = _aten.native_layer_norm_backward(dx, rows, shape, mean, rstd, None, None, [True, False, False])[0]
    return y, dy


def gelu_tanh_with_tangent(x: Tensor, dx: MaybeTensor) -> tuple:
    """GELU with the tanh approximation and its tangent ``dy = gelu'(x) * dx``. (B, ...), (M, ...)."""
    y = F.gelu(x, approximate="tanh")
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        # Diagonal Jacobian: the backward kernel's ``grad * gelu'(x)`` is the tangent, in one pass.
        return y, _aten.gelu_backward(dx, lead(x, dx), approximate="tanh")


def silu_with_tangent(x: Tensor, dx: MaybeTensor) -> tuple:
    """SiLU ``x * sigmoid(x)`` and its tangent ``dy = silu'(x) * dx``. (B, ...), (M, ...)."""
    y = F.silu(x)
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        return y, _aten.silu_backward(dx, lead(x, dx))  # diagonal Jacobian, as for GELU


def modulate_with_tangent(x: Tensor, dx: MaybeTensor, shift: Tensor, dshift: MaybeTensor, scale: Tensor,
                          dscale: MaybeTensor) -> tuple:
    """adaLN modulation ``y = x * (1 + scale) + shift`` and its tangent (product rule).

    ``dy = dx * (1 + scale) + x * dscale + dshift``.

    Args:
        x: (B, N, D) tokens; dx: (M, N, D) or None.
        shift, scale: (B, D) per-sample modulation; dshift, dscale: (M, D) their tangents.
    Returns:
        y: (B, N, D); dy: (M, N, D) or None.
    """
    y = x * (1 + scale[:, None, :]) + shift[:, None, :]
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        gain = 1 + lead(scale, dx)[:, None, :]
        dy = torch.addcmul(dshift[:, None, :], dx, gain).addcmul_(lead(x, dx), dscale[:, None, :])
    return y, dy


def gated_residual_with_tangent(x: Tensor, dx: MaybeTensor, branch: Tensor, dbranch: MaybeTensor, gate: Tensor,
                                dgate: MaybeTensor = None) -> tuple:
    """A gated residual ``y = x + gate * branch`` and its tangent (product rule).

    ``dy = dx + gate * dbranch + dgate * branch``. Two kinds of gate: the DiT's adaLN-Zero gate,
    per sample and moving with the conditions (``gate`` (B, D), ``dgate`` (M, D)), and the imfDiT's
    per-channel residual scale, a parameter (``gate`` (D,), ``dgate`` None: a constant).

    Args:
        x, branch: (B, N, D) the residual stream and the branch output; dx, dbranch: (M, N, D) or None.
    Returns:
        y: (B, N, D); dy: (M, N, D) or None.
    """
    y = x + gate.unsqueeze(-2) * branch
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        constant = dgate is None
        gain = (gate.detach().to(dx.dtype) if constant else lead(gate, dx)).unsqueeze(-2)
        dy = torch.addcmul(dx, dbranch, gain)
        if not constant:
            dy.addcmul_(lead(branch, dx), dgate.unsqueeze(-2))
    return y, dy


def conv2d_with_tangent(x: Tensor, dx: MaybeTensor, weight: Tensor, bias: MaybeTensor, padding: int = 0) -> tuple:
    """A stride-1 convolution ``y = conv(x, W) + b`` and its tangent ``dy = conv(dx, W)``.

    Args:
        x: (B, C_in, H, W); dx: (M, C_in, H, W) or None. weight: (C_out, C_in, k, k); bias: (C_out,) or None.
    Returns:
        y: (B, C_out, H', W'); dy: (M, C_out, H', W') or None.
    """
    y = F.conv2d(x, weight, bias, 1, padding)
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        return y, F.conv2d(dx, weight.to(dx.dtype), None, 1, padding)


def group_norm_with_tangent(x: Tensor, dx: MaybeTensor, groups: int, weight: Tensor, bias: Tensor,
                            eps: float) -> tuple:
    """GroupNorm ``y = gamma * x_hat + beta`` (x_hat normalised per sample and group) and its tangent.

    ``dy = gamma * rstd * (dx - mean(dx) - x_hat * mean(x_hat * dx))`` per group: the normalisation's
    Jacobian is symmetric, so the fused backward kernel without affine weights computes it from the
    group statistics, and gamma scales the result (the constant beta has no tangent).

    Args:
        x: (B, C, H, W); dx: (M, C, H, W) or None. groups: G, dividing C; weight, bias: (C,); eps: as in nn.GroupNorm.
    Returns:
        y: (B, C, H, W); dy: (M, C, H, W) or None.
    """
    y = F.group_norm(x, groups, weight, bias, eps)
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        rows = lead(x, dx)
        batch, channels = rows.shape[:2]
        spatial = math.prod(rows.shape[2:])
        _, mean, rstd = torch.native_group_norm(rows, None, None, batch, channels, spatial, groups, eps)
        normalised = _aten.native_group_norm_backward(dx, rows, mean, rstd, None, batch, channels, spatial, groups,
                                                      [True, False, False])[0]
        return y, normalised * weight.to(dx.dtype)[:, None, None]


def dropout_with_tangent(x: Tensor, dx: MaybeTensor, probability: float, training: bool) -> tuple:
    """Dropout and its tangent through the SAME mask: ``y = x * m``, ``dy = dx * m``, m = keep / (1 - p).

    The mask is drawn as ATen's CPU dropout draws it (``bernoulli_(1 - p)``, divided by 1 - p), so
    on a CPU the plain forward matches ``F.dropout`` bit for bit under the same seed.

    Args:
        x: (B, ...); dx: (M, ...) or None. probability: p in [0, 1); training: False is the identity.
    Returns:
        y: (B, ...); dy: (M, ...) or None.
    """
    if not training or probability == 0.0:
        return x, dx
    mask = torch.empty_like(x).bernoulli_(1.0 - probability).div_(1.0 - probability)
    y = x * mask
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        return y, dx * lead(mask, dx)


def rms_norm_with_tangent(x: Tensor, dx: MaybeTensor, weight: MaybeTensor, eps: float) -> tuple:
    """RMSNorm over the last dimension and its tangent; also the per-head QK-norm of attention.

    With ``s = (mean(x^2) + eps)^(-1/2)`` and ``x_hat = x s``: ``y = x_hat * weight`` and, since
    ``ds = -s^3 mean(x dx)``, ``dy = weight * s * (dx - x_hat * mean(x_hat * dx))``. The primal is
    the op sequence of ``RMSNorm.forward`` in :mod:`~meanflow.models.imf_dit`.

    Args:
        x: (B, ..., D); dx: (M, ..., D) or None. weight: (D,) or None. eps: added to the mean square.
    Returns:
        y: (B, ..., D); dy: (M, ..., D) or None.
    """
    y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        rows = lead(x, dx)
        rstd = torch.rsqrt(rows.square().mean(dim=-1, keepdim=True) + eps)  # (M, ..., 1)
        normalized = rows * rstd
        projection = (normalized * dx).mean(dim=-1, keepdim=True)  # (M, ..., 1) mean(x_hat dx)
        dy = torch.addcmul(dx, normalized, projection, value=-1).mul_(rstd)
        if weight is not None:
            dy.mul_(weight.to(dx.dtype))
    return y, dy


def swiglu_with_tangent(x: Tensor, dx: MaybeTensor, gate_weight: Tensor, value_weight: Tensor,
                        out_weight: Tensor) -> tuple:
    """The bias-free SwiGLU MLP ``y = W2 (silu(W1 x) * W3 x)`` and its tangent.

    With ``a = W1 x``, ``b = W3 x``: ``d(silu(a) * b) = silu'(a) da * b + silu(a) db`` (product rule).

    Args:
        x: (B, ..., D); dx: (M, ..., D) or None. gate_weight: (F, D) W1, the branch through SiLU;
        value_weight: (F, D) W3; out_weight: (D, F) W2.
    Returns:
        y: (B, ..., D); dy: (M, ..., D) or None.
    """
    a, da = linear_with_tangent(x, dx, gate_weight)  # (B, ..., F)
    b, db = linear_with_tangent(x, dx, value_weight)
    s, ds = silu_with_tangent(a, da)
    product, dproduct = s * b, None
    if dx is not None:
        with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
            dproduct = (ds * lead(b, dx)).addcmul_(lead(s, dx), db)
    return linear_with_tangent(product, dproduct, out_weight)


def linear_map_with_tangent(x: Tensor, dx: MaybeTensor, linear_map: Callable[[Tensor], Tensor]) -> tuple:
    """A map that is linear in its input (a rotary embedding) and its tangent: ``d f(x) = f(dx)``.

    ``f`` must act on each leading index alike (broadcast over the leading dimensions).

    Args:
        x: (B, ...); dx: (M, ...) or None. linear_map: (n, ...) -> (n, ...'), linear in its input.
    Returns:
        y: (B, ...'); dy: (M, ...') or None.
    """
    y = linear_map(x)
    if dx is None:
        return y, None
    with torch.no_grad(), torch.autocast(dx.device.type, enabled=False):
        return y, linear_map(dx)


BLOCKWISE_TOKENS = 256
"""From this many tokens on, the attention tangent streams over key blocks (O(N) memory)."""
KEY_BLOCK = 128
"""The keys per block of the streaming attention tangent."""


def attention_with_tangent(q: Tensor, dq: MaybeTensor, k: Tensor, dk: MaybeTensor, v: Tensor,
                           dv: MaybeTensor, key_block: Optional[int] = None) -> tuple:
    """Softmax attention ``O = softmax(scale Q K^T) V`` and its tangent, scale = d^-1/2.

    The primal is :func:`~meanflow.models.attention.attention` (the fused kernel). The tangent
    recomputes the probabilities of the leading rows (the fused kernel keeps none): with
    S = scale Q K^T and P = softmax(S),

        dS = scale (dQ K^T + Q dK^T)
        dP = P * (dS - rowsum(P * dS))     (the softmax Jacobian, symmetric)
        dO = dP V + P dV

    Up to ``BLOCKWISE_TOKENS`` tokens it materialises the (N, N) scores of its M rows
    (:func:`attention_tangent_dense`); from there on, or with ``key_block`` given, it streams over
    blocks of keys with an online softmax and never holds more than (N, key_block) scores
    (:func:`attention_tangent_blockwise`).

    Args:
        q, k, v: (B, ..., N, d) queries, keys, values (e.g. (B, H, N, d)); dq, dk, dv: (M, ..., N, d) or None.
        key_block: force the streaming path with this many keys per block (None: by length).
    Returns:
        o: (B, ..., N, d); do: (M, ..., N, d) or None.
    """
    o = attention(q, k, v)
    if dq is None:
        return o, None
    with torch.no_grad(), torch.autocast(dq.device.type, enabled=False):
        rows = (lead(q, dq), dq, lead(k, dq), dk, lead(v, dq), dv)
        tokens = q.shape[-2]
        if key_block is None and tokens < BLOCKWISE_TOKENS:
            return o, attention_tangent_dense(*rows)
        return o, attention_tangent_blockwise(*rows, key_block=key_block or KEY_BLOCK)


def attention_tangent_dense(q: Tensor, dq: Tensor, k: Tensor, dk: Tensor, v: Tensor, dv: Tensor) -> Tensor:
    """dO of softmax attention with the (N, N) scores materialised. Inputs (..., N, d) -> (..., N, d).

    Each sum of two products is one batched GEMM over a doubled contraction axis:
    ``[Q | dQ] [dK | K]^T = Q dK^T + dQ K^T`` (features) and ``[dP | P] [V; dV] = dP V + P dV`` (keys).
    """
    *batch, tokens, width = q.shape
    groups = math.prod(batch)  # G
    scale = width**-0.5
    qq = torch.cat([q, dq], dim=-1).view(groups, tokens, 2 * width)  # (G, N, 2d): [Q | dQ]
    kk = torch.cat([dk, k], dim=-1).view(groups, tokens, 2 * width)  # (G, N, 2d): [dK | K]
    vv = torch.cat([v, dv], dim=-2).view(groups, 2 * tokens, width)  # (G, 2N, d): [V; dV]
    unused = q.new_zeros(())  # beta = 0: baddbmm only for alpha, which fuses the scale into the GEMM
    scores = torch.baddbmm(unused, qq[..., :width], kk[..., width:].transpose(1, 2), beta=0, alpha=scale)
    dscores = torch.baddbmm(unused, qq, kk.transpose(1, 2), beta=0, alpha=scale)  # (G, N, N) each
    p = torch.softmax(scores, dim=-1)
    dp = _aten._softmax_backward_data(dscores, p, -1, p.dtype)  # symmetric Jacobian: backward = tangent
    return torch.bmm(torch.cat([dp, p], dim=-1), vv).view(*batch, tokens, width)  # dP V + P dV


def attention_tangent_blockwise(q: Tensor, dq: Tensor, k: Tensor, dk: Tensor, v: Tensor, dv: Tensor,
                                key_block: int = KEY_BLOCK) -> Tensor:
    """dO of softmax attention streamed over blocks of keys: O(N * key_block) memory, not O(N^2).

    With c_i = sum_j P_ij dS_ij, the tangent of row i is

        dO_i = sum_j P_ij dS_ij V_j + sum_j P_ij dV_j - c_i O_i,

    every term a P-weighted sum over keys. An online softmax (running max m_i, normaliser
    l_i = sum_j exp(S_ij - m_i)) accumulates the unnormalised sums O~, D~ = sum e (dS V + dV) and
    C~ = sum e dS block by block, rescaling them by exp(m_old - m_new) when the max grows; at the
    end O = O~ / l, c = C~ / l and dO = D~ / l - c O. Inputs (..., N, d) -> (..., N, d).
    """
    *batch, tokens, width = q.shape
    groups = math.prod(batch)
    scale = width**-0.5
    q, dq, k, dk, v, dv = (part.reshape(groups, tokens, width) for part in (q, dq, k, dk, v, dv))
    qq = torch.cat([q, dq], dim=-1)  # (G, N, 2d): [Q | dQ]
    running_max = q.new_full((groups, tokens, 1), -math.inf)
    normaliser = q.new_zeros((groups, tokens, 1))
    out, dout = torch.zeros_like(q), torch.zeros_like(q)  # O~ and D~
    along = q.new_zeros((groups, tokens, 1))  # C~
    for start in range(0, tokens, key_block):
        keys = slice(start, start + key_block)
        kk = torch.cat([dk[:, keys], k[:, keys]], dim=-1)  # (G, n, 2d): [dK | K]
        scores = torch.bmm(q, k[:, keys].transpose(1, 2)).mul_(scale)  # (G, N, n)
        dscores = torch.bmm(qq, kk.transpose(1, 2)).mul_(scale)  # dQ K^T + Q dK^T
        block_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        rescale = torch.exp(running_max - block_max)  # 0 on the first block (exp(-inf))
        weights = torch.exp(scores - block_max)  # (G, N, n)
        weighted = weights * dscores
        normaliser = normaliser * rescale + weights.sum(dim=-1, keepdim=True)
        along = along * rescale + weighted.sum(dim=-1, keepdim=True)
        out = torch.baddbmm(out * rescale, weights, v[:, keys])
        dout = torch.baddbmm(torch.baddbmm(dout * rescale, weighted, v[:, keys]), weights, dv[:, keys])
        running_max = block_max
    out, dout, along = out / normaliser, dout / normaliser, along / normaliser
    return (dout - along * out).view(*batch, tokens, width)


def sinusoidal_embedding_with_tangent(values: Tensor, dvalues: MaybeTensor, dim: int,
                                      max_period: float = 10_000.0) -> tuple:
    """Sinusoidal features ``[cos(a f_k), sin(a f_k)]`` of raw scalars, and their tangent.

    No x1000 scaling: times stay in [0, 1]; ``f_k = max_period^(-k / (dim/2))``. The features move
    by ``[-sin(a f) f, cos(a f) f] da``.

    Args:
        values: (B,) the scalars (e.g. t or t - r); dvalues: (M,) their tangents, or None.
        dim: the number of features (even). max_period: the longest period among the frequencies.
    Returns:
        features: (B, dim); dfeatures: (M, dim) or None.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dimension must be even, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=values.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponent).to(values.dtype)  # (half,)
    angles = values[:, None] * frequencies[None, :]  # (B, half)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dvalues is None:
        return features, None
    with torch.no_grad(), torch.autocast(dvalues.device.type, enabled=False):
        rows = dvalues.shape[0]
        rates = dvalues[:, None] * frequencies.to(dvalues.dtype)[None, :]  # (M, half), d(angles)
        cos, sin = (part[:rows].to(dvalues.dtype) for part in features.chunk(2, dim=-1))
        return features, torch.cat([-sin * rates, cos * rates], dim=-1)
