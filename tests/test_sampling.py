"""Samplers against an exact average-velocity field."""

import pytest
import torch
from gaussian import GaussianAverageVelocity

from meanflow.sampling import guided_prediction, sample, sample_ode, sample_one_step, time_grid


def field():
    return GaussianAverageVelocity(torch.tensor([1.5, -2.0], dtype=torch.float64),
                                   torch.tensor([0.5, 2.0], dtype=torch.float64))


def noise(n=1000, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_one_step_with_the_exact_field_maps_noise_onto_the_data_law():
    """x = e - u(e, 0, 1) is the exact flow map: mu + scale * e for Gaussian data."""
    exact = field()
    e = noise()
    x = sample_one_step(exact, e)
    torch.testing.assert_close(x, exact.mu + exact.scale * e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("grid", [None, [1.0, 0.5, 0.0], [1.0, 0.8, 0.3, 0.05, 0.0]])
def test_several_steps_of_the_exact_field_equal_one_step(grid):
    exact = field()
    e = noise()
    one = sample(exact, e, num_steps=1)
    many = sample(exact, e, num_steps=2) if grid is None else sample(exact, e, times=grid)
    torch.testing.assert_close(many, one, atol=1e-12, rtol=1e-12)


def test_two_half_steps_equal_one_full_step_at_any_intermediate_time():
    exact = field()
    e = noise()
    for middle in (0.2, 0.5, 0.9):
        torch.testing.assert_close(sample(exact, e, num_steps=2, intermediate=middle), sample(exact, e), atol=1e-12,
                                   rtol=1e-12)


def test_time_grids():
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(2, intermediate=0.3).tolist() == pytest.approx([1.0, 0.3, 0.0])
    for bad in (dict(num_steps=0), dict(num_steps=3, intermediate=0.5), dict(num_steps=2, intermediate=1.0)):
        with pytest.raises(ValueError):
            time_grid(**bad)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(field(), noise(4), times=[1.0, 0.6, 0.7, 0.0])
    with pytest.raises(ValueError, match="start at 1"):
        sample(field(), noise(4), times=[0.9, 0.0])


def test_ode_samplers_converge_to_the_flow_map_at_their_orders():
    """Euler's error shrinks ~linearly with the step, Heun's ~quadratically."""
    exact = field()
    e = noise(200)
    target = exact.mu + exact.scale * e
    errors = {}
    for method in ("euler", "heun"):
        errors[method] = [float((sample_ode(exact, e, num_steps=n, method=method) - target).abs().max())
                          for n in (20, 40)]
    assert 1.7 < errors["euler"][0] / errors["euler"][1] < 2.3
    assert errors["heun"][0] / errors["heun"][1] > 3.0
    assert errors["heun"][1] < errors["euler"][1] / 10


def test_inference_guidance_is_the_cfg_combination():
    calls = []

    def model(z, r, t, y):
        calls.append(len(z))
        return z * 0 + y[:, None].to(z.dtype)  # u = label value: unconditional (null = 9) vs conditional

    z = torch.zeros(3, 2, dtype=torch.float64)
    time = torch.ones(3, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3])
    out = guided_prediction(model, z, time, time, labels, guidance_scale=3.0, null_label=9)
    expected = 9 + 3.0 * (labels.double() - 9)
    torch.testing.assert_close(out, expected[:, None].expand(3, 2))
    assert calls == [6]  # one doubled batch
    with pytest.raises(ValueError, match="null label"):
        guided_prediction(model, z, time, time, labels, guidance_scale=2.0)
