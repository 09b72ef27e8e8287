"""torch.compile over the whole MeanFlow step: one graph with no break (fullgraph), no recompile as
the masks change from step to step, and the same loss and gradients as eager."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from test_one_pass import CLASSES, dit
from tiny_runs import tiny
from torch._dynamo.testing import CompileCounterWithBackend

from meanflow.checkpoint import load_checkpoint
from meanflow.objectives import FlowMatching, MeanFlow, TimeSampler, TrainingGuidance
from meanflow.presets import preset
from meanflow.train import train
from meanflow.train.compiled import CompiledStepLoss

OBJECTIVES = {
    "meanflow omega=1 kappa=0.5": lambda: MeanFlow(TimeSampler(fraction_r_neq_t=0.5), num_classes=CLASSES,
                                                   guidance=TrainingGuidance(omega=1.0, kappa=0.5)),
    "meanflow unguided": lambda: MeanFlow(TimeSampler(fraction_r_neq_t=0.5), num_classes=CLASSES),
    "flow matching": lambda: FlowMatching(num_classes=CLASSES),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_graph_no_recompile_and_the_eager_numbers(name):
    model, objective = dit().float(), OBJECTIVES[name]()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = CompiledStepLoss(objective, counter)
    compiled.compiled = torch.compile(objective.loss_from_draws, backend=counter, fullgraph=True)  # no break allowed
    moving_counts = set()
    for step in range(4):
        x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(step))
        labels = torch.randint(0, CLASSES, (8,), generator=torch.Generator().manual_seed(step))
        results = []
        for loss in (objective.loss, compiled):
            model.zero_grad(set_to_none=True)
            generator = torch.Generator().manual_seed(100 + step)  # the same draws for both
            out = loss(model, x, labels, generator=generator, progress=step / 4)
            out.loss.backward()
            results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
        for a, b in zip(eager_grads, compiled_grads):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        _, _, r, t, _ = objective.draws(x, labels, generator=torch.Generator().manual_seed(100 + step))
        moving_counts.add(int((r < t).sum()))
    assert counter.frame_count == 1  # compiled once, whatever the masks drew
    if name.startswith("meanflow"):
        assert len(moving_counts) > 1  # the r != t rows did change in number


def test_a_compiled_run_trains_like_an_eager_one(tmp_path):
    eager = train(tiny(preset("digits"), steps=3), tmp_path / "eager", progress=False)
    compiled = train(tiny(preset("digits"), steps=3).with_overrides(["training.compile=aot_eager"]),
                     tmp_path / "compiled", progress=False)
    a, b = load_checkpoint(eager.checkpoint).model, load_checkpoint(compiled.checkpoint).model
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_which_runs_compile_the_whole_step():
    from test_one_pass import unet

    from meanflow.train.compiled import compiles_whole_step

    objective = OBJECTIVES["meanflow unguided"]()
    assert compiles_whole_step(objective, dit(), distributed=False)
    assert not compiles_whole_step(objective, dit(), distributed=True)  # torchrun: the module alone
    assert not compiles_whole_step(objective, unet(), distributed=False)  # its convolutions: the module alone
    from meanflow.objectives import ImprovedMeanFlow

    assert not compiles_whole_step(ImprovedMeanFlow(num_classes=CLASSES), dit(), distributed=False)
