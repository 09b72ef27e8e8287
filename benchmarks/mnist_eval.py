"""Score the runs of ``benchmarks/mnist.py``: domain FID and class accuracy against the NFE.

    python benchmarks/mnist_eval.py --runs runs/bench-mnist --data ../shared/data/mnist.npz \\
        --num-samples 5000 --json docs/results/mnist_eval.json

Trains the project's MNIST domain classifier once (saved in ``<runs>/classifier``), then scores
MeanFlow at 1, 2 and 4 steps (its own sampler: u(z, r, t) over a uniform grid; guidance is in its
training target) and flow matching at 1, 2, 4, 8, 16 and 50 Euler steps, without guidance and
with inference-time CFG at the scale MeanFlow was trained for (omega' = 2, which doubles the
NFE), from each run's first EMA, with the same class-balanced labels and noise seeds. The reference statistics are those of the MNIST training set in the
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


def _score(run: Path, steps: list[int], args: argparse.Namespace, ode: str | None, guidance: float,
           report: Path) -> dict:
    argv = ["eval", "--checkpoint", str(run), "--metric", "domain", "--classifier", str(args.runs / "classifier"),
            "--train-classifier", "--classifier-steps", str(args.classifier_steps),
            "--num-samples", str(args.num_samples), "--steps", *map(str, steps), "--reference", "mnist:train",
            "--json", str(report), "--no-progress", "--device", "cpu"]
    if args.data:
        argv += ["--data-path", args.data]
    if ode:
        argv += ["--ode", ode]
    if guidance != 1.0:
        argv += ["--guidance-scale", str(guidance)]
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
    parser.add_argument("--guidance-scale", type=float, default=2.0,
                        help="inference CFG of the guided flow-matching rows (MeanFlow's omega')")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out: meanflow, flow_matching, "
                                                                 "flow_matching_cfg")
    parser.add_argument("--reuse", action="store_true",
                        help="read the reports an earlier run left in --runs (same --num-samples) instead of "
                             "scoring again")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every report and the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary_path = args.runs / "summary.json"
    train_info = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    fm_steps = [1, 2, 4, 8, 16, 50]
    plans = {"meanflow": ("meanflow", [1, 2, 4], None, 1.0),
             "flow_matching": ("flow_matching", fm_steps, "euler", 1.0),
             "flow_matching_cfg": ("flow_matching", fm_steps, "euler", args.guidance_scale)}
    reports, rows = {}, []
    for label, (name, steps, ode, guidance) in plans.items():
        if label in args.skip:
            continue
        path = args.runs / f"eval_{label}.json"
        if args.reuse and path.is_file() and json.loads(path.read_text())["num_samples"] == args.num_samples:
            report = json.loads(path.read_text())  # scored by an earlier run of this script
        else:
            report = _score(args.runs / name, steps, args, ode, guidance, path)
        reports[label] = report
        minutes = train_info.get(name, {}).get("train_seconds", float("nan")) / 60
        sampler = "u(z, r, t)" if ode is None else f"{ode} ODE" + (f", CFG {guidance:g}" if guidance != 1.0 else "")
        for entry in report["scores"]:
            rows.append({"method": name, "sampler": sampler,
                         "nfe": entry["nfe"], "domain_fid": entry["fid"], "accuracy": entry.get("accuracy"),
                         "train_minutes": minutes, "step": report["step"], "weights": report["weights"]})
    print(f"\n{args.num_samples} samples per row, class-balanced labels, seed 0; reference: MNIST train set\n")
    print("| method | sampler | NFE | domain FID | class accuracy |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method'].replace('_', ' ')} | {row['sampler']} | {row['nfe']} | {row['domain_fid']:.2f} "
              f"| {row['accuracy']:.4f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "reports": reports, "training": train_info},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
