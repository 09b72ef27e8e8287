"""Tests of the hand-written forward mode: each tangent piece and DiT.forward_with_tangent against torch.func.jvp.

(The imfDiT's and the MLP's explicit tangents are tested in tests/test_imf_dit.py and
tests/test_mlp_tangent.py; :class:`TorchFuncOnly` here is their way to force torch.func.jvp.)

Everything runs in float64, where the explicit tangent and torch.func.jvp agree to round-off, so a
wrong term (a missed product-rule half, a tangent bias, a wrong sign) shows as an O(1) error.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meanflow.models import tangent
from meanflow.models.attention import math_attention
from meanflow.models.dit import DiT, DiTConfig
from meanflow.models.embeddings import ScalarEmbedder, TimeConditioning, sinusoidal_embedding
from meanflow.models.imf_dit import RMSNorm, SwiGLU, apply_rope, rope_angles

F64 = torch.float64
TOLERANCE = dict(rtol=1e-10, atol=1e-10)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def jvp(function, primals, tangents):
    return torch.func.jvp(function, tuple(primals), tuple(tangents))


def assert_pair_close(actual, expected):
    (y, dy), (y_ref, dy_ref) = actual, expected
    assert dy_ref.abs().max() > 1e-3  # the reference tangent is not trivially zero
    torch.testing.assert_close(y, y_ref, **TOLERANCE)
    torch.testing.assert_close(dy, dy_ref, **TOLERANCE)


class TorchFuncOnly(nn.Module):
    """A network without its explicit tangent: the same calls, but ``explicit_tangent`` is not
    declared, so :func:`meanflow.jvp.tangent_along_flow` falls back to ``torch.func.jvp``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    @property
    def accepted_conditions(self) -> frozenset[str]:
        return self.network.accepted_conditions

    @property
    def auxiliary_velocity(self) -> bool:
        return self.network.auxiliary_velocity

    def forward(self, z, r, t, conditions=None):
        return self.network(z, r, t, conditions)


# --- the pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(with_bias):
    weight, bias = randn(6, 5, seed=0), randn(6, seed=1) if with_bias else None
    x, dx = randn(2, 3, 5, seed=2), randn(2, 3, 5, seed=3)
    actual = tangent.linear_with_tangent(x, dx, weight, bias)
    assert_pair_close(actual, jvp(lambda a: F.linear(a, weight, bias), [x], [dx]))


def test_layer_norm():
    x, dx = 3 * randn(4, 5, 16, seed=0) + 1, randn(4, 5, 16, seed=1)
    with torch.no_grad():
        actual = tangent.layer_norm_with_tangent(x, dx, eps=1e-6)
    assert_pair_close(actual, jvp(lambda a: F.layer_norm(a, (16,), eps=1e-6), [x], [dx]))


def test_layer_norm_tangent_closed_form():
    # dy = rstd * (dx - mean(dx) - y * mean(y * dx)): constant shifts vanish, scaling x leaves y.
    x = randn(3, 8, seed=0)
    with torch.no_grad():
        _, shift = tangent.layer_norm_with_tangent(x, torch.ones_like(x), eps=0.0)
        _, stretch = tangent.layer_norm_with_tangent(x, x, eps=0.0)
    torch.testing.assert_close(shift, torch.zeros_like(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(stretch, torch.zeros_like(x), rtol=0, atol=1e-13)


def test_gelu_tanh():
    x, dx = 2 * randn(3, 7, seed=0), randn(3, 7, seed=1)
    with torch.no_grad():
        actual = tangent.gelu_tanh_with_tangent(x, dx)
    assert_pair_close(actual, jvp(lambda a: F.gelu(a, approximate="tanh"), [x], [dx]))


def test_silu():
    x, dx = 2 * randn(3, 7, seed=0), randn(3, 7, seed=1)
    with torch.no_grad():
        actual = tangent.silu_with_tangent(x, dx)
    assert_pair_close(actual, jvp(F.silu, [x], [dx]))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def test_modulate():
    x, dx = randn(2, 5, 8, seed=0), randn(2, 5, 8, seed=1)
    shift, dshift, scale, dscale = (randn(2, 8, seed=seed) for seed in range(2, 6))
    with torch.no_grad():
        actual = tangent.modulate_with_tangent(x, dx, shift, dshift, scale, dscale)
    assert_pair_close(actual, jvp(modulate, [x, shift, scale], [dx, dshift, dscale]))


def test_gated_residual():
    x, dx, branch, dbranch = (randn(2, 5, 8, seed=seed) for seed in range(4))
    gate, dgate = randn(2, 8, seed=4), randn(2, 8, seed=5)

    def residual(x_, branch_, gate_):
        return x_ + gate_[:, None, :] * branch_

    with torch.no_grad():
        actual = tangent.gated_residual_with_tangent(x, dx, branch, dbranch, gate, dgate)
    assert_pair_close(actual, jvp(residual, [x, branch, gate], [dx, dbranch, dgate]))


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(with_weight):
    # Also the QK-norm: heads as a leading axis of a transposed (non-contiguous) view.
    x, dx = ((3 * randn(2, 5, 3, 8, seed=seed) + 1).transpose(1, 2) for seed in (0, 1))
    weight = 1 + randn(8, seed=2) if with_weight else None

    def reference(a):
        normalized = a * torch.rsqrt(a.square().mean(dim=-1, keepdim=True) + 1e-6)
        return normalized if weight is None else normalized * weight

    with torch.no_grad():
        actual = tangent.rms_norm_with_tangent(x, dx, weight, eps=1e-6)
    assert_pair_close(actual, jvp(reference, [x], [dx]))
    if with_weight:  # the primal is RMSNorm.forward's own sequence of ops: equal bitwise
        module = RMSNorm(8).double()
        with torch.no_grad():
            module.weight.copy_(weight)
            assert torch.equal(actual[0], module(x))
            assert torch.equal(module.forward_with_tangent(x, dx)[1], actual[1])


def test_rms_norm_tangent_closed_form():
    # dy = w s (dx - x_hat mean(x_hat dx)) with eps = 0: scaling x leaves y, so the tangent along x vanishes.
    x = randn(3, 8, seed=0)
    weight = 1 + randn(8, seed=1)
    with torch.no_grad():
        _, stretch = tangent.rms_norm_with_tangent(x, x, weight, eps=0.0)
        _, other = tangent.rms_norm_with_tangent(x, randn(3, 8, seed=2), weight, eps=0.0)
    torch.testing.assert_close(stretch, torch.zeros_like(x), rtol=0, atol=1e-13)
    assert other.abs().max() > 1e-2


def test_swiglu():
    module = SwiGLU(6, 10).double()
    x, dx = randn(2, 5, 6, seed=0), randn(2, 5, 6, seed=1)
    with torch.no_grad():
        actual = module.forward_with_tangent(x, dx)
    assert_pair_close(actual, jvp(module, [x], [dx]))


def test_linear_map_is_its_own_tangent_for_rope():
    cos, sin = (part.double() for part in rope_angles(head_dim=4, length=5))
    x, dx = randn(2, 3, 5, 4, seed=0), randn(2, 3, 5, 4, seed=1)  # (B, H, L, hd)

    def rotate(a):
        return apply_rope(a, cos, sin)

    with torch.no_grad():
        actual = tangent.linear_map_with_tangent(x, dx, rotate)
    assert_pair_close(actual, jvp(rotate, [x], [dx]))
    assert torch.equal(actual[0], rotate(x)) and torch.equal(actual[1], rotate(dx))  # one call, same rotation


def test_gated_residual_with_a_constant_scale():
    # The imfDiT's residual scale: a (D,) parameter, so dy = dx + scale * dbranch (no gate tangent).
    x, dx, branch, dbranch = (randn(2, 5, 8, seed=seed) for seed in range(4))
    scale = randn(8, seed=4)
    with torch.no_grad():
        actual = tangent.gated_residual_with_tangent(x, dx, branch, dbranch, scale)
    assert_pair_close(actual, jvp(lambda x_, b_: x_ + b_ * scale, [x, branch], [dx, dbranch]))


def test_attention():
    q, dq, k, dk, v, dv = (randn(2, 3, 6, 4, seed=seed) for seed in range(6))
    with torch.no_grad():
        actual = tangent.attention_with_tangent(q, dq, k, dk, v, dv)
    assert_pair_close(actual, jvp(math_attention, [q, k, v], [dq, dk, dv]))
    torch.testing.assert_close(actual[0], F.scaled_dot_product_attention(q, k, v), **TOLERANCE)


def test_attention_of_strided_views():
    # The DiT hands attention permuted views of one qkv buffer (primal and tangent halves).
    qkv = randn(2, 2, 5, 3, 2, 4, seed=0)  # (pair, B, N, 3, H, d)
    (q, k, v), (dq, dk, dv) = (half.permute(2, 0, 3, 1, 4) for half in qkv)
    with torch.no_grad():
        actual = tangent.attention_with_tangent(q, dq, k, dk, v, dv)
    assert_pair_close(actual, jvp(math_attention, [q, k, v], [dq, dk, dv]))


def test_sinusoidal_embedding():
    values, dvalues = torch.rand(5, dtype=F64), randn(5, seed=0)
    with torch.no_grad():
        actual = tangent.sinusoidal_embedding_with_tangent(values, dvalues, 16)
    assert_pair_close(actual, jvp(lambda a: sinusoidal_embedding(a, 16), [values], [dvalues]))
    assert torch.equal(actual[0], sinusoidal_embedding(values, 16))  # same frequencies, bitwise
    # At 0 the features [cos, sin] = [1, 0] move by [0, f] per unit: d/da sin(a f) = f.
    _, at_zero = tangent.sinusoidal_embedding_with_tangent(torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64), 4)
    torch.testing.assert_close(at_zero[0], torch.tensor([0.0, 0.0, 1.0, 0.01], dtype=F64))
    with pytest.raises(ValueError, match="even"):
        tangent.sinusoidal_embedding_with_tangent(values, dvalues, 7)


def test_scalar_embedder_and_time_conditioning():
    torch.manual_seed(0)
    embedder = ScalarEmbedder(8, frequency_size=16).double()
    values, dvalues = torch.rand(4, dtype=F64), randn(4, seed=0)
    with torch.no_grad():
        actual = embedder.forward_with_tangent(values, dvalues)
    assert_pair_close(actual, jvp(embedder, [values], [dvalues]))

    conditioning = TimeConditioning(8, num_classes=3, frequency_size=16).double()
    t = 0.5 + 0.5 * torch.rand(4, dtype=F64)
    r = t * torch.rand(4, dtype=F64)
    y = torch.tensor([0, 1, 2, 3])  # 3 is the null class
    dr, dt = randn(4, seed=1), randn(4, seed=2)
    with torch.no_grad():
        actual = conditioning.forward_with_tangent(r, t, y, dr, dt)
    assert_pair_close(actual, jvp(lambda r_, t_: conditioning(r_, t_, y), [r, t], [dr, dt]))
    with pytest.raises(ValueError, match="class-conditional"):
        conditioning.forward_with_tangent(r, t, None, dr, dt)


# --- the whole DiT --------------------------------------------------------------------------------

CONFIGS = {
    "cond-p2": DiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                         num_classes=10, frequency_size=32),
    "uncond-p1": DiTConfig(input_size=4, in_channels=2, patch_size=1, hidden_size=16, depth=2, num_heads=2,
                           frequency_size=16),
    "cond-p1-mlp2": DiTConfig(input_size=4, in_channels=1, patch_size=1, hidden_size=24, depth=1, num_heads=3,
                              num_classes=3, mlp_ratio=2.0, frequency_size=8),
    "uncond-p2": DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=16, depth=3, num_heads=1,
                           frequency_size=16),
}


def perturbed_dit(config: DiTConfig, seed: int = 0) -> DiT:
    """A float64 DiT whose adaLN-Zero linears (zero at init) are random, so every branch is open."""
    torch.manual_seed(seed)
    model = DiT(config).double()
    zero_initialised = [block.modulation[-1] for block in model.blocks]
    zero_initialised += [model.final_layer.modulation[-1], model.final_layer.linear]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for linear in zero_initialised:
            for parameter in (linear.weight, linear.bias):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=F64))
    return model


def dit_inputs(config: DiTConfig, batch: int = 3, seed: int = 1):
    """(z, r, t, y, v) in float64 with 0.1 <= r < t <= 0.9; y includes the null class when conditional."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.input_size, config.input_size)
    z = torch.randn(shape, generator=generator, dtype=F64)
    v = torch.randn(shape, generator=generator, dtype=F64)
    t = 0.5 + 0.4 * torch.rand(batch, generator=generator, dtype=F64)
    r = 0.1 + (t - 0.1) * torch.rand(batch, generator=generator, dtype=F64)
    y = None
    if config.num_classes:
        y = torch.randint(0, config.num_classes + 1, (batch,), generator=generator)
        y[0] = config.num_classes
    return z, r, t, y, v


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_with_tangent_equals_func_jvp_along_the_meanflow_tangent(name):
    config = CONFIGS[name]
    model = perturbed_dit(config)
    z, r, t, y, v = dit_inputs(config)
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)

    # Tangent (dz, dr, dt) = (v, 0, 1): d/dt u along the flow (Eq. 5).
    u, dudt = model.forward_with_tangent(z, r, t, y, v, zeros, ones)
    u_ref, dudt_ref = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t), (v, zeros, ones))
    assert dudt_ref.abs().mean() > 1e-2
    torch.testing.assert_close(dudt, dudt_ref, **TOLERANCE)
    torch.testing.assert_close(u, u_ref, **TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(u, model(z, r, t, y), **TOLERANCE)


@pytest.mark.parametrize("name", ["cond-p2", "uncond-p1"])
def test_forward_with_tangent_equals_func_jvp_along_any_tangent(name):
    # dr != 0 and dt != 1 exercise the t - r path (tangent dt - dr) beyond the MeanFlow tangent.
    config = CONFIGS[name]
    model = perturbed_dit(config, seed=3)
    z, r, t, y, _ = dit_inputs(config, batch=4, seed=4)
    dz, dr, dt = randn(*z.shape, seed=5), randn(4, seed=6), randn(4, seed=7)
    actual = model.forward_with_tangent(z, r, t, y, dz, dr, dt)
    expected = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t), (dz, dr, dt))
    assert_pair_close(actual, expected)
    # Only r moving: the derivative through t - r alone, nonzero since the gap is embedded.
    only_r = model.forward_with_tangent(z, r, t, y, torch.zeros_like(z), dr, torch.zeros_like(dt))
    assert_pair_close(only_r, torch.func.jvp(lambda r_: model(z, r_, t, y), (r,), (dr,)))


def test_blocks_forward_with_tangent_equal_func_jvp():
    model = perturbed_dit(CONFIGS["cond-p2"])
    block, final = model.blocks[0], model.final_layer
    x, dx = randn(2, 16, 32, seed=0), randn(2, 16, 32, seed=1)
    c, dc = randn(2, 32, seed=2), randn(2, 32, seed=3)
    with torch.no_grad():
        silu_c, dsilu_c = tangent.silu_with_tangent(c, dc)
        actual_block = block(x, silu_c, dx, dsilu_c)
        actual_final = final.forward_with_tangent(x, dx, silu_c, dsilu_c)
        actual_attention = block.attn.forward_with_tangent(x, dx)
    assert_pair_close(actual_block, jvp(lambda x_, c_: block(x_, F.silu(c_))[0], [x, c], [dx, dc]))
    assert_pair_close(actual_final, jvp(final, [x, c], [dx, dc]))
    assert_pair_close(actual_attention, jvp(block.attn, [x], [dx]))


def test_zero_tangent_gives_exactly_zero_and_labels_are_constant():
    config = CONFIGS["cond-p2"]
    model = perturbed_dit(config)
    z, r, t, y, _ = dit_inputs(config)
    _, du = model.forward_with_tangent(z, r, t, y, torch.zeros_like(z), torch.zeros_like(r), torch.zeros_like(t))
    assert torch.equal(du, torch.zeros_like(z))


def test_one_pass_u_carries_the_plain_gradient_du_none_and_inference_mode_works():
    config = CONFIGS["uncond-p1"]
    model = perturbed_dit(config)
    z, r, t, _, v = dit_inputs(config)
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)
    u, du = model.forward_with_tangent(z, r, t, None, v, zeros, ones)  # grad mode on, parameters need grad
    assert u.requires_grad and not du.requires_grad
    # The gradient of any loss on u is the plain forward's: the tangent adds nothing to the graph.
    weights = randn(*u.shape, seed=9)
    one_pass = torch.autograd.grad((u * weights).sum(), list(model.parameters()))
    plain = torch.autograd.grad((model(z, r, t) * weights).sum(), list(model.parameters()))
    for a, b in zip(one_pass, plain):
        assert torch.equal(a, b)
    with torch.inference_mode():
        u_inference, du_inference = model.forward_with_tangent(z, r, t, None, v, zeros, ones)
    assert torch.equal(u.detach(), u_inference) and torch.equal(du, du_inference)


@pytest.mark.parametrize("name", ["cond-p2", "uncond-p1"])
def test_tangent_of_the_leading_rows_is_those_rows_of_the_full_tangent(name):
    config = CONFIGS[name]
    model = perturbed_dit(config, seed=2)
    z, r, t, y, v = dit_inputs(config, batch=5, seed=3)
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)
    u_full, du_full = model.forward_with_tangent(z, r, t, y, v, zeros, ones)
    for rows in (0, 1, 3):
        u, du = model.forward_with_tangent(z, r, t, y, v[:rows], zeros[:rows], ones[:rows])
        assert u.shape == z.shape and du.shape == (rows, *z.shape[1:])
        assert torch.equal(u, u_full)  # the primal covers the whole batch whatever the tangent's rows
        torch.testing.assert_close(du, du_full[:rows], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="M <= 5"):
        model.forward_with_tangent(z, r, t, y, torch.cat([v, v[:1]]), torch.zeros(6, dtype=F64),
                                   torch.ones(6, dtype=F64))
    with pytest.raises(ValueError, match="dr and dt"):
        model.forward_with_tangent(z, r, t, y, v[:2], zeros, ones)


def test_float32_agrees_with_func_jvp():
    config = dataclasses.replace(CONFIGS["cond-p2"], depth=3)
    model = perturbed_dit(config).float()
    z, r, t, y, v = (None if tensor is None else tensor.float() if tensor.is_floating_point() else tensor
                     for tensor in dit_inputs(config, batch=5))
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)
    u, du = model.forward_with_tangent(z, r, t, y, v, zeros, ones)
    u_ref, du_ref = torch.func.jvp(lambda z_, t_: model(z_, r, t_, y), (z, t), (v, ones))
    torch.testing.assert_close(u, u_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(du, du_ref, rtol=1e-4, atol=1e-4 * du_ref.abs().max().item())


def test_empty_batch_and_input_checks():
    config = CONFIGS["uncond-p2"]
    model = perturbed_dit(config)
    empty = torch.zeros(0, 4, 8, 8, dtype=F64)
    times = torch.zeros(0, dtype=F64)
    u, du = model.forward_with_tangent(empty, times, times, None, empty, times, times)
    assert u.shape == du.shape == empty.shape
    z, r, t, _, v = dit_inputs(config)
    with pytest.raises(ValueError, match="dz"):
        model.forward_with_tangent(z, r, t, None, v[:, :2], r, t)
    with pytest.raises(ValueError, match="all of dz, dr and dt"):
        model.forward_with_tangent(z, r, t, None, v, None, t)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model.forward_with_tangent(z[:, :2], r, t, None, v[:, :2], r, t)
    with pytest.raises(ValueError, match="unconditional"):
        model.forward_with_tangent(z, r, t, torch.zeros(3, dtype=torch.long), v, r, t)


def test_forward_with_tangent_is_a_jvp_in_its_definition():
    # Independent of torch.func: a central difference along (dz, dr, dt) in float64.
    config = CONFIGS["cond-p2"]
    model = perturbed_dit(config, seed=5)
    z, r, t, y, v = dit_inputs(config, seed=6)
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)
    _, dudt = model.forward_with_tangent(z, r, t, y, v, zeros, ones)
    h = 1e-6
    with torch.no_grad():
        difference = (model(z + h * v, r, t + h, y) - model(z - h * v, r, t - h, y)) / (2 * h)
    assert dudt.abs().mean() > 1e-2
    torch.testing.assert_close(dudt, difference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tokens,key_block", [(6, 4), (9, 2), (7, 16), (130, 32)])
def test_blockwise_attention_tangent_equals_the_dense_one(tokens, key_block):
    # Key blocks that do not divide N, one block wider than N, and a long sequence.
    q, dq, k, dk, v, dv = (2 * randn(2, 3, tokens, 4, seed=seed) for seed in range(6))
    dense = tangent.attention_tangent_dense(q, dq, k, dk, v, dv)
    streamed = tangent.attention_tangent_blockwise(q, dq, k, dk, v, dv, key_block=key_block)
    torch.testing.assert_close(streamed, dense, rtol=1e-12, atol=1e-12)
    _, reference = jvp(math_attention, [q, k, v], [dq, dk, dv])
    torch.testing.assert_close(streamed, reference, **TOLERANCE)
    # Through the layer function: forced by key_block, and chosen by length from BLOCKWISE_TOKENS on.
    _, forced = tangent.attention_with_tangent(q, dq[:1], k, dk[:1], v, dv[:1], key_block=key_block)
    torch.testing.assert_close(forced, dense[:1], rtol=1e-12, atol=1e-12)


def test_blockwise_attention_is_chosen_above_its_length_and_survives_large_scores(monkeypatch):
    q, dq, k, dk, v, dv = (randn(1, 2, 40, 4, seed=seed) for seed in range(6))
    q = 60 * q  # scores far beyond exp's range without the running max
    calls = []
    real = tangent.attention_tangent_blockwise
    monkeypatch.setattr(tangent, "attention_tangent_blockwise", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(tangent, "BLOCKWISE_TOKENS", 32)
    monkeypatch.setattr(tangent, "KEY_BLOCK", 8)  # 5 blocks: the running max rescales across them
    _, streamed = tangent.attention_with_tangent(q, dq, k, dk, v, dv)
    assert calls == [{"key_block": 8}] and torch.isfinite(streamed).all()
    torch.testing.assert_close(streamed, tangent.attention_tangent_dense(q, dq, k, dk, v, dv), rtol=1e-10, atol=1e-10)


def test_the_one_pass_call_traces_into_one_graph_for_torch_compile():
    # No graph break in the tangent code (no context-manager helper dynamo cannot enter), so
    # torch.compile of the wrapped module sees the tangent; dynamo only traces here (no backend).
    import torch._dynamo

    from meanflow.conditions import Tangent

    model = perturbed_dit(CONFIGS["cond-p2"]).float()
    z, r, t, y, v = (part.float() if part is not None and part.is_floating_point() else part
                     for part in dit_inputs(CONFIGS["cond-p2"], batch=4))

    def step(z_, r_, t_, dz):
        out = model(z_, r_, t_, y, tangent=Tangent(dz, torch.zeros_like(r_[:2]), torch.ones_like(t_[:2])))
        return out.u, out.du

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(z, r, t, v[:2])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
