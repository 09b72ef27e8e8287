"""Train-step time and peak memory of every objective of the family against flow matching, on the
benchmark DiT, and what each step pays for (FAMILY.md F7).

    python benchmarks/family_step.py --rounds 15
    python benchmarks/family_step.py --methods "flow matching" MeanFlow Shortcut --rounds 5

Each method runs with the objective settings of its MNIST preset (``mnist``, ``alpha-flow-mnist``,
``shortcut-mnist``, ...: the budget of the MNIST comparison), class-conditional with 10 classes,
at training progress ``--progress`` (0.5 by default: alpha-Flow's alpha is mid-curriculum there,
consistency training's discretisation has doubled a few times). The DiT is the one of
benchmarks/train_step.py (width 256, depth 6, 4x16x16, patch 2, batch 32); iMF needs guidance
inputs and a second head, so it runs on the imfDiT of the same width and depth and is compared
with flow matching on that network (its ``u`` head with omega = 1 on [0, 1]).

Times are medians (and ranges) of interleaved rounds in rotated order in one process; peak
memory is the growth of the peak RSS of a fresh process per method. The "pays for" columns are
counted, not assumed: one step runs through a counting wrapper that records, per network call,
the rows it evaluated with a graph (gradient forward) or without (no-grad forward), the rows of
the explicit tangent the call carried (in one pass with a gradient forward, or apart without
one), and the rows run under ``torch.func.jvp``; in units of the batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from argparse import Namespace
from collections import Counter

import torch
from torch import nn

from imf_step import FixedGuidance
from imf_step import backbone as imf_backbone
from meanflow.conventions import Batch
from meanflow.models.dit import DiT, DiTConfig
from meanflow.objectives import build_objective
from meanflow.presets import preset
from train_step import step_memory, time_interleaved

# table name -> (preset whose objective settings the method trains with, overrides, backbone)
METHODS = {
    "flow matching": ("mnist", ["objective.method=flow_matching"], "dit"),
    "MeanFlow (omega=1, kappa=0.5)": ("mnist", [], "dit"),
    "MeanFlow unguided": ("mnist", ["objective.meanflow.kappa=0.0"], "dit"),
    "alpha-Flow": ("alpha-flow-mnist", [], "dit"),
    "Shortcut": ("shortcut-mnist", [], "dit"),
    "SplitMeanFlow": ("split-meanflow-mnist", [], "dit"),
    "consistency, discrete (iCT)": ("consistency-mnist", [], "dit"),
    "consistency, continuous (sCT)": ("consistency-mnist", ["objective.consistency.mode=continuous"], "dit"),
    "flow matching (imfDiT)": ("mnist", ["objective.method=flow_matching"], "imf_dit"),
    "iMF": ("imf-mnist", [], "imf_dit"),
}
NUM_CLASSES = 10


class CallCensus(nn.Module):
    """The network, counting the rows of every call by kind (see the module docstring)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.accepted_conditions = getattr(network, "accepted_conditions", frozenset())
        self.explicit_tangent = bool(getattr(network, "explicit_tangent", False))
        if hasattr(network, "auxiliary_velocity"):
            self.auxiliary_velocity = network.auxiliary_velocity
        self.rows: Counter = Counter()

    def forward(self, z, r, t, conditions=None, tangent=None):
        if torch._C._functorch.is_functorch_wrapped_tensor(z):
            self.rows["torch.func.jvp"] += z.shape[0]
        else:
            self.rows["gradient forward" if torch.is_grad_enabled() else "no-grad forward"] += z.shape[0]
            if tangent is not None:  # the explicit tangent of its leading rows, in the same call
                self.rows["explicit tangent"] += tangent.dz.shape[0]
        if tangent is None:
            return self.network(z, r, t, conditions)
        return self.network(z, r, t, conditions, tangent=tangent)


def network(args, kind: str) -> nn.Module:
    if kind == "imf_dit":
        options = Namespace(model="imf_dit", width=args.width, depth=args.depth, heads=args.heads,
                            aux_depth=args.aux_depth, input_size=args.input_size, channels=args.channels,
                            patch_size=args.patch_size)
        return imf_backbone(options)
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=args.input_size, in_channels=args.channels, patch_size=args.patch_size,
                          hidden_size=args.width, depth=args.depth, num_heads=args.heads, num_classes=NUM_CLASSES))
    with torch.no_grad():  # open the adaLN-Zero gates so every block does real work
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def build(args, method: str, census: bool = False):
    """The step function of one method (and its census wrapper when ``census``)."""
    preset_name, overrides, kind = METHODS[method]
    config = preset(preset_name).with_overrides(overrides).objective
    model = network(args, kind)
    if kind == "imf_dit" and config.method != "imf":
        model = FixedGuidance(model, explicit_tangent=True)  # flow matching reads the u head
    if census:
        model = CallCensus(model)
    objective = build_objective(config.method, config.settings, NUM_CLASSES, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator)
    batch = Batch(torch.randn(args.batch_size, args.channels, args.input_size, args.input_size, generator=generator),
                  labels)

    def step():
        loss = objective.loss(model, batch, generator=generator, progress=args.progress).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, model


def rows_per_step(args, method: str, steps: int = 4) -> dict[str, float]:
    """Network rows per step by kind, in units of the batch (mean over ``steps`` steps)."""
    step, census = build(args, method, census=True)
    for _ in range(steps):
        step()
    return {kind: rows / (steps * args.batch_size) for kind, rows in census.rows.items()}


def peak_memory(args, method: str) -> float:
    """MiB of working memory of one method, in a fresh process."""
    command = [sys.executable, __file__, "--measure-memory", method]
    for key in ("threads", "batch_size", "width", "depth", "heads", "aux_depth", "input_size", "channels",
                "patch_size", "progress"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure_memory(args, method: str) -> None:
    step, _ = build(args, method)
    print(step_memory(step))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--aux-depth", type=int, default=2, help="imfDiT blocks per head")
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--progress", type=float, default=0.5, help="training progress the curricula read")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--skip-memory", action="store_true", help="time only (no fresh process per method)")
    parser.add_argument("--measure-memory", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the table as JSON here")
    return parser.parse_args()


def baseline(method: str) -> str:
    return "flow matching (imfDiT)" if METHODS[method][2] == "imf_dit" else "flow matching"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args, args.measure_memory)
        return
    census = {name: rows_per_step(args, name) for name in args.methods}
    steps = {name: build(args, name)[0] for name in args.methods}
    times = time_interleaved(steps, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: float("nan") if args.skip_memory else peak_memory(args, name) for name in args.methods}
    print(f"DiT width {args.width}, depth {args.depth}, {args.channels}x{args.input_size}x{args.input_size}, patch "
          f"{args.patch_size}, batch {args.batch_size}, 10 classes, {args.threads} threads, CPU, torch "
          f"{torch.__version__}; progress {args.progress}; median (range) of {args.rounds} interleaved rounds\n")
    kinds = ("gradient forward", "no-grad forward", "explicit tangent", "torch.func.jvp")
    print("| method | step (ms) | vs flow matching | peak memory (MiB) | vs flow matching | "
          + " | ".join(f"{kind} (x batch)" for kind in kinds) + " |")
    print("|---|---|---|---|---|" + "---|" * len(kinds))
    rows = []
    for name in args.methods:
        base = baseline(name) if baseline(name) in medians else name
        low, high = min(times[name]), max(times[name])
        ratio = medians[name] / medians[base]
        memory_ratio = memory[name] / memory[base] if memory[base] > 0 else float("nan")
        counts = [census[name].get(kind, 0.0) for kind in kinds]
        rows.append(dict(method=name, ms=medians[name] * 1e3, ms_range=[low * 1e3, high * 1e3], ratio=ratio,
                         mib=memory[name], memory_ratio=memory_ratio, rows=dict(zip(kinds, counts))))
        print(f"| {name} | {medians[name] * 1e3:.0f} ({low * 1e3:.0f}-{high * 1e3:.0f}) | {ratio:.2f}x | "
              f"{memory[name]:.0f} | {memory_ratio:.2f}x | " + " | ".join(f"{count:.2f}" for count in counts) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
