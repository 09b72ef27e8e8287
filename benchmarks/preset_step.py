"""A preset's MeanFlow train step against flow matching on the same network, and its 1 + p/3 limit.

    python benchmarks/preset_step.py --preset digits
    python benchmarks/preset_step.py --preset toy-checkerboard
    python benchmarks/preset_step.py --preset cifar10 --batch-size 8 \\
        --set model.options.base_channels=32 model.options.num_res_blocks=1

Builds the preset's network and objective (its own settings: share p of r != t, guidance, the
derivative) and flow matching on the same network (same class dropout), feeds both random data of
the preset's shape, and times whole optimizer steps in interleaved rounds (rotated order, medians
and ranges). Flow matching costs a forward F and a backward of about 2F; MeanFlow's least extra is
the tangent of the r != t rows, about F per row, so its limit is 1 + p/3 of flow matching (with
guidance in the target, plus the guidance forward). The row "MeanFlow, tangent apart" hides the
network's explicit tangent (torch.func.jvp on the r != t rows, then the gradient forward): the
path before the one-pass engine.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from meanflow.conventions import Batch
from meanflow.models import build_model
from meanflow.objectives import build_objective
from meanflow.presets import preset
from train_step import time_interleaved


class TangentApart(nn.Module):
    """The network with its explicit tangent hidden: the derivative runs apart, via torch.func.jvp."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.accepted_conditions = network.accepted_conditions

    def forward(self, z, r, t, conditions=None):
        return self.network(z, r, t, conditions)


def data_shape(architecture: str, options: dict) -> tuple[int, ...]:
    if architecture == "mlp":
        return (options["data_dim"],)
    return (options["in_channels"], options["input_size"], options["input_size"])


def build(config, kind: str, batch_size: int):
    """The step function of ``kind``: 'flow matching', 'preset' (the preset's objective) or
    'apart' (the preset's objective with the network's explicit tangent hidden)."""
    architecture, options = config.model.architecture, dict(config.model.options)
    num_classes, settings = options.get("num_classes"), config.objective.settings
    torch.manual_seed(0)
    network = build_model(architecture, options)
    with torch.no_grad():  # open the zero-initialised output layers so every branch does work
        for parameter in network.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    model = TangentApart(network) if kind == "apart" else network
    if kind == "flow matching":
        flow_settings = {"class_dropout": getattr(settings, "class_dropout", 0.1)}
        objective = build_objective("flow_matching", flow_settings, num_classes, model=model)
    else:
        objective = build_objective(config.objective.method, settings, num_classes, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, *data_shape(architecture, options), generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator) if num_classes else None

    def step():
        loss = objective.loss(model, Batch(x, labels), generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, as `meanflow train --set`")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = preset(args.preset).with_overrides(args.set)
    architecture, options = config.model.architecture, dict(config.model.options)
    batch_size = args.batch_size or config.training.batch_size
    settings = config.objective.settings
    flow_settings = {"class_dropout": getattr(settings, "class_dropout", 0.1)}

    names = {"flow matching": "flow matching", f"{config.objective.method} (preset)": "preset",
             f"{config.objective.method}, tangent apart": "apart"}
    times = time_interleaved({name: build(config, kind, batch_size) for name, kind in names.items()}, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    share = getattr(settings, "fraction_r_neq_t", None)
    guidance = getattr(settings, "kappa", 0.0) > 0 or getattr(settings, "omega", 1.0) != 1.0
    print(f"preset {args.preset} ({architecture}, {sum(p.numel() for p in build_model(architecture, options).parameters()):,} "
          f"parameters), batch {batch_size}, {args.threads} threads, CPU, torch {torch.__version__}; r != t share p = "
          f"{share}; guidance in the target: {guidance}; median (range) of {args.rounds} interleaved rounds\n")
    print("| step | ms | vs flow matching |")
    print("|---|---|---|")
    base = medians["flow matching"]
    for name, values in times.items():
        print(f"| {name} | {medians[name] * 1e3:.1f} ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}) | "
              f"{medians[name] / base:.2f}x |")
    if share is not None:
        line = f"\nthe 1 + p/3 limit: {1 + share / 3:.3f}x"
        if guidance:
            # The guidance forward: every kept label's unconditional row, and with kappa > 0 the
            # conditional rows of the r != t ones (docs/engine.md), at about F per row.
            kept = 1 - flow_settings["class_dropout"]
            rows = kept * (1 + share if getattr(settings, "kappa", 0.0) > 0 else 1)
            line += f"; with the guidance forward over ~{rows:.2f} B rows: {1 + share / 3 + rows / 3:.3f}x"
        print(line)


if __name__ == "__main__":
    main()
