"""Score the runs of ``benchmarks/mnist.py``: domain FID and class accuracy against the NFE.

    python benchmarks/mnist_eval.py --runs runs/bench-mnist --data ../shared/data/mnist.npz \\
        --num-samples 5000 --json docs/results/mnist_eval.json

Trains the project's MNIST domain classifier once (saved in ``<runs>/classifier``), then scores
every run the folder holds, from each run's first EMA, with the same class-balanced labels and
noise seeds:

- ``meanflow`` / ``meanflow_unguided`` at 1, 2 and 4 steps (their own sampler: u(z, r, t) over a
  uniform grid; guidance, if any, is in the training target);
- ``imf`` at 1, 2 and 4 steps at its run's default guidance, and its learnt-guidance sweep: one
  checkpoint at omega = 1..8 x two intervals, 1 NFE each (``meanflow eval --sweep --omega ...
  --interval ...``);
- the family's other one-step methods (``alpha_flow``, ``shortcut``, ``split_meanflow``,
  ``consistency``) at 1, 2 and 4 steps of their own samplers;
- ``flow_matching`` at 1, 2, 4, 8, 16 and 50 Euler steps, without guidance and with
  inference-time CFG at the scale MeanFlow was trained for (omega' = 2, which doubles the NFE).

The reference statistics are those of the MNIST training set in the classifier's feature space.
Domain FID is NOT comparable with Inception FID; it only ranks models on MNIST. Prints markdown
tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from meanflow.cli import main as meanflow_main

FM_STEPS = [1, 2, 4, 8, 16, 50]
SWEEP_OMEGAS = ["1", "1.5", "2", "3", "4", "5", "6", "8"]
SWEEP_INTERVALS = ["0,1", "0.3,0.7"]


def plans(args: argparse.Namespace) -> dict[str, tuple[str, list[int], list[str]]]:
    """label -> (run folder name, steps, extra ``meanflow eval`` arguments)."""
    return {
        "meanflow": ("meanflow", [1, 2, 4], []),
        "meanflow_unguided": ("meanflow_unguided", [1, 2, 4], []),
        "imf": ("imf", [1, 2, 4], []),
        "imf_sweep": ("imf", [1], ["--sweep", "--weights", args.sweep_weights, "--omega", *SWEEP_OMEGAS,
                                   "--interval", *SWEEP_INTERVALS]),
        **{name: (name, [1, 2, 4], []) for name in ("alpha_flow", "shortcut", "split_meanflow", "consistency")},
        "flow_matching": ("flow_matching", args.fm_steps, ["--ode", "euler"]),
        "flow_matching_cfg": ("flow_matching", args.fm_steps, ["--ode", "euler", "--guidance-scale",
                                                          str(args.guidance_scale)]),
    }


def score(run: Path, steps: list[int], args: argparse.Namespace, extra: list[str], report: Path) -> list[dict]:
    """``meanflow eval`` on one run; its reports (one, or one per guidance setting of a sweep)."""
    argv = ["eval", "--checkpoint", str(run), "--metric", "domain", "--classifier", str(args.runs / "classifier"),
            "--train-classifier", "--classifier-steps", str(args.classifier_steps),
            "--num-samples", str(args.num_samples), "--steps", *map(str, steps), "--reference", "mnist:train",
            "--json", str(report), "--no-progress", "--device", "cpu", *extra]
    if args.data:
        argv += ["--data-path", args.data]
    started = time.perf_counter()
    if meanflow_main(argv) != 0:
        raise SystemExit(f"meanflow {' '.join(argv)} failed")
    result = json.loads(report.read_text())
    reports = result["reports"] if "--sweep" in extra else [result]
    for entry in reports:
        entry["eval_seconds"] = time.perf_counter() - started
    return reports


def sampler_label(report: dict) -> str:
    sampler = report["sampler"]
    if sampler["name"] == "imf":
        t_min, t_max = sampler["interval"]
        return f"u(z, r, t), omega {sampler['omega']:g}, interval [{t_min:g}, {t_max:g}]"
    if sampler["name"] == "velocity_ode":
        guidance = report["guidance_scale"]
        return f"{sampler['method']} ODE" + (f", CFG {guidance:g}" if guidance != 1.0 else "")
    if sampler["name"] == "consistency":
        return "f(z, t), re-noised"
    return "u(z, r, t)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-mnist"), help="the output of mnist.py")
    parser.add_argument("--data", help="a local MNIST .npz (default: torchvision download)")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--classifier-steps", type=int, default=500)
    parser.add_argument("--guidance-scale", type=float, default=2.0,
                        help="inference CFG of the guided flow-matching rows (MeanFlow's omega')")
    parser.add_argument("--sweep-weights", default="ema_0.99", help="the iMF sweep's weights")
    parser.add_argument("--skip", nargs="*", default=[], help="plans to leave out (e.g. flow_matching_cfg)")
    parser.add_argument("--reuse", action="store_true",
                        help="read the reports an earlier run left in --runs (same --num-samples) instead of "
                             "scoring again")
    parser.add_argument("--fm-steps", type=int, nargs="+", default=FM_STEPS, help="flow matching's Euler steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every report and the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary_path = args.runs / "summary.json"
    train_info = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    reports, rows = {}, []
    for label, (name, steps, extra) in plans(args).items():
        if label in args.skip or not (args.runs / name).is_dir():
            continue
        path = args.runs / f"eval_{label}.json"
        if args.reuse and path.is_file():
            saved = json.loads(path.read_text())
            found = saved["reports"] if "--sweep" in extra else [saved]
            fresh = found if found[0]["num_samples"] == args.num_samples else None
        else:
            fresh = None
        found = fresh or score(args.runs / name, steps, args, extra, path)
        reports[label] = found
        minutes = train_info.get(name, {}).get("train_seconds", float("nan")) / 60
        for report in found:
            for entry in report["scores"]:
                rows.append({"plan": label, "method": name, "sampler": sampler_label(report), "nfe": entry["nfe"],
                             "domain_fid": entry["fid"], "accuracy": entry.get("accuracy"), "train_minutes": minutes,
                             "step": report["step"], "weights": report["weights"]})
    print(f"\n{args.num_samples} samples per row, class-balanced labels, seed 0; reference: MNIST train set\n")
    for title, keep in (("Every method against the NFE", lambda row: row["plan"] != "imf_sweep"),
                        ("iMF: one checkpoint, learnt guidance chosen at sampling (1 NFE)",
                         lambda row: row["plan"] == "imf_sweep")):
        print(f"{title}\n\n| method | sampler | NFE | domain FID | class accuracy | train (min) |")
        print("|---|---|---|---|---|---|")
        for row in filter(keep, rows):
            print(f"| {row['method'].replace('_', ' ')} | {row['sampler']} | {row['nfe']} | {row['domain_fid']:.2f} "
                  f"| {row['accuracy']:.4f} | {row['train_minutes']:.1f} |")
        print()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "reports": reports, "training": train_info},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
