"""Train step of Improved MeanFlow vs MeanFlow vs flow matching on one backbone: imfDiT or the MLP,
each derivative with the backbone's explicit tangent and with torch.func.jvp.

    python benchmarks/imf_step.py --rounds 15                 # imfDiT (width 256, depth 6)
    python benchmarks/imf_step.py --model mlp --rounds 15     # the toy iMF MLP (width 256, depth 4)

imfDiT: width 256, depth 6, 2 auxiliary-head blocks, 4x16x16 inputs, patch 2, batch 32,
10 classes. MLP: the toy iMF network (2-D data, width 256, depth 4, guidance conditions and
the auxiliary head, unconditional), batch 512. 2 threads. MeanFlow and flow matching read the ``u``
head with the guidance inputs fixed at omega = 1 on [0, 1] (they pass labels only); iMF
conditions the network on drawn omega and intervals and trains both heads. Half of the samples
have r != t for both average-velocity methods (iMF's default), so the derivative costs the same
share.

The derivative of 'two_pass' is the backbone's explicit tangent in one pass (one call gives both
heads with gradient and the no-grad tangent of the r != t rows, :mod:`meanflow.models.tangent`,
docs/engine.md); the rows marked ``torch.func`` run the same objective with the explicit tangent
hidden (a wrapper that does not declare it), so the derivative runs apart through
``torch.func.jvp`` before the gradient forward. 'jvp' is the single-pass ``torch.func.jvp`` (no explicit tangent).
Medians of interleaved rounds in rotated order; peak memory is the growth of the peak RSS of a
fresh process per method.

What iMF adds per step: one no-grad forward of the auxiliary head for the conditional velocity
v_c (the JVP's tangent and the guided target) and the unconditional v_u on the guided rows (one
call of 2 x the rows), and the second loss term's backward through the v head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from torch import nn

from meanflow.conditions import Conditions
from meanflow.conventions import Batch
from meanflow.models.imf_dit import ImfDiT, ImfDiTConfig
from meanflow.models.mlp import MLP, MLPConfig
from meanflow.objectives import FlowMatching, MeanFlow, TimeSampler, build_objective
from train_step import step_memory, time_interleaved

METHODS = {
    # name: (objective, derivative, explicit tangent visible to the objective)
    "flow matching": ("fm", None, False),
    "MeanFlow two_pass, explicit tangent": ("mf", "two_pass", True),
    "MeanFlow two_pass, torch.func": ("mf", "two_pass", False),
    "MeanFlow jvp": ("mf", "jvp", False),
    "iMF two_pass, explicit tangent": ("imf", "two_pass", True),
    "iMF two_pass, torch.func": ("imf", "two_pass", False),
    "iMF jvp": ("imf", "jvp", False),
}
DEFAULTS = {  # per backbone: batch size, depth, classes
    "imf_dit": dict(batch_size=32, depth=6, num_classes=10),
    "mlp": dict(batch_size=512, depth=4, num_classes=None),
}


class FixedGuidance(nn.Module):
    """The backbone as a labels-only network: omega = 1 on [0, 1] for every call (MeanFlow, FM).

    Passes a tangent through to the backbone when ``explicit_tangent`` (then declared), so the
    MeanFlow 'two_pass' derivative can use the backbone's explicit tangent.
    """

    def __init__(self, network: nn.Module, explicit_tangent: bool):
        super().__init__()
        self.network = network
        self.explicit_tangent = explicit_tangent
        self.accepted_conditions = frozenset({"labels"}) if network.config.num_classes else frozenset()

    def forward(self, z, r, t, conditions=None, tangent=None):
        labels = conditions.labels if isinstance(conditions, Conditions) else conditions
        batch = z.shape[0]
        record = Conditions(labels=labels, guidance_scale=z.new_ones(batch),
                            guidance_interval=z.new_tensor([[0.0, 1.0]]).expand(batch, 2))
        if tangent is None:
            return self.network(z, r, t, record)
        return self.network(z, r, t, record, tangent=tangent)


class TorchFuncOnly(nn.Module):
    """The backbone with its explicit tangent hidden: iMF's derivative goes through torch.func.jvp."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.accepted_conditions = network.accepted_conditions
        self.auxiliary_velocity = network.auxiliary_velocity

    def forward(self, z, r, t, conditions=None):
        return self.network(z, r, t, conditions)


def backbone(args) -> nn.Module:
    torch.manual_seed(0)
    if args.model == "mlp":
        network = MLP(MLPConfig(data_dim=2, hidden_size=args.width, depth=args.depth, guidance_conditions=True,
                                auxiliary_velocity=True))
    else:
        network = ImfDiT(ImfDiTConfig(input_size=args.input_size, in_channels=args.channels,
                                      patch_size=args.patch_size, hidden_size=args.width, depth=args.depth,
                                      num_heads=args.heads, num_classes=10, aux_head_depth=args.aux_depth))
    with torch.no_grad():  # open the zero-initialised layers so every block does real work
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return network


def build(args, method: str):
    kind, derivative, explicit = METHODS[method]
    network = backbone(args)
    num_classes = DEFAULTS[args.model]["num_classes"]
    if kind == "imf":
        model = network if explicit else TorchFuncOnly(network)
        objective = build_objective("imf", {"derivative": derivative}, num_classes, model=model)
    elif kind == "mf":
        model = FixedGuidance(network, explicit)
        objective = MeanFlow(TimeSampler(fraction_r_neq_t=0.5), num_classes=num_classes, derivative=derivative)
    else:
        model, objective = FixedGuidance(network, False), FlowMatching(num_classes=num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(1)
    shape = (2,) if args.model == "mlp" else (args.channels, args.input_size, args.input_size)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=generator) if num_classes else None
    batch = Batch(torch.randn(args.batch_size, *shape, generator=generator), labels)

    def step():
        loss = objective.loss(model, batch, generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peak_memory(args, method: str) -> float:
    """MiB of working memory of one method, in a fresh process."""
    command = [sys.executable, __file__, "--measure-memory", method]
    for key in ("model", "threads", "batch_size", "width", "depth", "heads", "aux_depth", "input_size", "channels",
                "patch_size"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure_memory(args, method: str) -> None:
    step = build(args, method)
    print(step_memory(step))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="imf_dit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: 32 for imf_dit, 512 for mlp")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, help="default: 6 for imf_dit, 4 for mlp")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--aux-depth", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--skip-memory", action="store_true", help="time only (no fresh process per method)")
    parser.add_argument("--measure-memory", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    args.batch_size = args.batch_size or DEFAULTS[args.model]["batch_size"]
    args.depth = args.depth or DEFAULTS[args.model]["depth"]
    return args


def describe(args) -> str:
    if args.model == "mlp":
        return f"MLP width {args.width}, depth {args.depth}, 2-D data, guidance conditions + v head, batch " \
               f"{args.batch_size}"
    return f"imfDiT width {args.width}, depth {args.depth} ({args.aux_depth} per head), {args.channels}x" \
           f"{args.input_size}x{args.input_size}, patch {args.patch_size}, batch {args.batch_size}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args, args.measure_memory)
        return
    steps = {name: build(args, name) for name in args.methods}
    times = time_interleaved(steps, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: float("nan") if args.skip_memory else peak_memory(args, name) for name in args.methods}
    base = "flow matching" if "flow matching" in medians else args.methods[0]
    print(f"{describe(args)}, {args.threads} threads, CPU, torch {torch.__version__}; r != t for 50% of samples; "
          f"median (range) of {args.rounds} interleaved rounds\n")
    print(f"| method | step (ms) | range (ms) | vs {base} | peak memory (MiB) | vs {base} |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.methods:
        low, high = min(times[name]) * 1e3, max(times[name]) * 1e3
        ratio, memory_ratio = medians[name] / medians[base], memory[name] / memory[base]
        rows.append(dict(method=name, ms=medians[name] * 1e3, low=low, high=high, ratio=ratio, mib=memory[name],
                         memory_ratio=memory_ratio))
        print(f"| {name} | {medians[name] * 1e3:.1f} | {low:.0f}-{high:.0f} | {ratio:.2f}x | {memory[name]:.0f} | "
              f"{memory_ratio:.2f}x |")
    print_explicit_vs_torch_func(times)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


def print_explicit_vs_torch_func(times: dict[str, list[float]]) -> None:
    """Per objective: median over rounds of (explicit step / torch.func step) within each round,
    robust to a machine whose load drifts between rounds."""
    pairs = [(kind, f"{kind} two_pass, explicit tangent", f"{kind} two_pass, torch.func") for kind in ("MeanFlow", "iMF")]
    pairs = [pair for pair in pairs if pair[1] in times and pair[2] in times]
    if not pairs:
        return
    print("\n| objective | explicit / torch.func step, per-round median | range |")
    print("|---|---|---|")
    for kind, explicit, fallback in pairs:
        ratios = [a / b for a, b in zip(times[explicit], times[fallback])]
        print(f"| {kind} two_pass | {statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |")


if __name__ == "__main__":
    main()
