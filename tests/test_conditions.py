"""The conditions record, named model outputs and the declared explicit tangent."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from gaussian import GaussianAverageVelocity
from torch import nn

from meanflow.conditions import (
    Conditions,
    ModelOutput,
    Tangent,
    accepted_conditions,
    as_conditions,
    as_output,
    supports_explicit_tangent,
)
from meanflow.jvp import jvp_along_flow, tangent_along_flow
from meanflow.models.dit import DiT, DiTConfig
from meanflow.models.mlp import MLP, MLPConfig
from meanflow.objectives import MeanFlow
from meanflow.sampling import sample

F64 = torch.float64


def tiny_dit(num_classes=3) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=4, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                          num_classes=num_classes, frequency_size=16))
    for parameter in model.parameters():  # adaLN-Zero outputs 0: give every weight a value
        nn.init.normal_(parameter, std=0.3)
    return model


def test_the_record_selects_joins_and_replaces_rows():
    labels, scale = torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
    record = Conditions(labels=labels, guidance_scale=scale)
    assert record.present() == {"labels", "guidance_scale"}
    picked = record.rows(torch.tensor([2, 0]))
    assert picked.labels.tolist() == [2, 0] and picked.guidance_scale.tolist() == [3.0, 1.0]
    both = record.with_labels(torch.full_like(labels, 9)).cat(record)
    assert both.labels.tolist() == [9, 9, 9, 0, 1, 2] and both.guidance_scale.tolist() == [1, 2, 3, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot join"):
        record.cat(Conditions(labels=labels))
    assert as_conditions(labels).labels is labels and as_conditions(None).present() == frozenset()
    with pytest.raises(TypeError, match="Conditions record, a label tensor or None"):
        as_conditions([0, 1])


def test_networks_declare_the_conditions_they_accept_and_refuse_others():
    conditional, unconditional = tiny_dit(3), tiny_dit(None)
    assert accepted_conditions(conditional) == {"labels"} and accepted_conditions(unconditional) == frozenset()
    z, t = torch.randn(2, 1, 4, 4), torch.full((2,), 0.5)
    record = Conditions(labels=torch.tensor([0, 3]))
    assert torch.equal(conditional(z, t, t, record), conditional(z, t, t, record.labels))  # shorthand, same call
    with pytest.raises(ValueError, match=r"does not accept the conditions \['guidance_scale'\]; it accepts \['labels'\]"):
        conditional(z, t, t, Conditions(labels=record.labels, guidance_scale=torch.ones(2)))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(z, t, t, record)


class AuxiliaryHeadMLP(MLP):
    """An MLP with a second head: returns ModelOutput(u, v), v an instantaneous-velocity guess."""

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        self.extra_head = nn.Linear(config.data_dim, config.data_dim)

    def forward(self, z, r, t, conditions=None):
        u = super().forward(z, r, t, conditions)
        return ModelOutput(u=u, v=self.extra_head(z))


def test_a_network_may_return_named_outputs_and_every_part_reads_u():
    torch.manual_seed(0)
    plain = MLP(MLPConfig(data_dim=2, hidden_size=16, depth=2))
    for parameter in plain.parameters():
        nn.init.normal_(parameter, std=0.3)
    auxiliary = AuxiliaryHeadMLP(MLPConfig(data_dim=2, hidden_size=16, depth=2))
    auxiliary.load_state_dict(plain.state_dict(), strict=False)
    x, noise = torch.randn(6, 2, dtype=F64), torch.randn(6, 2, dtype=F64)
    r, t = torch.full((6,), 0.2, dtype=F64), torch.full((6,), 0.7, dtype=F64)
    plain, auxiliary = plain.double(), auxiliary.double()
    for derivative in ("two_pass", "jvp", "finite_difference"):
        objective = MeanFlow(derivative=derivative)
        expected = objective.prediction_and_target(plain, x, noise, r, t)
        actual = objective.prediction_and_target(auxiliary, x, noise, r, t)
        assert all(torch.equal(a, b) for a, b in zip(actual, expected)), derivative
    assert torch.equal(sample(auxiliary, noise, num_steps=2), sample(plain, noise, num_steps=2))
    assert as_output(noise).u is noise and as_output(as_output(noise)).v is None


def test_the_explicit_tangent_is_declared_and_goes_through_the_module_call():
    model = tiny_dit().double()
    assert supports_explicit_tangent(model) and supports_explicit_tangent(MLP(MLPConfig()))
    assert not supports_explicit_tangent(GaussianAverageVelocity(torch.zeros(2), torch.ones(2)))  # jvp for it
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(sorted(kwargs)), with_kwargs=True)
    z, v = torch.randn(3, 1, 4, 4, dtype=F64), torch.randn(3, 1, 4, 4, dtype=F64)
    r, t, y = torch.tensor([0.1, 0.2, 0.3], dtype=F64), torch.tensor([0.5, 0.6, 0.9], dtype=F64), torch.tensor([0, 1, 3])
    dudt = tangent_along_flow(model, z, r, t, y, v)
    assert calls == [["tangent"]]  # one call, through __call__ (where DDP / FSDP2 / compile hook in)
    _, reference = jvp_along_flow(model, z, r, t, y, v)
    torch.testing.assert_close(dudt, reference, rtol=1e-10, atol=1e-12)
    out = model(z, r, t, y, tangent=Tangent(v, torch.zeros_like(r), torch.ones_like(t)))
    assert isinstance(out, ModelOutput) and torch.equal(out.du, dudt)
    torch.testing.assert_close(out.u, model(z, r, t, y), rtol=1e-12, atol=1e-12)  # primal: another GEMM order


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def test_the_explicit_tangent_is_reachable_through_distributed_data_parallel():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = tiny_dit()
        wrapped = nn.parallel.DistributedDataParallel(model)
        z, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
        r, t, y = torch.tensor([0.1, 0.3]), torch.tensor([0.6, 0.8]), torch.tensor([0, 2])
        tangent = Tangent(v, torch.zeros_like(r), torch.ones_like(t))
        with torch.no_grad():
            through_ddp = wrapped(z, r, t, y, tangent=tangent)
            direct = model(z, r, t, y, tangent=tangent)
        assert torch.equal(through_ddp.u, direct.u) and torch.equal(through_ddp.du, direct.du)
        del wrapped
    finally:
        dist.destroy_process_group()


def test_an_objective_checks_at_construction_that_the_network_takes_its_conditions():
    from meanflow.objectives import build_objective

    with pytest.raises(ValueError, match="does not accept"):
        build_objective("flow_matching", None, num_classes=3, model=tiny_dit(None))
    build_objective("flow_matching", None, num_classes=3, model=tiny_dit(3))
