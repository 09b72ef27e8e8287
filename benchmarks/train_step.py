"""Train-step time and peak memory: MeanFlow (each derivative method) vs flow matching, same DiT.

    python benchmarks/train_step.py                 # the issue's setting: 2 threads, CPU
    python benchmarks/train_step.py --device cuda --batch-size 256

Times are medians over interleaved rounds in one process (so every method sees the same machine
state); peak memory is measured in a fresh process per method: the peak RSS growth over the
state after building the model (VmHWM - VmRSS, CPU), or torch.cuda.max_memory_allocated (GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from meanflow.models import enable_activation_checkpointing
from meanflow.models.dit import DiT, DiTConfig
from meanflow.objectives import FlowMatching, MeanFlow, TimeSampler, TrainingGuidance
from meanflow.train.compiled import CompiledStepLoss

METHODS = {
    # name: (objective kind, derivative, guidance); "peer" is a full-batch torch.func.jvp step as
    # public ports write it (every row through the JVP, the primal carrying the gradient).
    "flow matching": ("fm", None, None),
    "MeanFlow jvp": ("mf", "jvp", None),
    "MeanFlow two_pass": ("mf", "two_pass", None),
    "MeanFlow finite_difference": ("mf", "finite_difference", None),
    "MeanFlow two_pass, checkpointed": ("mf", "two_pass", None),
    "flow matching, checkpointed": ("fm", None, None),
    "peer-style full-batch torch.func.jvp": ("peer", None, None),
    "flow matching, cond.": ("fm", None, "cond"),
    "MeanFlow two_pass, CFG w=2 k=0": ("mf", "two_pass", (2.0, 0.0)),
    "MeanFlow two_pass, CFG w=1 k=0.5": ("mf", "two_pass", (1.0, 0.5)),
    "MeanFlow jvp, CFG w=1 k=0.5": ("mf", "jvp", (1.0, 0.5)),
}
DEFAULT_METHODS = [name for name in METHODS if "checkpointed" not in name]


def build(args, method: str, device):
    kind, derivative, guidance = METHODS[method]
    num_classes = 10 if guidance else None
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=args.input_size, in_channels=args.channels, patch_size=args.patch_size,
                          hidden_size=args.width, depth=args.depth, num_heads=args.heads, num_classes=num_classes))
    with torch.no_grad():  # open the adaLN-Zero gates so the JVP does real work everywhere
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model = model.to(device)
    if "checkpointed" in method:
        enable_activation_checkpointing(model, "dit")
    sampler = TimeSampler(fraction_r_neq_t=args.fraction)
    if kind == "peer":
        return peer_step(args, model, device)
    if kind == "fm":
        objective = FlowMatching(num_classes=num_classes)
    else:
        training_guidance = TrainingGuidance(omega=guidance[0], kappa=guidance[1]) if guidance else None
        objective = MeanFlow(sampler, num_classes=num_classes, guidance=training_guidance, derivative=derivative)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(args.batch_size, args.channels, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device) if num_classes else None
    generator = torch.Generator(device=device).manual_seed(1)

    loss = CompiledStepLoss(objective, args.compile) if args.compile else objective.loss

    def step():
        take_step(optimizer, loss(model, x, labels, generator=generator).loss, device)

    return step


def take_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, device) -> None:
    """Backward and an optimizer step (waiting for the GPU, so a timer sees the whole step)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_memory(step) -> float:
    """MiB of working memory of three calls of ``step``: the peak RSS growth of this process over
    its size before them (call it in a fresh process, after building the step)."""
    base = _status_mib("VmRSS")
    for _ in range(3):
        step()
    return _status_mib("VmHWM") - base


def peer_step(args, model, device):
    """A MeanFlow step as public ports write it: torch.func.jvp over the WHOLE batch (rows with
    r = t included), its primal output carrying the gradient, the target from its tangent."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    sampler = TimeSampler(fraction_r_neq_t=args.fraction)
    x = torch.randn(args.batch_size, args.channels, args.input_size, args.input_size, device=device)
    generator = torch.Generator(device=device).manual_seed(1)

    def step():
        noise = torch.randn(x.shape, generator=generator, device=device)
        r, t = sampler.sample(x.shape[0], device, x.dtype, generator)
        z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
        v = noise - x
        u, dudt = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_), (z, r, t),
                                 (v, torch.zeros_like(r), torch.ones_like(t)))
        target = (v - (t - r)[:, None, None, None] * dudt).detach()
        take_step(optimizer, (u - target).square().mean(), device)

    return step


def peak_memory(args, method: str) -> float:
    """MiB of working memory of one method, in a fresh process."""
    command = [sys.executable, __file__, "--measure-memory", method] + _forwarded(args)
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _forwarded(args) -> list[str]:
    out = []
    for key in ("device", "threads", "batch_size", "width", "depth", "heads", "input_size", "channels", "patch_size",
                "fraction"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def measure_memory(args, method: str) -> None:
    device = torch.device(args.device)
    step = build(args, method, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    print(step_memory(step))


def time_interleaved(steps: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each step function over ``rounds`` rounds after ``warmup`` ones; within a round
    every method runs once, in an order rotated from round to round (no method always runs first
    after another's caches)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + warmup):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            steps[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB. VmHWM is the peak RSS of this process image
    (ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", help="a torch.compile backend: each step's whole loss compiled "
                                          "(meanflow.train.compiled), as training.compile does")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.25, help="share of samples with r != t")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--measure-memory", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args, args.measure_memory)
        return

    device = torch.device(args.device)
    steps = {name: build(args, name, device) for name in args.methods}
    times = time_interleaved(steps, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: peak_memory(args, name) for name in args.methods}
    print(f"DiT width {args.width}, depth {args.depth}, {args.channels}x{args.input_size}x{args.input_size}, "
          f"patch {args.patch_size}, batch {args.batch_size}, {args.threads} threads, {args.device}, "
          + (f"the whole loss compiled ({args.compile}; peak memory eager), " if args.compile else "") +
          f"r != t for {args.fraction:.0%} of samples; median of {args.rounds} interleaved rounds (rotated order)\n")
    print("| method | step (ms) | vs flow matching | peak memory (MiB) | vs flow matching |")
    print("|---|---|---|---|---|")
    rows = []
    for name in args.methods:
        base = "flow matching, cond." if "CFG" in name or "cond." in name else "flow matching"
        base = base if base in medians else next(iter(medians))
        ratio = medians[name] / medians[base]
        memory_ratio = memory[name] / memory[base] if memory[base] > 0 else float("nan")
        rows.append(dict(method=name, ms=medians[name] * 1e3, ratio=ratio, mib=memory[name], memory_ratio=memory_ratio))
        print(f"| {name} | {medians[name] * 1e3:.1f} | {ratio:.2f}x | {memory[name]:.0f} | {memory_ratio:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
