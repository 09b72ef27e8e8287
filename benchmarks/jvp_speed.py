"""Cost of d/dt u (Eq. 5): torch.func.jvp vs the explicit tangent, against an ordinary forward.

    python benchmarks/jvp_speed.py                    # the issue's setting: DiT width 256, depth 6, 2 threads, CPU
    python benchmarks/jvp_speed.py --model imf_dit    # imfDiT width 256, depth 6 (2 blocks per head)
    python benchmarks/jvp_speed.py --model mlp        # the toy iMF MLP, width 256, depth 4
    python benchmarks/jvp_speed.py --rounds 30 --json jvp_speed.json

Every JVP uses the MeanFlow tangent (dz, dr, dt) = (v, 0, 1) and runs without gradient, as the
'two_pass' target does. The explicit tangent is the module call ``model(z, r, t, conditions,
tangent=Tangent(v, 0, 1))`` that :func:`meanflow.jvp.tangent_along_flow` makes (the DiT, imfDiT
and MLP declare one, :mod:`meanflow.models.tangent`); torch.func.jvp is its fallback,
:func:`meanflow.jvp.jvp_along_flow`. The imfDiT is called with labels, omega and an interval
(its explicit tangent runs the trunk and the u head only, torch.func.jvp the whole network, as
the objective would); the MLP with omega and an interval (unconditional, two heads).

Times are medians over interleaved rounds in one process, after warm-up rounds, so every method
sees the same machine state; ratios are to the no-grad forward of the same rows. The last table
is the per-round ratio explicit / torch.func.jvp (robust to load that drifts between rounds).
The forward+backward row is the gradient half of a training step at the full batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn

from meanflow.conditions import Conditions, Tangent, average_velocity
from meanflow.jvp import jvp_along_flow
from meanflow.models.dit import DiT, DiTConfig
from meanflow.models.imf_dit import ImfDiT, ImfDiTConfig
from meanflow.models.mlp import MLP, MLPConfig

DEFAULTS = {  # per model: rows of the JVP, training batch, depth
    "dit": dict(jvp_batch=8, train_batch=32, depth=6),
    "imf_dit": dict(jvp_batch=8, train_batch=32, depth=6),
    "mlp": dict(jvp_batch=256, train_batch=512, depth=4),
}
EXPLICIT, TORCH_FUNC = "explicit tangent, no_grad", "torch.func.jvp, no_grad"


def build_model(args) -> nn.Module:
    torch.manual_seed(0)
    if args.model == "mlp":
        model = MLP(MLPConfig(data_dim=2, hidden_size=args.width, depth=args.depth, guidance_conditions=True,
                              auxiliary_velocity=True))
    elif args.model == "imf_dit":
        model = ImfDiT(ImfDiTConfig(input_size=args.input_size, in_channels=args.channels, patch_size=args.patch_size,
                                    hidden_size=args.width, depth=args.depth, num_heads=args.heads, num_classes=10,
                                    aux_head_depth=args.aux_depth))
    else:
        model = DiT(DiTConfig(input_size=args.input_size, in_channels=args.channels, patch_size=args.patch_size,
                              hidden_size=args.width, depth=args.depth, num_heads=args.heads))
    with torch.no_grad():  # open the zero-initialised gates and outputs so every branch does real work
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def make_batch(args, size: int, generator: torch.Generator):
    """(z, r, t, conditions, v) for ``size`` rows; the conditions the model takes."""
    shape = (size, 2) if args.model == "mlp" else (size, args.channels, args.input_size, args.input_size)
    z = torch.randn(shape, generator=generator)
    t = torch.rand(size, generator=generator)
    r = t * torch.rand(size, generator=generator)
    conditions = None
    if args.model != "dit":
        conditions = Conditions(
            labels=torch.randint(0, 10, (size,), generator=generator) if args.model == "imf_dit" else None,
            guidance_scale=1 + 3 * torch.rand(size, generator=generator),
            guidance_interval=torch.tensor([[0.1, 0.8]]).expand(size, 2),
        )
    return z, r, t, conditions, torch.randn(shape, generator=generator)


def cases(args, model: nn.Module) -> dict[str, Callable[[], object]]:
    """name -> a closure running one measured call."""
    generator = torch.Generator().manual_seed(1)
    z, r, t, conditions, v = make_batch(args, args.jvp_batch, generator)
    z2, r2, t2, conditions2, _ = make_batch(args, 2 * args.jvp_batch, generator)
    zt, rt, tt, conditions_t, vt = make_batch(args, args.train_batch, generator)
    tangent = Tangent(v, torch.zeros_like(r), torch.ones_like(t))

    def forward(z_=z, r_=r, t_=t, conditions_=conditions):
        with torch.no_grad():
            return model(z_, r_, t_, conditions_)

    def forward_inference():
        with torch.inference_mode():
            return model(z, r, t, conditions)

    def func_jvp():
        with torch.no_grad():
            return jvp_along_flow(model, z, r, t, conditions, v)

    def explicit():
        with torch.no_grad():
            return model(z, r, t, conditions, tangent=tangent).du

    def explicit_inference():
        with torch.inference_mode():
            return model(z, r, t, conditions, tangent=tangent).du

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss = (average_velocity(model(zt, rt, tt, conditions_t)) - vt).square().mean()
        loss.backward()

    n, m = args.jvp_batch, args.train_batch
    return {
        f"forward, no_grad, {n} samples": forward,
        f"forward, inference_mode, {n} samples": forward_inference,
        f"forward, no_grad, {2 * n} samples": lambda: forward(z2, r2, t2, conditions2),
        f"{TORCH_FUNC}, {n} samples": func_jvp,
        f"{EXPLICIT}, {n} samples": explicit,
        f"explicit tangent, inference_mode, {n} samples": explicit_inference,
        f"forward + backward, {m} samples": forward_backward,
    }


def describe(args) -> str:
    if args.model == "mlp":
        return f"MLP width {args.width}, depth {args.depth}, 2-D data, guidance conditions + v head, unconditional"
    name = "imfDiT" if args.model == "imf_dit" else "DiT"
    extra = f" ({args.aux_depth} per head), 10 classes + omega + interval" if args.model == "imf_dit" \
        else ", unconditional"
    return (f"{name} width {args.width}, depth {args.depth}{extra}, heads {args.heads}, {args.channels}x"
            f"{args.input_size}x{args.input_size}, patch {args.patch_size}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="dit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jvp-batch", type=int, help="rows of the JVP (the r != t share of a batch); "
                        "default 8 for the transformers, 256 for the MLP")
    parser.add_argument("--train-batch", type=int, help="default 32 for the transformers, 512 for the MLP")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, help="default 6 for the transformers, 4 for the MLP")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--aux-depth", type=int, default=2, help="imfDiT blocks per head")
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    if args.rounds < 10:
        parser.error("--rounds must be at least 10")
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args)
    runs = cases(args, model)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.warmup + args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians[next(iter(runs))]

    print(f"{describe(args)}; {args.threads} threads, CPU, torch {torch.__version__}; median of {args.rounds} "
          f"interleaved rounds after {args.warmup} warm-up\n")
    print(f"| call | ms | vs forward of {args.jvp_batch} |")
    print("|---|---|---|")
    rows = []
    for name, seconds in medians.items():
        rows.append(dict(call=name, ms=seconds * 1e3, ratio=seconds / base))
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |")
    explicit, fallback = (times[f"{label}, {args.jvp_batch} samples"] for label in (EXPLICIT, TORCH_FUNC))
    ratios = [a / b for a, b in zip(explicit, fallback)]
    print(f"\nexplicit tangent / torch.func.jvp, per-round: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}), i.e. {1 / statistics.median(ratios):.2f}x faster")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
