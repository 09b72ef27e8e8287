"""Score the runs of ``benchmarks/mnist.py``: domain FID and class accuracy against the NFE.

    python benchmarks/mnist_eval.py --runs runs/bench-mnist --data ../shared/data/mnist.npz \\
        --num-samples 5000 --json docs/results/mnist_eval.json

Trains the project's MNIST domain classifier once (saved in ``<runs>/classifier``), then scores
MeanFlow at 1, 2 and 4 steps (its own sampler: u(z, r, t) over a uniform grid) and flow matching
at 1, 2, 4, 8, 16 and 50 Euler steps, from each run's first EMA, with the same class-balanced
labels and noise seeds. The reference statistics are those of the MNIST training set in the
classifier's feature space. Domain FID is NOT comparable with Inception FID; it only ranks
models on MNIST. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from meanflow.cli import main as meanflow_main


def _score(run: Path, steps: list[int], args: argparse.Namespace, ode: str | None, report: Path) -> dict:
    argv = ["eval", "--checkpoint", str(run), "--metric", "domain", "--classifier", str(args.runs / "classifier"),
            "--train-classifier", "--classifier-steps", str(args.classifier_steps),
            "--num-samples", str(args.num_samples), "--steps", *map(str, steps), "--reference", "mnist:train",
            "--json", str(report), "--no-progress", "--device", "cpu"]
    if args.data:
        argv += ["--data-path", args.data]
    if ode:
        argv += ["--ode", ode]
    started = time.perf_counter()
    if meanflow_main(argv) != 0:
        raise SystemExit(f"meanflow {' '.join(argv)} failed")
    result = json.loads(report.read_text())
    result["eval_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-mnist"), help="the output of mnist.py")
    parser.add_argument("--data", help="a local MNIST .npz (default: torchvision download)")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--classifier-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every report and the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary_path = args.runs / "summary.json"
    train_info = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    plans = {"meanflow": ([1, 2, 4], None), "flow_matching": ([1, 2, 4, 8, 16, 50], "euler")}
    reports, rows = {}, []
    for name, (steps, ode) in plans.items():
        report = _score(args.runs / name, steps, args, ode, args.runs / f"eval_{name}.json")
        reports[name] = report
        minutes = train_info.get(name, {}).get("train_seconds", float("nan")) / 60
        for entry in report["scores"]:
            rows.append({"method": name, "sampler": "u(z, r, t)" if ode is None else f"{ode} ODE",
                         "nfe": entry["nfe"], "domain_fid": entry["fid"], "accuracy": entry.get("accuracy"),
                         "train_minutes": minutes, "step": report["step"], "weights": report["weights"]})
    print(f"\n{args.num_samples} samples per row, class-balanced labels, seed 0; reference: MNIST train set\n")
    print("| method | sampler | NFE | domain FID | class accuracy | training (min) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method'].replace('_', ' ')} | {row['sampler']} | {row['nfe']} | {row['domain_fid']:.3f} "
              f"| {row['accuracy']:.4f} | {row['train_minutes']:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "reports": reports, "training": train_info},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
