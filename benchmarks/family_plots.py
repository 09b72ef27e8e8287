"""Plots of the family comparison (FAMILY.md F7): quality against NFE on the toys and on MNIST.

    python benchmarks/family_plots.py --toys docs/results/family_toys.json \\
        --mnist docs/results/family_mnist.json --output docs/results

Reads the JSON of ``benchmarks/toy_quality.py --json`` (rows per toy, method, NFE and seed) and of
``benchmarks/mnist_eval.py --json``; writes ``family_toys.png`` (energy distance against NFE, one
panel per toy: the median over seeds with the range as a band) and ``family_mnist.png`` (domain
FID and class accuracy against NFE). Flow matching's Euler steps are the multi-step reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def toy_panels(rows: list[dict], path: Path) -> None:
    toys = list(dict.fromkeys(row["toy"] for row in rows))
    figure = Figure(figsize=(4.2 * len(toys), 3.6))
    FigureCanvasAgg(figure)
    for index, toy in enumerate(toys):
        axes = figure.add_subplot(1, len(toys), index + 1)
        by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        floor = [row["energy"] for row in rows if row["toy"] == toy and row["method"] == "data vs data"]
        for row in rows:
            if row["toy"] == toy and row["method"] != "data vs data":
                by_method[row["method"]][int(row["nfe"])].append(row["energy"])
        for method, points in by_method.items():
            nfes = sorted(points)
            medians = [statistics.median(points[n]) for n in nfes]
            axes.plot(nfes, medians, marker="o", label=method, linestyle="--" if "flow matching" in method else "-")
            axes.fill_between(nfes, [min(points[n]) for n in nfes], [max(points[n]) for n in nfes], alpha=0.15)
        if floor:  # a perfect model's score at this sample size (a plotted line, so the axes include it)
            span = [1, max(max(points) for points in by_method.values())]
            axes.plot(span, [statistics.median(floor)] * 2, color="grey", linewidth=0.8, label="data vs data")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("NFE")
        axes.set_title(toy.replace("_", " "))
        if index == 0:
            axes.set_ylabel("energy distance (median, range over seeds)")
    figure.axes[-1].legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def mnist_panels(report: dict, path: Path) -> None:
    rows = [row for row in report["rows"] if row["plan"] != "imf_sweep"]
    figure = Figure(figsize=(9.0, 3.6))
    FigureCanvasAgg(figure)
    for index, (key, label) in enumerate((("domain_fid", "domain FID"), ("accuracy", "class accuracy"))):
        axes = figure.add_subplot(1, 2, index + 1)
        by_plan: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for row in rows:
            by_plan[row["plan"]].append((int(row["nfe"]), row[key]))
        for plan, points in by_plan.items():
            points.sort()
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=plan.replace("_", " "),
                      linestyle="--" if plan.startswith("flow_matching") else "-")
        axes.set_xscale("log", base=2)
        if key == "domain_fid":
            axes.set_yscale("log")
        axes.set_xlabel("NFE")
        axes.set_ylabel(label)
    figure.axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toys", type=Path, help="the JSON of toy_quality.py")
    parser.add_argument("--mnist", type=Path, help="the JSON of mnist_eval.py")
    parser.add_argument("--output", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.toys:
        toy_panels(json.loads(args.toys.read_text()), args.output / "family_toys.png")
        print(args.output / "family_toys.png")
    if args.mnist:
        mnist_panels(json.loads(args.mnist.read_text()), args.output / "family_mnist.png")
        print(args.output / "family_mnist.png")


if __name__ == "__main__":
    main()
