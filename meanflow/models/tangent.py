"""Forward-mode differentiation of the networks' building blocks, written out by hand.

The DiT (:mod:`~meanflow.models.dit`), the iMF transformer (:mod:`~meanflow.models.imf_dit`) and
the MLP (:mod:`~meanflow.models.mlp`) compose their explicit tangents from these pieces, one
function per layer kind: linear, LayerNorm, RMSNorm (also the per-head QK-norm), GELU, SiLU,
SwiGLU, adaLN modulation, gated or scaled residuals, softmax attention, sinusoidal embeddings,
and any map that is linear in its input (RoPE), whose tangent is the same map.

The MeanFlow target needs du/dt, one Jacobian-vector product of the network along the tangent
(dz, dr, dt) = (v, 0, 1) (Eq. 5), and needs it without gradient (the target is stop-gradient,
Eq. 6). ``torch.func.jvp`` gets there generically but slowly on small batches: it multiplies the
primal and the tangent rows in separate GEMMs and pays per-op overhead for its dual tensors
(wrapping, decompositions, copies). Each function here takes a primal ``x`` and its tangent ``dx``
and returns ``(y, dy)``, ``dy`` being the derivative of ``y`` along ``dx``, with three savings:

- One GEMM per linear layer. A primal and its tangent live as the two halves of one buffer of
  shape ``(2, ...)`` (``y = buffer[0]``, ``dy = buffer[1]``). Every function returns such halves
  and :func:`pair` recovers the buffer from them without copying, so a linear layer multiplies
  the primal and tangent rows together; the bias goes to the primal half only (the tangent of a
  constant is zero).
- Fused backward kernels as tangent kernels. Elementwise functions, a LayerNorm without affine
  parameters and a softmax have symmetric Jacobians, so their JVP equals their VJP, which PyTorch
  computes in one fused pass (``gelu_backward``, ``native_layer_norm_backward``, ...).
- Shared intermediate values: the tangent reuses the primal's statistics (mean, 1/std, the
  softmax probabilities), never recomputing them.

Call these functions without gradient recording (``torch.no_grad()`` or ``torch.inference_mode()``):
they write into fresh buffers with ``out=`` and in-place ops, which autograd refuses for tensors that
require grad. They never modify their inputs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_aten = torch.ops.aten


def pair(x: Tensor, dx: Tensor) -> Tensor:
    """The primal and its tangent as one tensor of shape ``(2, *x.shape)``.

    A view, not a copy, when ``x`` and ``dx`` are the two halves of one buffer (what every
    function of this module returns); otherwise the two are stacked (one copy).

    Args:
        x: (...) the primal.
        dx: (...) its tangent, of x's shape and dtype.
    Returns:
        (2, ...) with ``[0] = x`` and ``[1] = dx``; read it, never write to it.
    """
    if (
        x.shape == dx.shape
        and x.stride() == dx.stride()
        and x.dtype == dx.dtype
        and x.device == dx.device
        and x.untyped_storage().data_ptr() == dx.untyped_storage().data_ptr()
    ):
        step = dx.storage_offset() - x.storage_offset()
        if step > 0:
            # Same storage, same strides, dx a fixed step after x: one strided view covers both.
            return x.as_strided((2, *x.shape), (step, *x.stride()), x.storage_offset())
    return torch.stack([x, dx])


def _halves(buffer: Tensor) -> tuple[Tensor, Tensor]:
    return buffer[0], buffer[1]


def linear_with_tangent(x: Tensor, dx: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``y = x W^T + b`` and ``dy = dx W^T``, primal and tangent rows in ONE GEMM.

    Args:
        x, dx: (..., K) the input and its tangent.
        weight: (M, K); bias: (M,) or None.
    Returns:
        y, dy: (..., M) each, the halves of one buffer.
    """
    out = F.linear(pair(x, dx), weight)  # (2, ..., M): the GEMM sees 2x the rows, the weight once
    if bias is not None:
        out[0].add_(bias)  # the tangent of a constant is zero: bias on the primal half only
    return _halves(out)


def layer_norm_with_tangent(x: Tensor, dx: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dimension, without affine parameters, and its tangent.

    ``y = (x - mean) * rstd`` and ``dy = rstd * (dx - mean(dx) - y * mean(y * dx))``.

    Args:
        x, dx: (..., D) the input and its tangent.
        eps: added to the variance, as in ``nn.LayerNorm``.
    Returns:
        y, dy: (..., D) each.
    """
    shape = (x.shape[-1],)
    y, mean, rstd = torch.native_layer_norm(x, shape, None, None, eps)
    # The Jacobian rstd * (I - 1 1^T / D - y y^T / D) is symmetric, so the tangent J dx equals the
    # cotangent J^T dx that the fused backward kernel computes from the saved mean and rstd.
    dy = _aten.native_layer_norm_backward(dx, x, shape, mean, rstd, None, None, [True, False, False])[0]
    return y, dy


def gelu_tanh_with_tangent(x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """GELU with the tanh approximation and its tangent ``dy = gelu'(x) * dx``.

    Args:
        x, dx: (...) the input and its tangent.
    Returns:
        y, dy: (...) each, the halves of one buffer.
    """
    out = x.new_empty((2, *x.shape))
    _aten.gelu.out(x, approximate="tanh", out=out[0])
    # Diagonal Jacobian: the backward kernel's ``grad * gelu'(x)`` is the tangent, in one pass.
    _aten.gelu_backward.grad_input(dx, x, approximate="tanh", grad_input=out[1])
    return _halves(out)


def silu_with_tangent(x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU ``x * sigmoid(x)`` and its tangent ``dy = silu'(x) * dx``.

    Args:
        x, dx: (...) the input and its tangent.
    Returns:
        y, dy: (...) each, the halves of one buffer.
    """
    out = x.new_empty((2, *x.shape))
    _aten.silu.out(x, out=out[0])
    _aten.silu_backward.grad_input(dx, x, grad_input=out[1])  # diagonal Jacobian, as for GELU
    return _halves(out)


def modulate_with_tangent(
    x: Tensor, dx: Tensor, shift: Tensor, dshift: Tensor, scale: Tensor, dscale: Tensor
) -> tuple[Tensor, Tensor]:
    """adaLN modulation ``y = x * (1 + scale) + shift`` and its tangent (product rule).

    ``dy = dx * (1 + scale) + x * dscale + dshift``.

    Args:
        x, dx: (B, N, D) tokens and their tangent.
        shift, dshift, scale, dscale: (B, D) per-sample modulation and tangents.
    Returns:
        y, dy: (B, N, D) each, the halves of one buffer (ready for a linear layer).
    """
    out = x.new_empty((2, *x.shape))
    gain = (1 + scale)[:, None, :]  # (B, 1, D), shared by the primal and tangent halves
    torch.addcmul(shift[:, None, :], x, gain, out=out[0])
    torch.addcmul(dshift[:, None, :], dx, gain, out=out[1])
    out[1].addcmul_(x, dscale[:, None, :])
    return _halves(out)


def gated_residual_with_tangent(
    x: Tensor, dx: Tensor, branch: Tensor, dbranch: Tensor, gate: Tensor, dgate: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A gated residual ``y = x + gate * branch`` and its tangent (product rule).

    ``dy = dx + gate * dbranch + dgate * branch``. Two kinds of gate: the DiT's adaLN-Zero gate,
    per sample and moving with the conditions (``gate``, ``dgate``: (B, D)), and the imfDiT's
    per-channel residual scale, a parameter (``gate``: (D,), ``dgate`` None: a constant's tangent
    is zero, so the last term is skipped).

    Args:
        x, dx: (B, N, D) the residual stream and its tangent.
        branch, dbranch: (B, N, D) the branch output and its tangent.
        gate: (B, D) or (D,) the gate; dgate: its tangent, of gate's shape, or None for a constant.
    Returns:
        y, dy: (B, N, D) each, the halves of one buffer.
    """
    out = x.new_empty((2, *x.shape))
    gate = gate.unsqueeze(-2)  # (B, 1, D) or (1, D): one gate for every token
    torch.addcmul(x, branch, gate, out=out[0])
    torch.addcmul(dx, dbranch, gate, out=out[1])
    if dgate is not None:
        out[1].addcmul_(branch, dgate.unsqueeze(-2))
    return _halves(out)


def rms_norm_with_tangent(x: Tensor, dx: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dimension and its tangent; also the per-head QK-norm of attention.

    With ``s = (mean(x^2) + eps)^(-1/2)`` and ``x_hat = x s``: ``y = x_hat * weight`` and, since
    ``ds = -s^3 mean(x dx)``,

        dy = weight * s * (dx - x_hat * mean(x_hat * dx)).

    The primal is the same sequence of ops as ``RMSNorm.forward`` of :mod:`~meanflow.models.imf_dit`
    (``x * rsqrt(mean(x^2) + eps) * weight``), so it matches that forward bitwise for the same x.

    Args:
        x, dx: (..., D) the input and its tangent (views of any layout).
        weight: (D,) the learned per-channel scale, or None for none.
        eps: added to the mean square.
    Returns:
        y, dy: (..., D) each, the halves of one buffer.
    """
    rstd = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)  # (..., 1), shared by both halves
    normalized = x * rstd  # (..., D) x_hat
    projection = (normalized * dx).mean(dim=-1, keepdim=True)  # (..., 1) mean(x_hat dx)
    out = x.new_empty((2, *x.shape))
    torch.addcmul(dx, normalized, projection, value=-1, out=out[1]).mul_(rstd)
    if weight is None:
        out[0].copy_(normalized)
    else:
        torch.mul(normalized, weight, out=out[0])
        out[1].mul_(weight)
    return _halves(out)


def swiglu_with_tangent(
    x: Tensor, dx: Tensor, gate_weight: Tensor, value_weight: Tensor, out_weight: Tensor
) -> tuple[Tensor, Tensor]:
    """The bias-free SwiGLU MLP ``y = W2 (silu(W1 x) * W3 x)`` and its tangent.

    With ``a = W1 x``, ``b = W3 x``: ``d(silu(a) * b) = silu'(a) da * b + silu(a) db`` (product
    rule), then ``dy = W2 d(...)``. Three GEMMs, each over the primal and tangent rows together.

    Args:
        x, dx: (..., D) the input and its tangent.
        gate_weight: (F, D) W1, the branch through SiLU; value_weight: (F, D) W3;
        out_weight: (D, F) W2.
    Returns:
        y, dy: (..., D) each, the halves of one buffer.
    """
    a, da = linear_with_tangent(x, dx, gate_weight)  # (..., F) each
    b, db = linear_with_tangent(x, dx, value_weight)
    s, ds = silu_with_tangent(a, da)
    product = x.new_empty((2, *b.shape))
    torch.mul(s, b, out=product[0])
    torch.mul(ds, b, out=product[1]).addcmul_(s, db)
    return linear_with_tangent(product[0], product[1], out_weight)  # (..., D) each


def linear_map_with_tangent(x: Tensor, dx: Tensor, linear_map: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """A map that is linear in its input (a rotary embedding, a fixed permutation) and its tangent.

    For linear ``f``, ``d f(x) = f(dx)``: one call of ``f`` on the primal and tangent as one
    ``(2, ...)`` tensor computes both. ``f`` must act on each leading index alike (broadcast over
    the leading dimensions), as an elementwise rotation does.

    Args:
        x, dx: (...) the input and its tangent.
        linear_map: (2, ...) -> (2, ...'), linear in its input.
    Returns:
        y, dy: (...') each, the halves of one buffer.
    """
    return _halves(linear_map(pair(x, dx)))


def attention_with_tangent(
    q: Tensor, dq: Tensor, k: Tensor, dk: Tensor, v: Tensor, dv: Tensor
) -> tuple[Tensor, Tensor]:
    """Softmax attention ``O = softmax(scale Q K^T) V`` and its tangent, scale = d^-1/2.

    With S = scale Q K^T and P = softmax(S):

        dS = scale (dQ K^T + Q dK^T)
        dP = P * (dS - rowsum(P * dS))     (the softmax Jacobian, symmetric)
        dO = dP V + P dV

    Each sum of two products is one batched GEMM over a doubled contraction axis:
    ``[Q | dQ] [dK | K]^T = Q dK^T + dQ K^T`` (features) and ``[dP | P] [V; dV] = dP V + P dV``
    (keys), so the tangent costs two GEMMs, like the primal.

    Args:
        q, dq, k, dk, v, dv: (..., N, d) queries, keys, values (e.g. (B, H, N, d)) and tangents.
    Returns:
        o, do: (..., N, d) each, the halves of one buffer.
    """
    *batch, tokens, width = q.shape
    groups = math.prod(batch)  # G
    scale = width**-0.5
    # One copy each into the layouts bmm needs.
    qq = torch.cat([q, dq], dim=-1).view(groups, tokens, 2 * width)  # (G, N, 2d): [Q | dQ]
    kk = torch.cat([dk, k], dim=-1).view(groups, tokens, 2 * width)  # (G, N, 2d): [dK | K]
    vv = torch.cat([v, dv], dim=-2).view(groups, 2 * tokens, width)  # (G, 2N, d): [V; dV]
    unused = q.new_zeros(())  # beta = 0: baddbmm only for alpha, which fuses the scale into the GEMM
    scores = torch.baddbmm(unused, qq[..., :width], kk[..., width:].transpose(1, 2), beta=0, alpha=scale)
    dscores = torch.baddbmm(unused, qq, kk.transpose(1, 2), beta=0, alpha=scale)  # (G, N, N) each

    p = torch.softmax(scores, dim=-1)  # (G, N, N)
    # The softmax Jacobian diag(P) - P P^T is symmetric: its backward kernel computes the tangent.
    dp = _aten._softmax_backward_data(dscores, p, -1, p.dtype)

    out = q.new_empty((2, *batch, tokens, width))
    torch.bmm(p, vv[:, :tokens], out=out[0].view(groups, tokens, width))  # O
    torch.bmm(torch.cat([dp, p], dim=-1), vv, out=out[1].view(groups, tokens, width))  # dO = dP V + P dV
    return _halves(out)


def sinusoidal_embedding_with_tangent(
    values: Tensor, dvalues: Tensor, dim: int, max_period: float = 10_000.0
) -> tuple[Tensor, Tensor]:
    """:func:`~meanflow.models.embeddings.sinusoidal_embedding` and its tangent.

    With angles a f_k: ``[cos(a f), sin(a f)]`` moves by ``[-sin(a f) f, cos(a f) f] da``.

    Args:
        values, dvalues: (B,) the scalars (e.g. t or t - r) and their tangents.
        dim: the number of features (even).
        max_period: the longest period among the frequencies.
    Returns:
        features, dfeatures: (B, dim) each, the halves of one buffer.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dimension must be even, got {dim}")
    half = dim // 2
    # The frequencies exactly as sinusoidal_embedding computes them, so the primal matches it bitwise.
    exponent = torch.arange(half, dtype=torch.float32, device=values.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponent).to(values.dtype)  # (half,)
    angles = values[:, None] * frequencies[None, :]  # (B, half)
    rates = dvalues[:, None] * frequencies[None, :]  # (B, half), d(angles)
    out = values.new_empty((2, values.shape[0], dim))
    cos, sin = out[0, :, :half], out[0, :, half:]
    torch.cos(angles, out=cos)
    torch.sin(angles, out=sin)
    torch.mul(sin, rates, out=out[1, :, :half]).neg_()
    torch.mul(cos, rates, out=out[1, :, half:])
    return _halves(out)
