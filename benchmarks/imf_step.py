"""Train step of Improved MeanFlow vs MeanFlow vs flow matching on one imfDiT backbone.

    python benchmarks/imf_step.py --rounds 15

The same imfDiT (width 256, depth 6, 2 auxiliary-head blocks, 4x16x16 inputs, patch 2, batch 32,
2 threads) under three objectives. MeanFlow and flow matching read its ``u`` head with the
guidance inputs fixed at omega = 1 on [0, 1] (they pass labels only); iMF conditions it on drawn
omega and intervals and trains both heads. Half of the samples have r != t for both average-
velocity methods (iMF's default), so the derivative costs the same share. Medians of interleaved
rounds; peak memory is the growth of the peak RSS of a fresh process per method.

What iMF adds per step: one no-grad forward of the auxiliary head for the conditional velocity
v_c (the JVP's tangent and the guided target) and the unconditional v_u on the guided rows (one
call of 2 x the rows), and the second loss term's backward through the v head's blocks.
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
from meanflow.objectives import FlowMatching, MeanFlow, TimeSampler, build_objective
from train_step import _status_mib, time_interleaved

METHODS = ("flow matching", "MeanFlow two_pass", "MeanFlow jvp", "iMF two_pass", "iMF jvp")


class FixedGuidance(nn.Module):
    """The imfDiT as a labels-only network: omega = 1 on [0, 1] for every call (MeanFlow, FM)."""

    accepted_conditions = frozenset({"labels"})

    def __init__(self, network: ImfDiT):
        super().__init__()
        self.network = network

    def forward(self, z, r, t, conditions=None):
        labels = conditions.labels if isinstance(conditions, Conditions) else conditions
        batch = z.shape[0]
        record = Conditions(labels=labels, guidance_scale=z.new_ones(batch),
                            guidance_interval=z.new_tensor([[0.0, 1.0]]).expand(batch, 2))
        return self.network(z, r, t, record)


def build(args, method: str):
    torch.manual_seed(0)
    network = ImfDiT(ImfDiTConfig(input_size=args.input_size, in_channels=args.channels, patch_size=args.patch_size,
                                  hidden_size=args.width, depth=args.depth, num_heads=args.heads, num_classes=10,
                                  aux_head_depth=args.aux_depth))
    with torch.no_grad():  # open the zero-initialised residual scales so every block does real work
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    derivative = method.split()[-1]
    if method.startswith("iMF"):
        model, objective = network, build_objective("imf", {"derivative": derivative}, 10, model=network)
    elif method.startswith("MeanFlow"):
        model = FixedGuidance(network)
        objective = MeanFlow(TimeSampler(fraction_r_neq_t=0.5), num_classes=10, derivative=derivative)
    else:
        model, objective = FixedGuidance(network), FlowMatching(num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(args.batch_size, args.channels, args.input_size, args.input_size),
                  torch.randint(0, 10, (args.batch_size,), generator=generator))

    def step():
        loss = objective.loss(model, batch, generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peak_memory(args, method: str) -> float:
    """MiB of working memory of one method, in a fresh process."""
    command = [sys.executable, __file__, "--measure-memory", method]
    for key in ("threads", "batch_size", "width", "depth", "heads", "aux_depth", "input_size", "channels",
                "patch_size"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure_memory(args, method: str) -> None:
    step = build(args, method)
    base = _status_mib("VmRSS")
    for _ in range(3):
        step()
    print(_status_mib("VmHWM") - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--aux-depth", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--measure-memory", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args, args.measure_memory)
        return
    steps = {name: build(args, name) for name in args.methods}
    times = time_interleaved(steps, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: peak_memory(args, name) for name in args.methods}
    base = "flow matching" if "flow matching" in medians else args.methods[0]
    print(f"imfDiT width {args.width}, depth {args.depth} ({args.aux_depth} per head), {args.channels}x"
          f"{args.input_size}x{args.input_size}, patch {args.patch_size}, batch {args.batch_size}, {args.threads} "
          f"threads; r != t for 50% of samples; median (range) of {args.rounds} interleaved rounds\n")
    print("| method | step (ms) | range (ms) | vs flow matching | peak memory (MiB) | vs flow matching |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.methods:
        low, high = min(times[name]) * 1e3, max(times[name]) * 1e3
        ratio, memory_ratio = medians[name] / medians[base], memory[name] / memory[base]
        rows.append(dict(method=name, ms=medians[name] * 1e3, low=low, high=high, ratio=ratio, mib=memory[name],
                         memory_ratio=memory_ratio))
        print(f"| {name} | {medians[name] * 1e3:.1f} | {low:.0f}-{high:.0f} | {ratio:.2f}x | {memory[name]:.0f} | "
              f"{memory_ratio:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
